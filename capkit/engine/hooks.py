"""Training hooks: evaluation, logging, checkpoints, LR schedules, early stopping, encoder fine-tuning.

Every hook method receives the trainer (no back-reference is stored). Hooks run in list order; put
``CheckpointHook`` last so the checkpoint holds what the other hooks did at the end of the epoch.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.tensorboard import SummaryWriter

from capkit.engine.checkpoint import save_checkpoint
from capkit.engine.distributed import broadcast_object
from capkit.engine.optim import ENCODER_GROUP, param_group, set_requires_grad
from capkit.engine.rng import get_rng_state, set_rng_state

if TYPE_CHECKING:
    from torch import nn

    from capkit.engine.trainer import Trainer

__all__ = [
    "Hook",
    "EvalHook",
    "LoggingHook",
    "CheckpointHook",
    "EarlyStoppingHook",
    "LRSchedulerHook",
    "EncoderFinetuneHook",
]

MODES = ("max", "min")


class Hook:
    """Base hook: override any subset of the events. ``state_dict`` is saved in checkpoints under ``name``."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def before_train(self, trainer: Trainer) -> None: ...
    def before_epoch(self, trainer: Trainer) -> None: ...
    def after_step(self, trainer: Trainer, loss: float) -> None: ...
    def after_epoch(self, trainer: Trainer) -> None: ...
    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def after_train(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class EvalHook(Hook):
    """Every ``every_epochs`` epochs (and after the last), evaluate on rank 0 and announce ``after_eval``; a run
    that stops on its step budget (``max_steps``) inside an epoch is evaluated where it stops.

    The metrics are broadcast to every rank, so schedules and early stopping agree across ranks. The RNG
    state is saved around the evaluation, so evaluating never changes the training's random numbers.

    Args:
        evaluate_fn: ``(model) -> {"cider": 0.91, ...}``, e.g. a closure over ``run_evaluation``; it gets the
            unwrapped model in eval mode under ``torch.no_grad``.
        every_epochs: evaluation period in epochs.
    """

    def __init__(self, evaluate_fn: Callable[[nn.Module], Mapping[str, float]], every_epochs: int = 1):
        if every_epochs < 1:
            raise ValueError(f"every_epochs must be >= 1, got {every_epochs}")
        self.evaluate_fn = evaluate_fn
        self.every_epochs = every_epochs

    def after_epoch(self, trainer: Trainer) -> None:
        done = trainer.epoch + 1
        if done % self.every_epochs and done != trainer.epochs:
            return
        self._announce(trainer)

    def after_train(self, trainer: Trainer) -> None:
        budget = trainer.max_steps is not None and trainer.global_step >= trainer.max_steps
        if trainer.error is None and budget and trainer.batch_in_epoch:
            self._announce(trainer)

    def _announce(self, trainer: Trainer) -> None:
        metrics = self._evaluate(trainer.module) if trainer.is_main else None
        trainer.call("after_eval", metrics=broadcast_object(metrics))

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        rng, was_training = get_rng_state(), model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = self.evaluate_fn(model)
        finally:
            model.train(was_training)
            set_rng_state(rng)
        return {k: float(v) for k, v in metrics.items()}


class LoggingHook(Hook):
    """Writes ``RUN_DIR/metrics.jsonl`` (one JSON object per line) and TensorBoard events (rank 0 only).

    Step lines: ``{"step", "epoch", "loss", "loss/<part>", "lr", "lr/<group>", "captions_s"}`` every
    ``every_steps`` steps (``captions_s``: this process's training captions per second since the previous line);
    evaluation lines: ``{"step", "epoch", "val/<metric>": ...}``. On resume, lines past the checkpoint's step
    (written by the interrupted run after its last checkpoint) are dropped, so the file has no duplicates.
    """

    def __init__(self, run_dir: str | os.PathLike, every_steps: int = 10):
        self.run_dir = Path(run_dir)
        self.every_steps = every_steps
        self._file = None
        self._writer: SummaryWriter | None = None
        self._since: tuple[float, int] = (0.0, 0)  # (time, captions seen) at the previous step line

    def before_train(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        kept = [line for line in _read_lines(path) if _step_of(line) <= trainer.global_step]
        path.write_text("".join(kept))
        self._file = path.open("a")
        self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=trainer.global_step or None)
        self._since = (time.perf_counter(), trainer.captions_seen)

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if self._file is None or trainer.global_step % self.every_steps:
            return
        record = {"loss": loss, **{f"loss/{k}": v for k, v in trainer.loss_parts.items()}}
        for i, group in enumerate(trainer.optimizer.param_groups):
            record["lr" if i == 0 else f"lr/{group.get('name', i)}"] = group["lr"]
        now, (then, seen) = time.perf_counter(), self._since
        record["captions_s"] = (trainer.captions_seen - seen) / max(now - then, 1e-9)
        self._since = (now, trainer.captions_seen)
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


class CheckpointHook(Hook):
    """Saves ``RUN_DIR/checkpoints/last`` after every epoch (and every ``every_steps`` steps), and
    ``RUN_DIR/checkpoints/best`` after an epoch whose evaluation improved ``metric``. Rank 0 only.

    A run that ends without error between two checkpoints (``max_steps``) saves ``last`` at the end too, and
    ``best`` when the evaluation at its stop (``EvalHook``) improved ``metric``.

    Args:
        run_dir: the run's directory.
        metric: validation metric that selects ``best`` (None: no ``best``).
        mode: ``max`` if larger is better, else ``min``.
        every_steps: also save ``last`` every this many steps (needed to resume inside an epoch).
        config: the resolved experiment config (plain dict), stored in every checkpoint.
        vocab: the vocabulary (its word list or dict form), stored in every checkpoint.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        metric: str | None = None,
        mode: str = "max",
        every_steps: int | None = None,
        config: Mapping[str, Any] | None = None,
        vocab: Any = None,
    ):
        _check_mode(mode)
        self.dir = Path(run_dir) / "checkpoints"
        self.metric, self.mode, self.every_steps = metric, mode, every_steps
        self.config, self.vocab = config, vocab
        self.best: float | None = None
        self._improved = False
        self._saved_step: int | None = None

    def before_train(self, trainer: Trainer) -> None:
        if trainer.hooks[-1] is not self:
            raise ValueError(
                "CheckpointHook must be the last hook: a checkpoint must hold what the other hooks did at the "
                f"end of the epoch (evaluation, LR schedule, early stopping); hooks are {[h.name for h in trainer.hooks]}"
            )

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if self.every_steps and trainer.global_step % self.every_steps == 0:
            self.save(trainer, "last")

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.metric is None:
            return
        value = _metric(metrics, self.metric, self.name)
        if _improves(value, self.best, self.mode):
            self.best, self._improved = value, True

    def after_epoch(self, trainer: Trainer) -> None:
        self.save(trainer, "last")
        self._save_best_if_improved(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.error is not None:
            return
        if self._saved_step != trainer.global_step:
            self.save(trainer, "last")
        self._save_best_if_improved(trainer)

    def _save_best_if_improved(self, trainer: Trainer) -> None:
        if self._improved:
            self.save(trainer, "best")
            self._improved = False

    def save(self, trainer: Trainer, name: str) -> None:
        """Write checkpoint ``name`` of the trainer's current state (on rank 0; a no-op elsewhere)."""
        self._saved_step = trainer.global_step
        if trainer.is_main:
            state = {**trainer.state_dict(), "config": self.config, "vocab": self.vocab}
            save_checkpoint(self.dir / name, state)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]


