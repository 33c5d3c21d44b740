"""Experiment configs: YAML files merged over typed schemas, plus command-line dot-list overrides.

The ``data``, ``train`` and ``eval`` sections have typed schemas, so a typo or a wrong type is an error
with a suggestion. The component sections (``model.encoder|attention|decoder`` and ``data.dataset``)
are free-form ``{name: ..., **kwargs}`` dicts, checked against the constructor's signature when built,
so plugins can add options without touching a schema.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capkit.errors import ConfigError
from capkit.registry import import_plugins
from capkit.types import SPECIAL_TOKENS

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "ExperimentConfig",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "ConfigError",
    "load_config",
    "bundled_configs",
    "check_values",
    "PLAIN_NAME",
    "decoding_settings",
    "save_config",
    "to_container",
]


@dataclass
class ModelConfig:
    # defaults name the component only: its constructor's defaults apply (the timm encoder's is inception_v3),
    # and a file that names another component inherits no option it does not take
    encoder: dict[str, Any] = field(default_factory=lambda: {"name": "timm"})
    attention: dict[str, Any] = field(default_factory=lambda: {"name": "bahdanau"})
    decoder: dict[str, Any] = field(default_factory=lambda: {"name": "show_attend_tell"})


@dataclass
class DataConfig:
    dataset: dict[str, Any] = field(default_factory=lambda: {"name": "shapes"})  # {name, **dataset kwargs}
    max_caption_len: int = 16  # words kept per training caption (longer ones are truncated)
    vocab_min_count: int = 5
    vocab_max_size: int = 5000
    num_workers: int = 2
    cache_features: bool = True  # cache the features of the encoder's frozen part (all of a frozen one) on disk
    cache_dir: Optional[str] = None  # default: $CAPKIT_CACHE or ~/.cache/capkit
    skip_missing_images: bool = False
    skip_corrupt_images: bool = False  # also leaves out images over max_image_pixels
    max_image_pixels: Optional[int] = 178_956_970  # larger images are refused (decompression bombs); null: no limit
    augment: bool = False  # timm's training transform on the training images (no flips, crops keep half)
    # with augment and a frozen encoder whose features are cached: cache this many augmented views of each training
    # image (one extraction each) and draw one per caption each epoch; 0: augment the images at every step
    augment_views: int = 0
    # cross-entropy batches hold K captions of each image, so the encoder (or its trained stages over a cached trunk)
    # runs once per image, not once per caption; an epoch is every image once with K of its captions (redrawn each
    # epoch); train.batch_size still counts captions and must be a multiple of K
    captions_per_image: int = 1
    allow_split_overlap: bool = False  # an image in two splits (train and test, ...) is an error unless set


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 5.0
    objective: str = "xent"  # xent (cross-entropy) | scst (self-critical, CIDEr-D reward; start from init_from)
    init_from: Optional[str] = None  # checkpoint whose weights, vocabulary and optimizer moments start the run
    # continue init_from's Adam moments (true), or start Adam afresh (false): a self-critical gradient is about
    # ten times smaller than a cross-entropy one, so the carried second moments shrink its steps tenfold until
    # they decay (hundreds of steps); docs/RESULTS.md, "Self-critical training"
    init_moments: bool = True
    scst_samples: int = 5  # captions drawn per image by self-critical training
    scst_reward: dict[str, float] = field(default_factory=lambda: {"cider": 1.0})  # weights: cider, bleu4
    # <end> counts as a word of every caption and reference in the reward (as ruotianluo/ImageCaptioning.pytorch
    # scores samples): a caption cut off mid-phrase ("a dog in a") misses the n-grams that end the references
    scst_end_token: bool = True
    # each sample's baseline: the mean reward of the image's other samples (Luo 2020) | the reward of the
    # greedy caption, decoded without dropout (Rennie et al. 2017)
    scst_baseline: str = "mean"
    scst_temperature: float = 1.0  # with scst_candidates=sample: drawn from softmax(logits / temperature)
    # the captions rewarded: the scst_samples best of a beam search (beam), or drawn word by word (sample);
    # docs/RESULTS.md, "Self-critical training": beam gains more CIDEr and keeps the captions varied
    scst_candidates: str = "beam"
    label_smoothing: float = 0.0
    # keep an exponential moving average of the weights; evaluation, the best checkpoint and a saved model use it.
    # Its decay warms up as 1 - (1 + step)^(-3/4) and stops at this cap (0.998 after 4,000 steps, 0.999 after
    # 10,000: the average spans the last ~1 / (1 - decay) steps); null: none
    ema_decay: Optional[float] = None
    aux_loss_weights: dict[str, float] = field(default_factory=lambda: {"doubly_stochastic": 1.0})
    scheduler: str = "plateau"  # plateau | cosine | warmup_cosine (per step, after warmup_steps) | none
    warmup_steps: int = 0  # linear warm-up of warmup_cosine, in optimizer steps
    lr_decay: float = 0.8
    lr_patience: int = 2
    finetune_encoder_from_epoch: Optional[int] = None
    encoder_lr: float = 1e-4
    early_stop_metric: str = "cider"
    patience: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA when supported, else fp16) | bf16 | fp16 | none
    channels_last: bool = True
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke tests, budgets)
    output_dir: str = "runs"
    run_name: Optional[str] = None


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["bleu", "meteor", "rouge_l", "cider", "diversity"])
    beam_size: int = 3
    max_len: int = 16
    length_penalty: float = 0.0
    # n > 0: a caption never repeats one of its n-grams ("a dog and a dog"); 3 blocks trigrams (Hugging Face's
    # no_repeat_ngram_size). 0: no constraint
    no_repeat_ngram_size: int = 0
    # never write <unk>: text drops it, so its caption would read with a word missing ("a man holding a")
    suppress_unk: bool = False
    amp: str = "none"  # decoding precision: none (fp32) | bf16 (CPUs with native bf16, or CUDA) | auto | fp16
    batch_size: int = 128  # images per beam-search call (no activations kept: larger than training's pays)
    tokenizer: str = "ptb"  # before the COCO metrics: ptb (Java, the COCO pipeline) | python (no Java) | none
    every_epochs: int = 1
    max_images: Optional[int] = None  # evaluate on the first N validation images only
    tensorboard_samples: int = 4  # first N validation images captioned into TensorBoard at each evaluation; 0: none


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plugins: list[str] = field(default_factory=list)  # modules imported before building (unpackaged plugins)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Merge the schema, the YAML file and ``key=value`` overrides (in that order); import ``plugins``.

    ``path`` is a YAML file, or the name of a config bundled with capkit (``demo`` or ``demo.yaml``, see
    ``bundled_configs``), so ``capkit train demo`` works from any directory. An existing file wins over a name.

    Raises:
        ConfigError: naming the file or override and the offending key, with a suggestion for typos.
        FileNotFoundError: neither a file nor a bundled config; the message lists the bundled names.
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        path = _resolve_config(path)
        try:
            root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)  # the parse, no objects
            if isinstance(root, yaml.ScalarNode):  # which omegaconf reads as {word: None}, or refuses (a number)
                raise ConfigError(f"{path}: a config is a YAML mapping (model:, data:, train:, eval:), not the "
                                  f"single value {root.value[:40]!r}")
            loaded = OmegaConf.load(path)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from err
        except yaml.MarkedYAMLError as err:  # a syntax error: where it is, as YAML found it
            mark = err.problem_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML ({err.problem or err.context}); fix the file") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({_first_line(err)}); fix the file") from err
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: a config is a YAML mapping (model:, data:, train:, eval:), not a "
                              f"{type(loaded).__name__}")
        _check_sections(loaded, str(path))
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_first_line(err)} (key: {_full_key(err)})") from err
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        _check_sections(OmegaConf.from_dotlist(list(overrides)), "command-line override")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"command-line override: {_first_line(err)} (key: {_full_key(err)})") from err
    check_values(cfg, f"{path}" if path is not None else "the config")
    if cfg.plugins:  # code runs: say whose and why (a config, unlike a checkpoint, is trusted as the user's own)
        log.info("importing the plugin modules %s that %s names (plugins:)", list(cfg.plugins),
                 path if path is not None else "the config")
    import_plugins(list(cfg.plugins))
    return cfg



def _check_sections(loaded: DictConfig, source: str) -> None:
    """The sections (``model``, ``train``, ...) are mappings: ``model=3`` is refused naming the section, where
    omegaconf's merge error names no key."""
    for section in dataclasses.fields(ExperimentConfig):
        value, schema = loaded.get(section.name), section.default_factory
        if value is not None and dataclasses.is_dataclass(schema) and not isinstance(value, DictConfig):
            keys = [f.name for f in dataclasses.fields(schema)]
            raise ConfigError(f"{source}: {section.name} is a section of settings ({', '.join(keys)}), not "
                              f"{value!r}; set its keys instead (e.g. {section.name}.{keys[0]}=...)")


def bundled_configs() -> list[str]:
    """The names of the configs shipped in the package (``capkit/configs/<name>.yaml``), sorted, without .yaml."""
    folder = _bundled_folder()
    if not folder.is_dir():
        return []
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir()
                  if entry.name.endswith(".yaml") and entry.is_file())


def _bundled_folder() -> Traversable:
    return importlib.resources.files("capkit") / "configs"


def _resolve_config(path: str | os.PathLike) -> Path:
    """``path`` if it is a file, else the bundled config it names (a bare name, with or without .yaml)."""
    file = Path(path)
    if file.is_file():
        return file
    name = os.fspath(path)
    if name and Path(name).name == name:  # no directory part
        bundled = _bundled_folder() / (name if name.endswith(".yaml") else f"{name}.yaml")
        if bundled.is_file():
            return Path(bundled)  # type: ignore[arg-type]  # capkit is installed as files, never zipped
    raise FileNotFoundError(
        f"config file {name!r} not found: give a path to a YAML file or the name of a bundled config "
        f"({', '.join(bundled_configs()) or 'none installed'})"
    )


def _at_least(low: float):
    return (lambda v: v >= low), f"it must be at least {low}"


def _positive():
    return (lambda v: v > 0), "it must be greater than 0"


def _one_of(*choices: str):
    return (lambda v: v in choices), f"choose one of {', '.join(choices)}"


# a directory name that stays where it is put: no separator, and not '.' or '..' (a run, an ablation variant)
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# what each setting must be; a setting that is None (``Optional`` and unset) is not checked
RULES: dict[str, tuple] = {
    "data.max_caption_len": _at_least(1),
    "data.vocab_min_count": _at_least(1),
    "data.vocab_max_size": _at_least(len(SPECIAL_TOKENS) + 1),  # room for one word beside the special tokens
    "data.num_workers": _at_least(0),
    "data.max_image_pixels": _at_least(1),
    "data.augment_views": _at_least(0),
    "data.captions_per_image": _at_least(1),
    "train.epochs": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.lr": _positive(),
    "train.weight_decay": _at_least(0),
    "train.grad_clip": _positive(),
    "train.objective": _one_of("xent", "scst"),
    "train.scst_samples": _at_least(1),  # and 2 with the mean baseline: build_criterion
    "train.scst_baseline": _one_of("mean", "greedy"),
    "train.scst_candidates": _one_of("sample", "beam"),
    "train.scst_temperature": _positive(),
    "train.label_smoothing": ((lambda v: 0 <= v < 1), "it must be in [0, 1)"),
    "train.ema_decay": ((lambda v: 0 < v < 1), "it must be in (0, 1), e.g. 0.999; null: no moving average"),
    "train.scheduler": _one_of("plateau", "cosine", "warmup_cosine", "none"),
    "train.warmup_steps": _at_least(0),
    "train.lr_decay": ((lambda v: 0 < v <= 1), "it must be in (0, 1]"),
    "train.lr_patience": _at_least(0),
    "train.finetune_encoder_from_epoch": _at_least(0),
    "train.encoder_lr": _positive(),
    "train.patience": _at_least(1),
    "train.seed": ((lambda v: 0 <= v < 2**32), "it must be in [0, 2**32 - 1] (numpy's seeds)"),
    "train.run_name": ((lambda v: PLAIN_NAME.fullmatch(v) is not None),
                       "it must be a plain directory name inside train.output_dir (letters, digits, '-', '_' and "
                       "'.', starting with a letter or digit)"),
    "train.amp": _one_of("auto", "bf16", "fp16", "none"),
    "eval.amp": _one_of("auto", "bf16", "fp16", "none"),
    "train.max_steps": _at_least(1),
    "eval.beam_size": _at_least(1),
    "eval.max_len": _at_least(1),
    "eval.length_penalty": _at_least(0),
    "eval.no_repeat_ngram_size": _at_least(0),
    "eval.batch_size": _at_least(1),
    "eval.every_epochs": _at_least(1),
    "eval.max_images": _at_least(1),
    "eval.tensorboard_samples": _at_least(0),
    "eval.tokenizer": _one_of("ptb", "python", "none"),
}


def check_values(cfg: DictConfig, source: str, sections: Sequence[str] | None = None) -> None:
    """Every number finite and every setting of ``RULES`` within its range, or a ``ConfigError`` naming the key,
    its value and the range; only in ``sections`` where given (a stored model's: what using it reads)."""
    if sections is not None:
        cfg = OmegaConf.masked_copy(cfg, list(sections))
    for key, value in _leaves(to_container(cfg)):
        # a component section is free-form, so an override's nan or inf stays the text 'nan' there
        number = value if isinstance(value, float) else (
            _float_or_none(value) if isinstance(value, str) and key.startswith("model.") else None)
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"{source}: {key} is {value!r}; it must be a finite number")
    for key, (valid, requirement) in RULES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not valid(value):
            raise ConfigError(f"{source}: {key} is {value!r}; {requirement}")
    if "eval" in cfg and not cfg.eval.metrics:
        raise ConfigError(f"{source}: eval.metrics is empty; name at least one metric (e.g. [bleu, cider])")


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every setting in a plain config container, list items as ``key[i]``."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, f"{prefix}[{i}]")]
    return [(prefix, node)]


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config; ``load_config(path)`` gives it back unchanged."""
    OmegaConf.save(OmegaConf.create(to_container(cfg)), path)


def to_container(cfg: Any) -> Any:
    """A (section of a) config as plain resolved dicts and lists, what components are built from."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _full_key(err: OmegaConfBaseException) -> str:
    return getattr(err, "full_key", None) or "?"


def decoding_settings(eval_cfg: DictConfig) -> dict[str, Any]:
    """The beam search settings of an ``eval`` section: ``beam_size``, ``max_len``, ``length_penalty``,
    ``no_repeat_ngram_size``, ``suppress_unk``."""
    return dict(beam_size=eval_cfg.beam_size, max_len=eval_cfg.max_len, length_penalty=eval_cfg.length_penalty,
                no_repeat_ngram_size=eval_cfg.no_repeat_ngram_size, suppress_unk=eval_cfg.suppress_unk)
