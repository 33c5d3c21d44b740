"""What TensorBoard shows of a run: the captions and attention figures of a few fixed validation images at every
evaluation, the run's hyperparameters and config, all in one writer's events; none of it changes training."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from capkit.cli import train as train_cli
from capkit.config import ConfigError, load_config
from capkit.data import load_split
from capkit.engine import EvalHook, RunDir, load_checkpoint
from capkit.engine.monitor import (
    INSTALL_TRAIN,
    CaptionSample,
    CaptionSamplesHook,
    TensorBoard,
    _markdown_text,
    flatten_hparams,
)
from capkit.errors import MissingDependencyError
from toys import TINY_SHAPES_CONFIG, make_trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = TINY_SHAPES_CONFIG.replace("train: {epochs: 1,", "train: {epochs: 2,")  # two evaluations
SAMPLES = 3  # of the 4 validation images


def train_run(root: Path, name: str, *overrides: str) -> RunDir:
    config = root / "tiny.yaml"
    config.write_text(CONFIG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPKIT_CACHE", str(root / "cache"))
        mp.chdir(root)
        assert train_cli.main([str(config), f"train.output_dir={root / 'runs'}", f"train.run_name={name}",
                               *overrides]) == 0
    return RunDir(root / "runs" / name)


def events(run: RunDir) -> EventAccumulator:
    files = list(run.tensorboard.glob("events.out.tfevents.*"))
    assert len(files) == 1  # one writer, shared by the hooks: one file of events, no sub-run
    accumulator = EventAccumulator(str(run.tensorboard), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def logged(run: RunDir) -> list[dict]:
    """metrics.jsonl without the throughput, which is wall-clock."""
    return [{k: v for k, v in json.loads(x).items() if k != "captions_s"} for x in run.metrics.read_text().splitlines()]


def eval_steps(run: RunDir) -> list[int]:
    lines = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    return [x["step"] for x in lines if any(k.startswith("val/") for k in x)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, RunDir]:
    """The same tiny run (features read from the cache) with SAMPLES sample images, and with none."""
    root = tmp_path_factory.mktemp("tensorboard")
    return {
        "samples": train_run(root, "samples", f"eval.tensorboard_samples={SAMPLES}"),
        "none": train_run(root, "none", "eval.tensorboard_samples=0"),
    }


def test_every_evaluation_shows_the_same_sample_images_captions_and_attention(runs):
    run = runs["samples"]
    assert load_config(run.config).data.cache_features  # training read cached features; the samples are images
    steps = eval_steps(run)
    assert len(steps) == 2
    board = events(run)
    val = load_split({"name": "shapes", "num_train": 12, "num_val": 4, "num_test": 4, "image_size": 64}, "val")
    for i, record in enumerate(val.records[:SAMPLES]):
        texts = board.Tensors(f"samples/{i}/caption/text_summary")  # torch's add_text appends /text_summary
        assert [t.step for t in texts] == steps
        bodies = [t.tensor_proto.string_val[0].decode() for t in texts]
        assert all(f"image: {_markdown_text(record.image_id)}" in b.splitlines() for b in bodies)  # the same image
        assert all(b.startswith("**") and "references:" in b for b in bodies)
        assert all(f"- {_markdown_text(c)}" in b.splitlines() for b in bodies for c in record.captions)
        figures = board.Images(f"samples/{i}/attention")
        assert [f.step for f in figures] == steps
        for figure in figures:
            with Image.open(io.BytesIO(figure.encoded_image_string)) as png:
                assert png.mode == "RGB" and png.size == (figure.width, figure.height)
                assert figure.height >= 100 and figure.width > figure.height  # the image plus a panel per word
    tags = board.Tags()
    assert not any(t.startswith(f"samples/{SAMPLES}/") for t in tags["tensors"] + tags["images"])


def test_the_hparams_dashboard_gets_the_config_and_the_metrics_in_the_runs_own_folder(runs):
    run = runs["samples"]
    board = events(run)
    content = board.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    config = load_config(run.config)
    assert hparams["train.lr"] == pytest.approx(config.train.lr) and hparams["train.epochs"] == 2
    assert hparams["model.decoder.hidden_dim"] == 16 and hparams["model.encoder.model_name"] == "test_efficientnet"
    assert hparams["data.dataset.num_val"] == 4 and hparams["eval.tensorboard_samples"] == SAMPLES
    assert hparams["eval.metrics"] == '["sacrebleu"]'  # lists as text
    assert "train.max_steps" not in hparams  # unset (None): blank in the dashboard
    assert not any(k.startswith("plugins") for k in hparams)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/sacrebleu", "best/sacrebleu"]
    assert {h.name for h in experiment.hparam_infos} == set(hparams)
    vals = [s.value for s in board.Scalars("val/sacrebleu")]
    assert [s.value for s in board.Scalars("best/sacrebleu")] == pytest.approx(
        [max(vals[: k + 1]) for k in range(len(vals))])
    text = board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("```yaml\n") and "tensorboard_samples: 3" in text


def test_no_sample_tags_when_turned_off_and_training_is_the_same_either_way(runs):
    board = events(runs["none"])
    tags = board.Tags()
    assert not tags["images"] and not any(t.startswith("samples/") for t in tags["tensors"])
    assert "_hparams_/session_start_info" in board.PluginTagToContent("hparams")
    on, off = (load_checkpoint(runs[k].last) for k in ("samples", "none"))
    assert set(on["model"]) == set(off["model"])
    for key, value in on["model"].items():
        assert torch.equal(value, off["model"][key]), key
    for name in ("test_metrics.json", "test_captions.json"):
        assert (runs["samples"].root / name).read_text() == (runs["none"].root / name).read_text()
    assert logged(runs["samples"]) == logged(runs["none"])


def test_the_samples_hook_leaves_the_random_state_and_the_models_mode_as_they_were(tmp_path):
    seen = []

    class Watch(CaptionSamplesHook):
        def after_eval(self, trainer, metrics):
            rng, mode = torch.get_rng_state(), trainer.module.training
            super().after_eval(trainer, metrics)
            seen.append((torch.equal(rng, torch.get_rng_state()), mode == trainer.module.training, mode))

    tensorboard = TensorBoard(tmp_path)
    samples = [CaptionSample("a", Image.new("RGB", (40, 30), "red"), torch.randn(3, 32, 32), ["a red square"])]
    words = [f"w{i}" for i in range(20)]
    hook = Watch(tensorboard, samples, decode=lambda ids: " ".join(words[i] for i in ids), words=words,
                 data_config={"input_size": (3, 32, 32), "crop_pct": 1.0, "crop_mode": "center"},
                 decoding={"beam_size": 2, "max_len": 4, "length_penalty": 0.0})
    make_trainer([EvalHook(lambda m: {"cider": 0.5}), hook], n=8, epochs=2).fit()
    assert seen == [(True, True, True)] * 2  # after each epoch's evaluation, in train mode
    assert tensorboard._writer is None  # closed at the end


def test_flatten_hparams_keeps_scalars_and_writes_lists_as_text():
    flat = flatten_hparams({"a": {"b": 1, "c": [1, "x"], "d": None, "e": {"f": True}}, "g": "s"})
    assert flat == {"a.b": 1, "a.c": '[1, "x"]', "a.e.f": True, "g": "s"}


def test_tensorboard_samples_is_range_checked():
    with pytest.raises(ConfigError, match=r"eval\.tensorboard_samples is -1; it must be at least 0"):
        load_config(None, ["eval.tensorboard_samples=-1"])
    assert load_config().eval.tensorboard_samples == 4


def test_without_tensorboard_training_says_what_to_install_and_captioning_still_imports(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # ``import`` of it raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        TensorBoard(tmp_path).open()
    assert str(info.value) == INSTALL_TRAIN == "training writes TensorBoard logs: pip install 'capkit-captioning[train]'"
    code = ("import sys; sys.modules['torch.utils.tensorboard'] = None; sys.modules['tensorboard'] = None; "
            "import capkit, capkit.engine, capkit.recipes.train, capkit.recipes.inference, capkit.cli.caption")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
