"""What a run shows while it trains: ``metrics.jsonl`` and TensorBoard (``LoggingHook``), and a progress bar."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from capkit.engine.replay import batches_per_epoch
from capkit.engine.run_dir import RunDir
from capkit.engine.trainer import Hook, Trainer

__all__ = ["Throughput", "LoggingHook", "ProgressBarHook"]


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

    def __init__(self, run_dir: RunDir | str | os.PathLike, every_steps: int = 10):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.every_steps = every_steps
        self._file = None
        self._writer: SummaryWriter | None = None
        self._throughput = Throughput()  # since the previous step line

    def before_train(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        self.run.root.mkdir(parents=True, exist_ok=True)
        path = self.run.metrics
        kept = [line for line in _read_lines(path) if _step_of(line) <= trainer.global_step]
        path.write_text("".join(kept))
        self._file = path.open("a")
        self._writer = SummaryWriter(str(self.run.tensorboard), purge_step=trainer.global_step or None)
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
            self._writer.close()
            self._file = self._writer = None


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
