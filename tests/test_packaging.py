"""A wheel that works outside the checkout: bundled configs by name, ``capkit --version``, and an inference-only
install (no tensorboard, sacrebleu, pycocoevalcap or transformers) that imports, builds and captions."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from capkit.cli.main import main
from capkit.builder import build_captioner
from capkit.config import bundled_configs, load_config
from capkit.registry import DECODERS

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "capkit" / "configs"
# what `pip install capkit-captioning` leaves out (the train and hf extras); None in sys.modules makes an import fail
TRAIN_AND_HF = ["tensorboard", "torch.utils.tensorboard", "sacrebleu", "pycocoevalcap", "transformers"]
INSTALL_TRAIN = "pip install 'capkit-captioning[train]'"


def without(modules: list[str]) -> str:
    """Python source that makes importing ``modules`` (and their submodules) fail, as if not installed."""
    return f"import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


# ------------------------------------------------------------------------------------------ bundled configs
def test_a_bundled_config_loads_by_name_from_any_directory(tmp_path, monkeypatch):
    by_path = load_config(BUNDLED / "demo.yaml")
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert OmegaConf.to_container(load_config("demo")) == OmegaConf.to_container(by_path)
    assert OmegaConf.to_container(load_config("demo.yaml")) == OmegaConf.to_container(by_path)
    assert OmegaConf.to_container(load_config("demo", ["train.lr=0.5"]).train)["lr"] == 0.5


@pytest.mark.parametrize("name", [n for n in bundled_configs() if not n.startswith("ablation")])  # those: capkit ablate
def test_every_bundled_experiment_config_validates_and_builds_its_decoder(name):
    cfg = load_config(name)  # validates every value
    model = OmegaConf.to_container(cfg.model)
    # the encoder as configured (it may need weights from a hub), replaced by a small random one of the same kind
    small = {"name": "timm", "model_name": "resnet18", "weights": None, "finetune": "none"}
    captioner = build_captioner({**model, "encoder": small}, vocab_size=10)
    assert type(captioner.decoder) is DECODERS.get(model["decoder"]["name"])


def test_bundled_configs_are_the_yaml_files_of_the_package():
    names = bundled_configs()
    assert names == sorted(p.stem for p in BUNDLED.glob("*.yaml"))
    assert {"demo", "show_attend_tell_flickr8k"} <= set(names)


def test_the_repository_configs_folder_is_the_bundled_one():
    # the checkout keeps `configs/...` paths working through a link to capkit/configs
    assert (REPO / "configs").resolve() == BUNDLED.resolve()
    assert OmegaConf.to_container(load_config(REPO / "configs" / "demo.yaml")) == OmegaConf.to_container(
        load_config("demo")
    )


def test_a_file_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("demo.yaml").write_text("train:\n  lr: 0.125\n")
    assert load_config("demo.yaml").train.lr == 0.125  # the file in the cwd
    assert load_config("demo").train.lr != 0.125  # no file named `demo`: the bundled config
    Path("demo").write_text("train:\n  lr: 0.25\n")
    assert load_config("demo").train.lr == 0.25


def test_an_unknown_name_lists_the_bundled_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load_config("nope")
    message = str(info.value)
    assert message.startswith("config file 'nope' not found: give a path to a YAML file or the name of a bundled")
    assert "demo" in message and "show_attend_tell_flickr8k" in message


def test_a_path_with_a_directory_is_never_a_bundled_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "demo.yaml")


# ------------------------------------------------------------------------------------------ --version
@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    import capkit

    assert main([flag]) == 0
    assert capsys.readouterr().out == f"capkit-captioning {capkit.__version__}\n"


def test_usage_names_version(capsys):
    assert main(["--help"]) == 0
    assert "capkit --version" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ inference-only install
INFERENCE_ONLY = without(TRAIN_AND_HF) + textwrap.dedent(
    """
    import json

    import torch

    import capkit
    import capkit.cli.caption
    import capkit.recipes.inference
    from capkit.config import load_config

    cfg = load_config("tiny.yaml")
    model = capkit.build_captioner(cfg.model, vocab_size=20).eval()
    out = model.generate(torch.rand(2, 3, 64, 64), beam_size=2, max_len=4)
    leaked = sorted(m for m in ("tensorboard", "sacrebleu", "pycocoevalcap", "transformers")
                    if sys.modules.get(m) is not None)
    print(json.dumps({"metrics": sorted(capkit.METRICS.names()), "generated": type(out).__name__, "leaked": leaked}))
    """
)


def test_captioning_needs_no_training_or_hf_dependency(tmp_path):
    from toys import TINY_SHAPES_CONFIG

    (tmp_path / "tiny.yaml").write_text(TINY_SHAPES_CONFIG)
    result = json.loads(run_python(INFERENCE_ONLY, tmp_path).stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    assert result["generated"] == "Generation"
    # the metrics still register by name: registration needs none of their libraries
    assert {"bleu", "meteor", "rouge_l", "cider", "spice", "sacrebleu"} <= set(result["metrics"])


MISSING_LIBRARIES = without(TRAIN_AND_HF) + textwrap.dedent(
    """
    import json

    import capkit
    from capkit.errors import MissingDependencyError
    from capkit.evaluation import CiderD, SentenceBleu, ptb_tokenize

    hyps, refs = {"a": "a red circle"}, {"a": ["a red circle", "a circle"]}
    uses = {name: (lambda name=name: capkit.METRICS.get(name)()(hyps, refs))
            for name in ("bleu", "meteor", "rouge_l", "cider", "spice", "sacrebleu")}
    uses["ptb_tokenize"] = lambda: ptb_tokenize({"a": ["A dog."]})
    uses["CiderD"] = lambda: CiderD({"a": ["a dog"]})
    uses["SentenceBleu"] = lambda: SentenceBleu({"a": ["a dog"]})(["a"], ["a dog"])
    uses["hf encoder"] = lambda: capkit.ENCODERS.get("hf")(config={"model_type": "vit"})
    raised = {}
    for name, use in uses.items():
        try:
            use()
        except MissingDependencyError as err:
            raised[name] = str(err)
        else:
            raised[name] = None
    print(json.dumps(raised))
    """
)


def test_each_metric_without_its_library_says_what_to_install(tmp_path):
    raised = json.loads(run_python(MISSING_LIBRARIES, tmp_path).stdout.strip().splitlines()[-1])
    for name in ("bleu", "meteor", "rouge_l", "cider", "spice"):
        assert raised[name] == f"the {name} metric needs pycocoevalcap: {INSTALL_TRAIN}"
    assert raised["sacrebleu"] == f"the sacrebleu metric needs sacrebleu: {INSTALL_TRAIN}"
    assert raised["ptb_tokenize"].endswith(f"needs pycocoevalcap: {INSTALL_TRAIN}")
    assert raised["CiderD"] == raised["SentenceBleu"] and raised["CiderD"].endswith(INSTALL_TRAIN)
    assert raised["hf encoder"] == "the hf encoder needs transformers: pip install 'capkit-captioning[hf]'"


# ------------------------------------------------------------------------------------------ the wheel
@pytest.mark.slow
def test_the_wheel_holds_the_bundled_configs(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # a copy: building in the checkout would write build/ and egg-info there
    shutil.copytree(REPO / "capkit", source / "capkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
         "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=180,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    [wheel] = (tmp_path / "wheel").glob("capkit_captioning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "capkit/configs/demo.yaml" in names
    assert {f"capkit/configs/{name}.yaml" for name in bundled_configs()} <= names
    assert not any("__pycache__" in n for n in names)
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[console_scripts]\ncapkit = capkit.cli.main:main" in text
    [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
    extras = {line.split(": ", 1)[1] for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
              if line.startswith("Provides-Extra: ")}
    assert {"train", "hf", "weights", "all"} <= extras
