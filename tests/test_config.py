"""Config loading: schema typos, wrong types, overrides, save/reload, builder wiring errors."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import capkit
from capkit.config import ConfigError, load_config, save_config, to_container


def write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_reference_hyperparameters():
    cfg = load_config()
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (4e-4, 64, 30)
    assert (cfg.data.max_caption_len, cfg.data.vocab_max_size) == (16, 5000)
    assert dict(cfg.model.encoder) == {"name": "timm"}
    assert capkit.ENCODERS.get("timm")().model_name == "inception_v3"  # the constructor's default applies


def test_typo_in_a_schema_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  ephocs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "train.ephocs" in message and "Did you mean: 'epochs'" in message


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(write(tmp_path, "train:\n  lr: fast\n"))


def test_dotlist_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.001\nmodel:\n  attention: {name: bahdanau, attn_dim: 64}\n")
    cfg = load_config(path, ["train.lr=1e-4", "model.attention.name=luong_local", "model.attention.window=3"])
    assert cfg.train.lr == 1e-4
    assert to_container(cfg.model.attention) == {"name": "luong_local", "attn_dim": 64, "window": 3}


def test_override_typo_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="command-line override.*Did you mean: 'batch_size'"):
        load_config(None, ["train.batchsize=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_saved_config_reloads_exactly(tmp_path):
    cfg = load_config(write(tmp_path, "eval:\n  beam_size: 5\n"), ["model.decoder.dropout=0.25"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_builder_rejects_a_derived_size_in_the_config():
    model = {
        "encoder": {"name": "timm", "model_name": "test_efficientnet"},
        "attention": {"name": "bahdanau", "key_dim": 8},
        "decoder": {"name": "show_attend_tell"},
    }
    with pytest.raises(ValueError, match="key_dim is set by the builder"):
        capkit.build_captioner(model, vocab_size=10)


def test_builder_names_missing_sections():
    with pytest.raises(KeyError, match="missing: \\['decoder'\\]"):
        capkit.build_captioner({"encoder": {"name": "timm"}, "attention": {"name": "none"}}, vocab_size=10)


def test_dot_score_with_mismatched_sizes_says_what_to_set():
    model = {
        "encoder": {"name": "timm", "model_name": "test_efficientnet"},
        "attention": {"name": "luong_global", "score": "dot"},
        "decoder": {"name": "luong", "hidden_dim": 32, "embed_dim": 16},
    }
    with pytest.raises(ValueError, match="feature_dim: 32"):
        capkit.build_captioner(model, vocab_size=10)
