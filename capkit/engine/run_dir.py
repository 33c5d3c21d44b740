"""The layout of a run directory: every file name of a run is spelled here and nowhere else.

::

    RUN_DIR/
      config.yaml                   the resolved experiment config
      vocab.json                    the vocabulary
      metrics.jsonl                 one JSON object per logged step and per evaluation
      tensorboard/                  TensorBoard events
      checkpoints/last/             the latest training state (every epoch, every N steps, at the end)
      checkpoints/best/             the state after the best evaluation
      train_summary.json            training time (summed over resumed sessions), position, stop reason
      test_metrics.json             the best checkpoint's scores on the test split,
      test_captions.json              its captions (COCO results format)
      test_per_image.json             and its per-image scores
      gallery_<split>/              ``capkit evaluate --gallery`` pages
      result.json                   an ablation run's scores, once it is scored
      .capkit_written.json          the names of the split and gallery files above (what --overwrite removes)
      .lock, .lock.owner            held by the process that trains the run (``RunDir.claim``)

A checkpoint is a directory of ``model.safetensors`` (the model's state dict), ``state.safetensors`` (every other
tensor) and ``state.json`` (the rest). ``capkit.engine.checkpoint`` publishes it atomically: a complete copy is
staged in a hidden sibling (``.NAME.tmp-*``), the previous one is renamed ``NAME.old``, the copy takes the name
``NAME`` and ``NAME.old`` is removed. After a kill between the two renames only ``NAME.old`` is complete, and
``resolve_checkpoint`` falls back to it.

This module imports nothing from capkit but its error classes.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from capkit.errors import CheckpointNotFoundError, RunDirError

__all__ = [
    "RunDir",
    "LAST",
    "BEST",
    "CHECKPOINT_MODEL",
    "CHECKPOINT_TENSORS",
    "CHECKPOINT_JSON",
    "backup_of",
    "staging_prefix",
    "resolve_checkpoint",
]

CHECKPOINT_MODEL, CHECKPOINT_TENSORS, CHECKPOINT_JSON = "model.safetensors", "state.safetensors", "state.json"
LAST, BEST = "last", "best"


def backup_of(checkpoint: str | os.PathLike) -> Path:
    """``NAME.old``: the previous copy of checkpoint ``NAME`` while a save replaces it."""
    path = Path(checkpoint)
    return path.with_name(path.name + ".old")


def staging_prefix(checkpoint: str | os.PathLike) -> str:
    """The name prefix of the hidden directories a save of checkpoint ``NAME`` is staged in."""
    return f".{Path(checkpoint).name}.tmp-"


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` is a published checkpoint directory (its JSON is written last)."""
    return (Path(checkpoint) / CHECKPOINT_JSON).is_file()


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """The complete checkpoint directory for ``checkpoint``: itself, or ``NAME.old`` after a kill mid-save.

    Raises:
        CheckpointNotFoundError: neither is a complete checkpoint.
    """
    path, old = Path(checkpoint), backup_of(checkpoint)
    for candidate in (path, old):
        if is_complete(candidate):
            return candidate
    raise CheckpointNotFoundError(
        f"no checkpoint at {str(path)!r} (nor {old.name!r} beside it): a checkpoint is a directory with "
        f"{CHECKPOINT_MODEL}, {CHECKPOINT_TENSORS} and {CHECKPOINT_JSON}, e.g. RUN_DIR/checkpoints/{LAST}"
    )


class RunDir:
    """Where each artefact of one training run lives, and which of its checkpoints exist.

    Args:
        root: the run directory (``train.output_dir / train.run_name``).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunDir:
        """The run a checkpoint directory (``RUN_DIR/checkpoints/NAME``) belongs to."""
        return cls(Path(checkpoint).parent.parent)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    config = property(lambda self: self.root / "config.yaml")
    vocab = property(lambda self: self.root / "vocab.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    summary = property(lambda self: self.root / "train_summary.json")
    result = property(lambda self: self.root / "result.json")
    checkpoints = property(lambda self: self.root / "checkpoints")

    def checkpoint(self, name: str = LAST) -> Path:
        """The path of checkpoint ``name`` (``last`` or ``best``), whether or not it exists."""
        return self.checkpoints / name

    @property
    def last(self) -> Path:
        return self.checkpoint(LAST)

    @property
    def best(self) -> Path:
        return self.checkpoint(BEST)

    def has_checkpoint(self, name: str = LAST) -> bool:
        """Whether checkpoint ``name`` can be loaded (itself or its ``.old`` copy is complete)."""
        return is_complete(self.checkpoint(name)) or is_complete(backup_of(self.checkpoint(name)))

    def find_checkpoint(self, name: str = LAST) -> Path:
        """The complete directory of checkpoint ``name`` (see ``resolve_checkpoint``)."""
        return resolve_checkpoint(self.checkpoint(name))

    def split_metrics(self, split: str = "test") -> Path:
        return self.root / f"{split}_metrics.json"

    def split_captions(self, split: str = "test") -> Path:
        return self.root / f"{split}_captions.json"

    def split_per_image(self, split: str = "test") -> Path:
        return self.root / f"{split}_per_image.json"

    def gallery(self, split: str) -> Path:
        return self.root / f"gallery_{split}"

    # the run's list of the files it wrote under names of the user's choosing (a split's metrics, captions and
    # per-image scores, a gallery): ``clear`` removes those and no other file that merely looks like them
    written = property(lambda self: self.root / ".capkit_written.json")

    def record(self, *paths: Path) -> None:
        """Add files or folders directly in the run directory to the list of what the run wrote."""
        names = set(self._written_names())
        for path in paths:
            if Path(path).parent.resolve() != self.root.resolve():
                raise ValueError(f"{path} is not directly in the run directory {self.root}")
            names.add(Path(path).name)
        self.written.write_text(json.dumps(sorted(names), indent=1) + "\n")

    def _written_names(self) -> list[str]:
        try:
            names = json.loads(self.written.read_text())
        except (OSError, ValueError):  # none yet; a damaged list protects the user's files: nothing is listed
            return []
        return [n for n in names if isinstance(n, str) and n and Path(n).name == n and n not in (".", "..")]

    def artefacts(self) -> list[Path]:
        """What the run wrote, where it exists: its fixed files and those it listed (``record``); everything
        ``clear`` removes."""
        fixed = [self.config, self.vocab, self.metrics, self.tensorboard, self.checkpoints, self.summary, self.result]
        listed = [self.root / name for name in self._written_names()]
        return [p for p in fixed + listed if p.exists() or p.is_symlink()] + (
            [self.written] if self.written.exists() else [])

    def holds_run(self) -> bool:
        """Whether the directory holds (part of) a capkit run: what only a run writes (its vocabulary, logs,
        summary or checkpoints; a ``config.yaml`` alone may be anyone's)."""
        return any(p.exists() for p in (self.vocab, self.metrics, self.summary)) or any(
            self.has_checkpoint(name) for name in (LAST, BEST))

    def foreign_files(self) -> list[Path]:
        """Files at the names a run writes, in a directory that holds no run: a new run would write over them."""
        if self.holds_run():
            return []
        return [p for p in (self.config, self.tensorboard, self.checkpoints, self.result) if p.exists()]

    def clear(self) -> None:
        """Remove the run's files (replacing a run: ``--overwrite``); other files in the directory stay, and so
        does anything a user put in ``checkpoints/`` or ``tensorboard/`` beside the run's own."""
        for path in self.artefacts():
            if path == self.checkpoints and path.is_dir() and not path.is_symlink():
                self._clear_checkpoints()
            elif path == self.tensorboard and path.is_dir() and not path.is_symlink():
                self._clear_events(path)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _clear_checkpoints(self) -> None:
        """``last`` and ``best``, their ``.old`` copies and staging directories; then the folder, if emptied."""
        for name in (LAST, BEST):
            ours = [self.checkpoint(name), backup_of(self.checkpoint(name)),
                    *self.checkpoints.glob(staging_prefix(name) + "*")]
            for path in ours:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        _remove_if_empty(self.checkpoints)

    @staticmethod
    def _clear_events(folder: Path) -> None:
        """TensorBoard's event files (in the folder and the sub-folders its writers make); then empty folders."""
        for events in folder.rglob("events.out.tfevents.*"):
            events.unlink()
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _remove_if_empty(sub)
        _remove_if_empty(folder)

    _lock = property(lambda self: self.root / ".lock")
    _owner = property(lambda self: self.root / ".lock.owner")

    @contextmanager
    def claim(self) -> Iterator[RunDir]:
        """Hold the run directory for the block: a second process that claims it fails at once, naming the holder.

        The lock is an OS file lock, so it dies with its process; a process that finds the owner file of one
        that died without releasing (``kill -9``) takes the run over with a warning. The lock file itself stays:
        removing it would let a process that waits on it and one that creates it anew both hold the run; only a
        directory this claim created and nothing but the lock was written to goes again (a run that failed before
        it wrote anything leaves no directory, so a retry is no "already holds a run").
        """
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self._lock, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunDirError(
                f"{self.root} is in use by {self._owner_text() or 'another process'}; wait for it to finish, or "
                f"stop it, before training into this run directory"
            ) from None
        try:
            previous = self._owner_text()
            if previous:
                warnings.warn(f"{self.root}: taking over the run from {previous}, which ended without releasing it",
                              stacklevel=3)
            self._owner.write_text(f"process {os.getpid()} on {socket.gethostname()}\n")
            yield self
        finally:
            self._owner.unlink(missing_ok=True)
            try:
                if created and {p.name for p in self.root.iterdir()} == {self._lock.name}:
                    self._lock.unlink()  # still held: no other process can have claimed the run meanwhile
                    self.root.rmdir()
            except OSError:  # another process put a file there meanwhile: the directory is not ours to remove
                pass
            lock.release()

    def _owner_text(self) -> str:
        return self._owner.read_text().strip() if self._owner.is_file() else ""


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
