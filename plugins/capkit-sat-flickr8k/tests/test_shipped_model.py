"""The shipped model: found by name through its entry point, offline; small; its card states its scores and its
data's licence; it captions a Flickr8k dev photo as its card's scores say it was scored."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import capkit
from capkit.pretrained import installed_models, resolve_model
from capkit.pretrained.format import NEUTRAL_DECODING, read_config
from capkit_sat_flickr8k import model_path

MODEL = Path(__file__).resolve().parents[1] / "capkit_sat_flickr8k" / "model"
FLICKR8K = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "flickr8k"
DEV_PHOTO = "3695064885_a6922f06b2.jpg"  # a Flickr8k dev image


@pytest.fixture
def flickr8k_root() -> Path:
    if not (FLICKR8K / "Flicker8k_Dataset" / DEV_PHOTO).is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR8K}")
    return FLICKR8K


def test_the_entry_point_resolves_to_the_package_directory():
    assert "sat-flickr8k" in installed_models()
    assert resolve_model("sat-flickr8k") == model_path() == MODEL


def test_the_weights_are_float16_without_the_encoders_frozen_trunk_and_at_most_25_mb():
    from safetensors import safe_open

    size = (MODEL / "model.safetensors").stat().st_size
    assert size <= 25 * 1024 * 1024  # #29: at most 25 MB, read as MiB (26,214,400 bytes)
    config = read_config(MODEL)
    assert config["dtype"] == "float16" and config["encoder_weights"] == "source"
    assert config["model"]["encoder"]["weights"] == "efficientnet-lite2-pypi"
    with safe_open(MODEL / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    encoder = [key for key in keys if key.startswith("encoder.")]
    # the fine-tuned stages: blocks.5, blocks.6 and the head
    assert config["model"]["encoder"]["finetune"] == "last" and config["model"]["encoder"]["finetune_stages"] == 2
    trained = ("encoder.model.blocks.5.", "encoder.model.blocks.6.", "encoder.model.conv_head.", "encoder.model.bn2.")
    assert all(key.startswith(trained) for key in encoder)
    assert {key.split(".")[2] for key in encoder} == {"blocks", "conv_head", "bn2"}
    assert {key.split(".")[3] for key in encoder if key.startswith("encoder.model.blocks.")} == {"5", "6"}
    # the output layer is the word embedding, stored once
    assert config["model"]["decoder"]["tie_embeddings"] is True
    assert "decoder.embed.weight" in keys and not any(key.startswith("decoder.out.") for key in keys)


def test_the_card_states_the_dev_scores_the_licence_and_the_commands():
    card = ModelCard.load(MODEL / "README.md")
    scores = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_split == "val"}
    assert set(scores) >= {"bleu4", "cider", "meteor", "rouge_l"} and scores["bleu4"] > 0.2
    assert card.data.license_name == "flickr8k-research-only" and "research use only" in card.text
    assert "train.scheduler=cosine" in card.text and "train.run_name=sat_flickr8k_ce" in card.text
    assert 0.5 < scores["distinct_captions"] <= 1 and "not in a product" in card.text
    assert "## Known limits" in card.text and "It knows 2,534 words" in card.text


def test_the_card_lists_exactly_the_commands_and_note_of_reproduce_sh():
    import subprocess

    script = MODEL.parents[1] / "reproduce.sh"
    definitions = "\n".join(line for line in script.read_text().splitlines() if not line.startswith(("eval ", "set ")))
    printed = subprocess.run(["bash", "-uc", definitions + '\nprintf "%s\\n" "$STAGE1" "$CONVERT" "$PACKAGE" "$NOTE"'],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    text = ModelCard.load(MODEL / "README.md").text
    assert len(printed) == 4 and all(printed), printed  # bash -u: each is defined, and none is empty
    assert all(line in text for line in printed), [line for line in printed if line not in text]


def test_it_loads_offline_by_name_and_captions_a_dev_photo(flickr8k_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = capkit.from_pretrained("sat-flickr8k")
    assert model.decoding == {**NEUTRAL_DECODING, **json.loads((MODEL / "config.json").read_text())["decoding"]}
    assert model.decoding["no_repeat_ngram_size"] == 3 and model.decoding["length_penalty"] == 0.5
    result = model.caption(flickr8k_root / "Flicker8k_Dataset" / DEV_PHOTO)
    assert {"dog", "dogs"} & set(result.words) and len(result.words) >= 4  # the photo: two dogs at play
    assert result.attention.shape == (len(result.words) + 1, 9, 9)  # 9 x 9 grid of EfficientNet-Lite2 at 260 px