class EarlyStoppingHook(Hook):
    """Stops training when ``metric`` has not improved for ``patience`` evaluations in a row."""

    def __init__(self, metric: str, patience: int, mode: str = "max"):
        _check_mode(mode)
        self.metric, self.patience, self.mode = metric, patience, mode
        self.best: float | None = None
        self.bad_evals = 0

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = _metric(metrics, self.metric, self.name)
        if _improves(value, self.best, self.mode):
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            trainer.request_stop(
                f"early stopping: {self.metric} has not improved on {self.best} for {self.bad_evals} evaluations"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]


class LRSchedulerHook(Hook):
    """Steps an LR scheduler (``build_scheduler``): ReduceLROnPlateau on each evaluation's ``metric``, any
    other scheduler once per epoch. Its state is saved in checkpoints."""

    def __init__(self, scheduler: LRScheduler | ReduceLROnPlateau, metric: str | None = None):
        self.plateau = isinstance(scheduler, ReduceLROnPlateau)
        if self.plateau and metric is None:
            raise ValueError("a ReduceLROnPlateau schedule needs the validation metric it watches (metric=...)")
        self.scheduler, self.metric = scheduler, metric

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.plateau:
            self.scheduler.step(_metric(metrics, self.metric, self.name))

    def after_epoch(self, trainer: Trainer) -> None:
        if not self.plateau:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(dict(state))


class EncoderFinetuneHook(Hook):
    """Keeps the optimizer's ``encoder`` group (see ``build_optimizer``) frozen before epoch ``from_epoch``
    and trains it from then on. A frozen ``TimmEncoder`` also stays in eval mode and runs without grad."""

    def __init__(self, from_epoch: int):
        self.from_epoch = from_epoch

    def before_train(self, trainer: Trainer) -> None:
        try:
            param_group(trainer.optimizer, ENCODER_GROUP)
        except KeyError as err:
            raise ValueError(
                f"encoder fine-tuning from epoch {self.from_epoch} was asked for, but the optimizer has no "
                f"'{ENCODER_GROUP}' group: build the encoder with finetune: last or all, then build_optimizer"
            ) from err

    def before_epoch(self, trainer: Trainer) -> None:
        params = param_group(trainer.optimizer, ENCODER_GROUP)["params"]
        set_requires_grad(params, trainer.epoch >= self.from_epoch)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'max' (larger is better) or 'min', got {mode!r}")


def _metric(metrics: Mapping[str, float], name: str, hook: str) -> float:
    if name not in metrics:
        raise KeyError(f"{hook} watches metric {name!r}, but the evaluation returned only {sorted(metrics)}")
    return metrics[name]


def _improves(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a kill counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf
