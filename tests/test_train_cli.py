"""tools/train.py fails fast and clearly (missing data, pretrained weights that cannot be downloaded), a run
with a moving average of its weights evaluates and ships the average, a run over cached augmented views
trains on them and resumes exactly, and a run that fine-tunes an encoder's last stages reads its frozen trunk
from the cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capkit.cli import train as train_cli
from capkit.engine import load_checkpoint
from capkit.evaluation import CaptionEvaluator
from capkit.recipes.evaluate import score_checkpoint
from toys import TINY_SHAPES_CONFIG

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"


def train(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CAPKIT_DATA", None)
    return subprocess.run(
        [sys.executable, "tools/train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_missing_flickr8k_says_where_it_is_expected_and_where_to_get_it(tmp_path):
    done = train("configs/show_attend_tell_flickr8k.yaml", f"data.dataset.root={tmp_path}", f"train.output_dir={tmp_path}")
    assert done.returncode == 2
    assert f"expected {tmp_path}/Flickr8k_text/Flickr8k.token.txt" in done.stderr
    assert "Flickr8k_Dataset.zip" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"needs the Flickr8k copy in {FLICKR8K}")
def test_offline_inception_weights_point_to_the_offline_config(tmp_path):
    done = train(
        "configs/show_attend_tell_flickr8k.yaml", f"data.dataset.root={FLICKR8K}", "data.skip_missing_images=true",
        f"train.output_dir={tmp_path}",
    )
    assert done.returncode == 2
    assert "could not download the pretrained weights of 'inception_v3'" in done.stderr
    assert "show_attend_tell_flickr8k_offline.yaml" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
    """tmp_path as the working directory, holding tiny.yaml (the tiny shapes config) and the feature cache."""
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_SHAPES_CONFIG)


def test_a_run_with_a_moving_average_scores_and_saves_the_average(tiny_config, tmp_path):
    assert train_cli.main(["tiny.yaml", "train.run_name=ema", "train.epochs=2", "train.ema_decay=0.9"]) == 0
    run = tmp_path / "runs" / "ema"
    best = load_checkpoint(run / "checkpoints" / "best")
    assert any(not torch.equal(best["model"][k], best["training_model"][k]) for k in best["model"])
    # the checkpoint's model is the one that was scored: its test scores are the run's
    scored = score_checkpoint(CaptionEvaluator(["sacrebleu"], tokenizer="none"), run / "checkpoints" / "best")
    recorded = json.loads((run / "test_metrics.json").read_text())
    assert scored.scores["sacrebleu"] == pytest.approx(recorded["sacrebleu"], abs=1e-9)


def test_a_run_over_cached_augmented_views_trains_on_them_and_resumes_exactly(tiny_config, tmp_path):
    views = ["tiny.yaml", "train.epochs=2", "data.augment=true", "data.augment_views=2"]
    assert train_cli.main([*views, "train.run_name=whole"]) == 0
    cached = sorted(p.name for p in (tmp_path / "cache" / "features").glob("*.npy"))
    assert [name.split("_")[2] for name in cached if "_train_" in name] == ["view0", "view1"]
    assert len(cached) == 4 and all("view" not in name for name in cached if "_train_" not in name)  # val, test
    # 60 captions in batches of 16: 4 steps an epoch; stopped in the second epoch, then resumed
    assert train_cli.main([*views, "train.run_name=cut", "train.max_steps=6"]) == 0
    assert train_cli.main(["--resume", "runs/cut", *views, "train.run_name=cut", "train.max_steps=null"]) == 0
    whole, cut = (load_checkpoint(tmp_path / "runs" / name / "checkpoints" / "last")["model"] for name in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_a_run_on_grouped_captions_steps_on_whole_images_and_resumes_exactly(tiny_config, tmp_path):
    grouped = ["tiny.yaml", "train.epochs=2", "data.captions_per_image=4", "model.encoder.finetune=last"]
    assert train_cli.main([*grouped, "train.run_name=whole"]) == 0
    # 12 images, 4 of their 5 captions each, 16 captions (4 images) a batch: 3 steps an epoch
    steps = [json.loads(line) for line in (tmp_path / "runs" / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in steps) == 6
    assert train_cli.main([*grouped, "train.run_name=cut", "train.max_steps=4"]) == 0
    assert train_cli.main(["--resume", "runs/cut", *grouped, "train.run_name=cut", "train.max_steps=null"]) == 0
    whole, cut = (load_checkpoint(tmp_path / "runs" / name / "checkpoints" / "last")["model"]
                  for name in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_a_run_fine_tuning_the_encoders_last_stages_reads_its_frozen_trunk_from_the_cache(tiny_config, tmp_path):
    run = ["tiny.yaml", "train.epochs=2", "model.encoder.finetune=last", "train.finetune_encoder_from_epoch=1"]
    assert train_cli.main([*run, "train.run_name=whole"]) == 0
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "features").glob("*.json")]
    assert len(sidecars) == 3 and all(s["unfinished"] and s["key"]["encoder"]["trunk_blocks"] == 4 for s in sidecars)
    # 60 captions in batches of 16: 4 steps an epoch, so "first" stops before fine-tuning starts
    assert train_cli.main([*run, "train.run_name=first", "train.max_steps=4"]) == 0
    first, whole = (load_checkpoint(tmp_path / "runs" / name / "checkpoints" / "last")["model"]
                    for name in ("first", "whole"))
    encoder = [k for k in whole if k.startswith("encoder.")]
    trunk = [k for k in encoder if k.startswith(("encoder.model.conv_stem", "encoder.model.bn1",
                                                  *(f"encoder.model.blocks.{i}." for i in range(4))))]
    head = [k for k in encoder if k not in trunk and k.endswith(".weight")]
    assert trunk and head and all(torch.equal(first[k], whole[k]) for k in trunk)  # statistics too
    assert all(not torch.equal(first[k], whole[k]) for k in head)  # trained in the second epoch
