"""What a run shows while it trains: ``metrics.jsonl`` and TensorBoard scalars (``LoggingHook``), the run's
hyperparameters (``HParamsHook``), a few validation images' captions and attention figures (``CaptionSamplesHook``),
and a progress bar.

The hooks that write TensorBoard events share one writer (``TensorBoard``), so that the run's events are one file
in one folder. tensorboard is imported when that writer opens, as training starts: captioning needs no tensorboard.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from capkit.engine.replay import batches_per_epoch
from capkit.engine.rng import get_rng_state, set_rng_state
from capkit.engine.run_dir import RunDir
from capkit.engine.trainer import Hook, Trainer
from capkit.errors import MissingDependencyError
from capkit.visualization.attention import caption_figure_array

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "Throughput",
    "TensorBoard",
    "LoggingHook",
    "HParamsHook",
    "CaptionSample",
    "CaptionSamplesHook",
    "ProgressBarHook",
    "flatten_hparams",
]

INSTALL_TRAIN = "training writes TensorBoard logs: pip install 'capkit-captioning[train]'"


def _summary_writer_class() -> type[SummaryWriter]:
    """``torch.utils.tensorboard.SummaryWriter``, imported now; ``MissingDependencyError`` without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingDependencyError(INSTALL_TRAIN) from err
    return SummaryWriter


class TensorBoard:
    """The run's one TensorBoard writer on ``RUN_DIR/tensorboard``, shared by the hooks that write events (rank 0).

    Each hook ``open``s it in ``before_train`` and ``close``s it in ``after_train``: the first ``open`` creates the
    ``SummaryWriter`` (importing tensorboard; a resumed run's events past ``purge_step`` are hidden), the last
    ``close`` closes it. One writer keeps the run's events in one file and applies the purge step once.
    """

    def __init__(self, run_dir: RunDir | str | os.PathLike):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self._writer: SummaryWriter | None = None
        self._users = 0

    def open(self, purge_step: int | None = None) -> SummaryWriter:
        if self._writer is None:
            self._writer = _summary_writer_class()(str(self.run.tensorboard), purge_step=purge_step or None)
        self._users += 1
        return self._writer

    @property
    def writer(self) -> SummaryWriter:
        if self._writer is None:
            raise RuntimeError("the TensorBoard writer is not open: a hook opens it in before_train (rank 0)")
        return self._writer

    def close(self) -> None:
        self._users = max(self._users - 1, 0)
        if not self._users and self._writer is not None:
            self._writer.close()
            self._writer = None


class Throughput:
    """Training captions per second of this process between two readings of ``trainer.captions_seen``."""

    def __init__(self) -> None:
        self._since = (time.perf_counter(), 0)

    def reset(self, seen: int) -> None:
        self._since = (time.perf_counter(), seen)

    def rate(self, seen: int) -> float:
        """Captions per second since the last ``reset``."""
        then, before = self._since
        return (seen - before) / max(time.perf_counter() - then, 1e-9)


