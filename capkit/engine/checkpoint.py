"""Checkpoints as directories, written atomically and loaded without executing anything from the file.

A checkpoint directory (its files are named in ``capkit.engine.run_dir``) holds the model's state dict
(``state["model"]``) in one safetensors file, every other tensor of the state (optimizer moments, RNG states,
...) in a second, and the rest (numbers, strings, lists, dicts) as JSON, tensors replaced by references
``{"__tensor__": key}`` into the second file.

Loading reads safetensors and JSON only, so a checkpoint can never run code (unlike pickle). The model file's
metadata records the digests of the vocabulary and of the weights themselves, the second file's the digest of its
tensors (optimizer moments, the trained weights beside a moving average); loading refuses a file whose tensors or
vocabulary no longer match them.

Atomicity. ``save_checkpoint(path, ...)`` writes a complete copy into a fresh hidden sibling directory (every
file fsynced, then the directory), and then publishes it with two renames: ``NAME -> NAME.old`` and the copy
``-> NAME``, then removes ``NAME.old``. A directory only ever gets the name ``NAME`` or ``NAME.old`` once
complete, so the invariant is: **at every instant ``NAME`` is a complete checkpoint, or ``NAME`` is absent and
``NAME.old`` is (a kill between the two renames)**. ``load_checkpoint`` falls back to ``NAME.old`` in that
case, and the next save cleans up a stale ``NAME.old`` and staging directories. A kill -9 during a save
therefore never loses the previous checkpoint.
"""
from __future__ import annotations

import json
import numbers
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
import torch
from torch import Tensor

from capkit.digests import json_sha256, state_sha256
from capkit.engine.run_dir import (
    CHECKPOINT_JSON,
    CHECKPOINT_MODEL,
    CHECKPOINT_TENSORS,
    backup_of,
    is_complete,
    resolve_checkpoint,
    staging_prefix,
)
from capkit.errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_step", "resolve_checkpoint", "check_finite",
           "json_sha256", "state_sha256", "weights_metadata", "weights_match_digest", "FORMAT_VERSION",
           "VOCAB_DIGEST", "WEIGHTS_DIGEST"]

FORMAT_VERSION = 1
# The model file's metadata records the digest of ``state["vocab"]`` (in state.json): the word list must stay
# the one the weights were trained with.
VOCAB_DIGEST = "vocab_sha256"
# ... and the digest of its own tensors (``state_sha256``): weights damaged on disk no longer match, even where
# every value stays finite
WEIGHTS_DIGEST = "weights_sha256"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to the checkpoint directory ``path`` (replacing any previous one).

    Args:
        state: ``{"model": state_dict, ...}``; the values may nest dicts (any key type), lists, tuples (read
            back as lists), tensors, numbers, strings, bools and None.

    Returns:
        ``path``.
    """
    path = Path(path)
    if "model" not in state:
        raise KeyError("a checkpoint state needs a 'model' state dict")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    old = backup_of(path)
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(path), dir=path.parent))
    try:
        model = {k: _cpu(v) for k, v in state["model"].items()}
        tensors: dict[str, Tensor] = {}
        rest = {k: _encode(v, k, tensors) for k, v in state.items() if k != "model"}
        metadata = {"format": str(FORMAT_VERSION), WEIGHTS_DIGEST: state_sha256(model)}
        if isinstance(state.get("vocab"), (list, tuple)):
            metadata[VOCAB_DIGEST] = json_sha256(list(state["vocab"]))
        _write(tmp / CHECKPOINT_MODEL, lambda f: save_file(model, f, metadata=metadata))
        tensors_metadata = {WEIGHTS_DIGEST: state_sha256(tensors)}
        _write(tmp / CHECKPOINT_TENSORS, lambda f: save_file(tensors, f, metadata=tensors_metadata))
        text = json.dumps({"format": FORMAT_VERSION, "state": rest})
        _write(tmp / CHECKPOINT_JSON, lambda f: Path(f).write_text(text))
        _fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; tensors are on the CPU.

    Raises:
        CheckpointNotFoundError: no complete checkpoint at ``path``.
        CheckpointError: a file of it is damaged (cut short, edited) or of another format.
    """
    path = resolve_checkpoint(path)
    try:
        doc = _read_json(path)
        tensors = load_file(path / CHECKPOINT_TENSORS)
        if not weights_match_digest(tensors, weights_metadata(path / CHECKPOINT_TENSORS)):
            raise CheckpointError(
                f"{path}: its training state is not the one saved ({CHECKPOINT_TENSORS} records another digest): the "
                f"file is damaged or was edited; use another checkpoint (checkpoints/last and checkpoints/best are "
                f"separate copies) or train again"
            )
        state = {k: _decode(v, tensors) for k, v in doc["state"].items()}
        state["model"] = load_file(path / CHECKPOINT_MODEL)
        metadata = weights_metadata(path / CHECKPOINT_MODEL)
        if not weights_match_digest(state["model"], metadata):
            raise CheckpointError(
                f"{path}: its weights are not the ones saved ({CHECKPOINT_MODEL} records another digest): the file is "
                f"damaged or was edited; use another checkpoint (checkpoints/last and checkpoints/best are separate "
                f"copies) or train again"
            )
        check_finite(state["model"], path)
        _check_vocab_digest(path, state.get("vocab"), metadata)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            f"{path}: the checkpoint is damaged ({type(err).__name__}: {err}); use another one (checkpoints/last "
            f"and checkpoints/best are separate copies) or train again"
        ) from err
    return state


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The global step a checkpoint was saved at, from its ``state.json`` alone (no tensor is read)."""
    path = resolve_checkpoint(path)
    try:
        return _read_json(path)["state"].get("global_step")
    except (OSError, ValueError, KeyError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the checkpoint is damaged ({type(err).__name__}: {err})") from err


def _read_json(path: Path) -> dict[str, Any]:
    """A complete checkpoint's ``state.json``, checked for its format version."""
    doc = json.loads((path / CHECKPOINT_JSON).read_text())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this capkit reads format {FORMAT_VERSION}")
    if not isinstance(doc.get("state"), dict):
        raise CheckpointError(f"{path}: the checkpoint is damaged ({CHECKPOINT_JSON} holds no state mapping); use "
                              f"another one (checkpoints/last and checkpoints/best are separate copies) or train again")
    return doc


def weights_metadata(file: Path) -> dict[str, str]:
    """The metadata of the safetensors ``file`` (empty where it has none)."""
    with safe_open(file, "pt") as f:
        return f.metadata() or {}


def weights_match_digest(weights: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bool:
    """Whether ``weights`` are the tensors the ``WEIGHTS_DIGEST`` of their file's ``metadata`` records (true for
    files written before the digest was recorded)."""
    recorded = metadata.get(WEIGHTS_DIGEST)
    return recorded is None or state_sha256(weights) == recorded


def _check_vocab_digest(path: Path, vocab: Any, metadata: Mapping[str, str]) -> None:
    """``state["vocab"]`` is the list the weights (with the model file's ``metadata``) were saved with (checkpoints
    from before the digest pass; one that is no list is refused by its reader, naming its type)."""
    recorded = metadata.get(VOCAB_DIGEST)
    if recorded is not None and isinstance(vocab, list) and json_sha256(vocab) != recorded:
        raise CheckpointError(
            f"{path}: the vocabulary in {CHECKPOINT_JSON} is not the one its weights were saved with ({CHECKPOINT_MODEL} "
            f"records another digest): it was edited or comes from another checkpoint; use another checkpoint "
            f"(checkpoints/last and checkpoints/best are separate copies) or train again"
        )


def check_finite(weights: Mapping[str, Tensor], where: object) -> None:
    """Refuse weights holding NaN or infinity: a model that diverged captions nothing, and trains no further.

    Raises:
        CheckpointError: naming the first such tensor and how many values are bad.
    """
    for key, tensor in weights.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(
                    f"{where}: the weights hold non-finite values (NaN or infinity: {bad} of {tensor.numel()} in "
                    f"{key}); training diverged before it was saved: use an earlier checkpoint, or train again with "
                    f"a lower train.lr"
                )


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage


def _encode(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able form of ``obj``; tensors move to ``tensors`` under their path ``key``."""
    if isinstance(obj, Tensor):
        tensors[key] = _cpu(obj)
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    raise TypeError(
        f"cannot store {type(obj).__name__} at {key!r} in a checkpoint: only tensors, numbers, strings, bools, "
        f"None, lists and dicts are allowed (nothing that would need pickle to load)"
    )


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _write(path: Path, write) -> None:
    write(str(path))
    _fsync(path)


def _fsync_dir(path: Path) -> None:
    if os.name != "nt":  # directories cannot be opened for fsync on Windows
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(path: Path) -> None:
    """Leftovers of a save killed earlier: staging directories, and ``NAME.old`` when ``NAME`` is complete."""
    for tmp in path.parent.glob(f"{staging_prefix(path)}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    old = backup_of(path)
    if old.exists() and is_complete(path):
        shutil.rmtree(old)
