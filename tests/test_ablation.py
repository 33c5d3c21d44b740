"""The ablation runner on a tiny 2-variant, 1-epoch config: files, one row per variant, finished runs skipped."""
from __future__ import annotations

import csv
import json
import re

import pytest

from capkit.config import ConfigError
from capkit.recipes import ablation as ablation_module
from capkit.recipes.ablation import load_ablation, run_ablation, summarise
from toys import TINY_SHAPES_CONFIG

ABLATION = """
base: base.yaml
overrides: [train.lr=0.001]
seeds: [0]
output_dir: {out}
variants:
  - {{name: sat-bahdanau}}
  - {{name: luong-local, decoder: {{name: luong, embed_dim: 8, hidden_dim: 16}}, attention: {{name: luong_local, window: 1}}}}
"""


@pytest.fixture
def tiny_ablation(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "base.yaml").write_text(TINY_SHAPES_CONFIG)
    path = tmp_path / "ablation.yaml"
    path.write_text(ABLATION.format(out=tmp_path / "runs"))
    return path


def test_ablation_writes_one_row_per_variant_and_skips_finished_runs(tiny_ablation, tmp_path, monkeypatch):
    ablation = load_ablation(tiny_ablation)
    results = run_ablation(ablation)
    assert [(r["variant"], r["seed"]) for r in results] == [("sat-bahdanau", 0), ("luong-local", 0)]
    for r in results:
        # shapes has boxes, so grounding is measured; an untrained model may name no object (then it is NaN)
        assert r["grounded_words"] >= 0 and {"grounding", "grounding_uniform"} <= set(r)
        if r["grounded_words"]:
            assert 0.0 <= r["grounding"] <= 1.0 and 0.0 < r["grounding_uniform"] < 1.0
        assert r["decoder_params"] > 0 and r["train_seconds"] > 0 and r["decode_images_per_s"] > 0
        assert "sacrebleu" in r
    out = summarise(results, ablation.output_dir)
    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["variant"] for row in rows] == ["sat-bahdanau", "luong-local"]
    assert "sacrebleu_mean" in rows[0] and "grounding_std" in rows[0]
    table = (out / "ablation.md").read_text()
    assert table.count("| sat-bahdanau |") == 1 and table.count("| luong-local |") == 1
    assert (out / "ablation.png").stat().st_size > 1000

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation_module, "train_experiment", must_not_train)
    again = run_ablation(load_ablation(tiny_ablation))
    assert json.dumps(again) == json.dumps(results)  # read back from result.json (NaN != NaN, hence the dump)
    # the shared budget changed: the finished runs no longer stand for their variants
    with pytest.raises(ConfigError, match=r"variant 'sat-bahdanau': the finished run .*sat-bahdanau/seed0 was trained "
                       r"with other settings \(train\.lr\); its result would not be this variant's"):
        run_ablation(load_ablation(tiny_ablation, ["overrides=[train.lr=0.01]"]))


def test_variant_attention_replaces_the_base_section(tiny_ablation, tmp_path):
    ablation = load_ablation(tiny_ablation)
    cfg = ablation_module._variant_config(ablation, ablation.variants[1], 3, tmp_path)
    assert dict(cfg.model.attention) == {"name": "luong_local", "window": 1}  # attn_dim: 8 of the base is gone
    assert dict(cfg.model.decoder) == {"name": "luong", "embed_dim": 8, "hidden_dim": 16}  # replaced whole
    assert cfg.train.seed == 3 and cfg.train.lr == 0.001


def test_duplicate_variant_names_are_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: x.yaml\nvariants: [{name: a}, {name: a}]\n")
    with pytest.raises(ConfigError, match="variant names must be unique"):
        load_ablation(path)


def test_every_variant_is_checked_before_the_first_trains(tiny_ablation, monkeypatch):
    text = tiny_ablation.read_text().replace("window: 1}}", "window: 1, heads: 2}}")  # a typo in the last variant
    tiny_ablation.write_text(text)
    trained = []
    monkeypatch.setattr(ablation_module, "train_experiment", lambda *a, **k: trained.append(a))
    with pytest.raises(ConfigError, match=r"base\.yaml with variant 'luong-local': attention 'luong_local' does not "
                       r"accept 'heads'"):
        run_ablation(load_ablation(tiny_ablation))
    assert trained == []


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", ".hidden", ""])
def test_a_variant_name_must_be_a_plain_directory_name(tmp_path, name):
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: x.yaml\nvariants: [{{name: '{name}'}}]\n")
    with pytest.raises(ConfigError, match="is no plain directory name"):
        load_ablation(path)


def test_a_finished_run_from_before_a_setting_existed_is_still_reused(tiny_ablation, monkeypatch):
    from omegaconf import OmegaConf

    ablation = load_ablation(tiny_ablation)
    run_ablation(ablation)
    config = ablation_module.RunDir(ablation_module.Path(ablation.output_dir) / "sat-bahdanau" / "seed0").config
    saved = OmegaConf.to_container(OmegaConf.load(config))
    del saved["data"]["allow_split_overlap"]  # as a run made before this setting was added
    config.write_text(OmegaConf.to_yaml(saved))
    monkeypatch.setattr(ablation_module, "train_experiment", lambda *a, **k: pytest.fail("trained again"))
    assert len(run_ablation(load_ablation(tiny_ablation))) == 2


BAD_ABLATIONS = {
    "no base": ("seeds: [0]\n", "", r"{path}: no base: key; name the experiment YAML every variant starts from"),
    "no seeds": ("seeds: []\n", "base: base.yaml\n", r"{path}: seeds is empty; list at least one"),
    "a seed twice": ("seeds: [0, 0]\n", "base: base.yaml\n", r"{path}: seeds \[0, 0\] must be distinct and at least 0"),
    "a negative seed": ("seeds: [-1]\n", "base: base.yaml\n", r"{path}: seeds \[-1\] must be distinct"),
    "a typo in a variant's overrides": (
        "seeds: [0]\n", "base: base.yaml\n", r"base\.yaml with variant 'a': override: Key 'lrr' not in 'TrainConfig'\. "
        r"Did you mean: 'lr'\? \(key: train\.lrr\); fix the variant's overrides"),
    "an output_dir that is a file": ("seeds: [0]\noutput_dir: base.yaml\n", "base: base.yaml\n",
                                     r"{path}: output_dir base\.yaml: base\.yaml is a file, not a folder; give a folder"),
    "an output_dir under a file": ("seeds: [0]\noutput_dir: base.yaml/runs\n", "base: base.yaml\n",
                                   r"{path}: output_dir base\.yaml/runs: base\.yaml is a file, not a folder"),
    "an unknown split": ("seeds: [0]\nsplit: bogus\n", "base: base.yaml\n",
                         r"base\.yaml with variant 'a': dataset 'shapes' cannot be built with .*split='bogus': "
                         r"dataset 'shapes' has no split 'bogus'; its splits: train, val, test"),
}


@pytest.mark.parametrize("settings, base, message", BAD_ABLATIONS.values(), ids=BAD_ABLATIONS.keys())
def test_a_bad_ablation_config_is_one_line_before_anything_trains_or_is_written(tmp_path, monkeypatch, capsys,
                                                                                 settings, base, message):
    from capkit.cli import ablate as ablate_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ablation_module, "train_experiment", lambda *a, **k: pytest.fail("a variant trained"))
    (tmp_path / "base.yaml").write_text(TINY_SHAPES_CONFIG)
    variant = "{name: a, overrides: [train.lrr=1]}" if "lrr" in message else "{name: a}"
    (tmp_path / "ablation.yaml").write_text(f"{base}{settings}variants: [{variant}]\n")
    assert ablate_cli.main(["ablation.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capkit ablate: error: ") and err.count("\n") == 1, err
    assert re.search(message.format(path="ablation\\.yaml"), err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation.yaml", "base.yaml"]