class LoggingHook(Hook):
    """Writes ``RUN_DIR/metrics.jsonl`` (one JSON object per line) and TensorBoard events (rank 0 only).

    Step lines: ``{"step", "epoch", "loss", "loss/<part>", "lr", "lr/<group>", "captions_s"}`` every
    ``every_steps`` steps (``captions_s``: this process's training captions per second since the previous line);
    evaluation lines: ``{"step", "epoch", "val/<metric>": ...}``. On resume, lines past the checkpoint's step
    (written by the interrupted run after its last checkpoint) are dropped, so the file has no duplicates.
    """

    def __init__(
        self, run_dir: RunDir | str | os.PathLike, every_steps: int = 10, *, tensorboard: TensorBoard | None = None
    ):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.every_steps = every_steps
        self.tensorboard = tensorboard or TensorBoard(self.run)  # pass one to share it with other hooks
        self._file = None
        self._writer: SummaryWriter | None = None
        self._throughput = Throughput()  # since the previous step line

    def before_train(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        self.run.root.mkdir(parents=True, exist_ok=True)
        self._writer = self.tensorboard.open(trainer.global_step)  # first: without tensorboard, nothing is written
        path = self.run.metrics
        kept = [line for line in _read_lines(path) if _step_of(line) <= trainer.global_step]
        path.write_text("".join(kept))
        self._file = path.open("a")
        self._throughput.reset(trainer.captions_seen)

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if self._file is None or trainer.global_step % self.every_steps:
            return
        record = {"loss": loss, **{f"loss/{k}": v for k, v in trainer.loss_parts.items()}}
        for i, group in enumerate(trainer.optimizer.param_groups):
            record["lr" if i == 0 else f"lr/{group.get('name', i)}"] = group["lr"]
        record["captions_s"] = self._throughput.rate(trainer.captions_seen)
        self._throughput.reset(trainer.captions_seen)
        self._log(trainer, record)

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self._file is not None:
            self._log(trainer, {f"val/{k}": v for k, v in metrics.items()})

    def _log(self, trainer: Trainer, values: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": trainer.global_step, "epoch": trainer.epoch, **values}) + "\n")
        self._file.flush()
        for key, value in values.items():
            self._writer.add_scalar(key, value, trainer.global_step)

    def after_train(self, trainer: Trainer) -> None:
        if self._file is not None:
            self._file.close()
            self.tensorboard.close()
            self._file = self._writer = None


class HParamsHook(Hook):
    """Writes the run's hyperparameters for TensorBoard's HParams dashboard, and its config as text (rank 0).

    They go into the run's own folder, beside its scalars, so that the dashboard shows each run once with its
    settings and the metrics it is compared by: ``metrics`` (tags such as ``val/cider``, logged by
    ``LoggingHook``; the dashboard shows their latest value) and ``best/<best>``, the best value of the selection
    metric so far, which this hook logs after each evaluation. (``SummaryWriter.add_hparams`` would instead write a
    sub-run of its own per call, holding only the values passed to it.) The session is marked finished when
    training ends without an error.

    Args:
        tensorboard: the run's writer (shared with ``LoggingHook``).
        hparams: name -> bool, int, float or str (``flatten_hparams``).
        metrics: the scalar tags the dashboard lists for each run.
        best: the selection metric (a key of the evaluation's metrics), or None. mode: ``max`` or ``min``.
        text: markdown written as the ``config`` text entry, or None.
    """

    def __init__(
        self, tensorboard: TensorBoard, hparams: Mapping[str, Any], *, metrics: Sequence[str] = (),
        best: str | None = None, mode: str = "max", text: str | None = None,
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' (larger is better) or 'min', got {mode!r}")
        self.tensorboard, self.hparams, self.text = tensorboard, dict(hparams), text
        self.metrics = [*metrics, *([f"best/{best}"] if best else [])]
        self.metric, self.mode = best, mode
        self.best: float | None = None
        self._end = None  # the session-end summary, written when training ends without an error

    def before_train(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        writer = self.tensorboard.open(trainer.global_step)
        from torch.utils.tensorboard.summary import hparams

        experiment, start, self._end = hparams(self.hparams, dict.fromkeys(self.metrics, 0.0))
        writer.file_writer.add_summary(experiment, trainer.global_step)
        writer.file_writer.add_summary(start, trainer.global_step)
        if self.text is not None:
            writer.add_text("config", self.text, trainer.global_step)

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self._end is None or self.metric is None or self.metric not in metrics:
            return
        value = metrics[self.metric]
        if not math.isnan(value) and (
            self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        ):
            self.best = value
        if self.best is not None:
            self.tensorboard.writer.add_scalar(f"best/{self.metric}", self.best, trainer.global_step)

    def after_train(self, trainer: Trainer) -> None:
        if self._end is None:
            return
        if trainer.error is None:
            self.tensorboard.writer.file_writer.add_summary(self._end, trainer.global_step)
        self.tensorboard.close()
        self._end = None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")


def flatten_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested settings as HParams values: ``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists (and
    anything else not a scalar) as their JSON text or ``str``; None left out (the dashboard shows it blank)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value), default=str)
        elif value is not None:
            flat[name] = str(value)
    return flat


@dataclass
class CaptionSample:
    """A validation image that ``CaptionSamplesHook`` captions at every evaluation."""

    image_id: str
    image: Image.Image  # the picture as opened (the attention figure is drawn over it)
    pixels: torch.Tensor  # (3, H, W): ``image`` through the encoder's evaluation transform
    references: list[str]


class CaptionSamplesHook(Hook):
    """After each evaluation (rank 0), captions the same few images with beam search and writes, at the trainer's
    global step, ``samples/<i>/caption`` (text: the caption, the image id and the references, in markdown) and
    ``samples/<i>/attention`` (image: the per-word attention figure, ``capkit.visualization.caption_figure``).

    The images are given as pixels, so the hook works whether training reads images or cached features. It does
    not change training: no gradient, the model's train/eval mode and every random state are restored.

    Args:
        tensorboard: the run's writer (shared with ``LoggingHook``).
        samples: the images, in a fixed order (``samples/<i>`` is ``samples[i]`` at every evaluation).
        decode: token ids -> caption text (``Vocabulary.decode``). words: id -> word (``Vocabulary.itos``).
        data_config: the encoder's preprocessing (``encoder.data_config``), which decides the part of the image
            the maps are laid over.
        decoding: beam search settings (``capkit.config.decoding_settings``: beam size, length penalty, ...).
        figure: ``caption_figure`` options (``columns``, ``panel_size``) and ``dpi``.
    """

    def __init__(
        self, tensorboard: TensorBoard, samples: Sequence[CaptionSample], *, decode: Callable[[list[int]], str],
        words: Sequence[str], data_config: Mapping[str, Any], decoding: Mapping[str, Any],
        figure: Mapping[str, Any] | None = None,
    ):
        self.tensorboard, self.samples, self.decode, self.words = tensorboard, list(samples), decode, list(words)
        self.data_config, self.decoding = dict(data_config), dict(decoding)
        self.figure = {"columns": 6, "panel_size": 2.0, "dpi": 80, **(figure or {})}
        self._open = False

    def before_train(self, trainer: Trainer) -> None:
        if trainer.is_main and self.samples:
            self.tensorboard.open(trainer.global_step)
            self._open = True

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not self._open:
            return
        model, step, writer = trainer.eval_module, trainer.global_step, self.tensorboard.writer
        images = torch.stack([s.pixels for s in self.samples]).to(trainer.device)
        rng, was_training = get_rng_state(), model.training
        model.eval()
        try:
            with torch.no_grad():
                generation = model.generate(images, **self.decoding)
        finally:
            model.train(was_training)
            set_rng_state(rng)
        for i, (sample, hypothesis) in enumerate(zip(self.samples, generation.best)):
            caption = self.decode(hypothesis.tokens)
            writer.add_text(f"samples/{i}/caption", _sample_markdown(sample, caption), step)
            figure = caption_figure_array(
                sample.image, hypothesis, generation.grid, words=self.words, data_config=self.data_config,
                title=caption, **self.figure,
            )
            writer.add_image(f"samples/{i}/attention", figure, step, dataformats="HWC")
        writer.flush()

    def after_train(self, trainer: Trainer) -> None:
        if self._open:
            self.tensorboard.close()
            self._open = False


def _sample_markdown(sample: CaptionSample, caption: str) -> str:
    references = "\n".join(f"- {_markdown_text(r)}" for r in sample.references)
    return (f"**{_markdown_text(caption) or '(empty caption)'}**\n\nimage: {_markdown_text(sample.image_id)}\n\n"
            f"references:\n\n{references}")


def _markdown_text(text: str) -> str:
    """``text`` shown as it is by TensorBoard's markdown renderer: HTML and markup characters escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+!.-])", r"\\\1", html.escape(text, quote=False))


class ProgressBarHook(Hook):
    """A tqdm bar per epoch with the loss and the captions per second since the epoch started (rank 0 only)."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._throughput = Throughput()

    def before_epoch(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        self._bar = tqdm(total=batches_per_epoch(trainer.train_loader), initial=trainer.batch_in_epoch,
                         desc=f"epoch {trainer.epoch}", dynamic_ncols=True)
        self._throughput.reset(trainer.captions_seen)

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if self._bar is not None:
            self._bar.update()
            self._bar.set_postfix(loss=f"{loss:.4f}", captions_s=f"{self._throughput.rate(trainer.captions_seen):.1f}")

    def after_epoch(self, trainer: Trainer) -> None:
        self._close()

    def after_train(self, trainer: Trainer) -> None:
        self._close()  # a run stopped inside an epoch

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a kill counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf
