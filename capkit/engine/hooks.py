"""Training hooks: evaluation, checkpoints, LR schedules, early stopping, encoder fine-tuning, DDP wrapping.

Every hook method receives the trainer (no back-reference is stored). Hooks run in list order; the checkpoint
hooks come last, so that a checkpoint holds what the other hooks did at the end of the epoch. Logging and the
progress bar are in ``capkit.engine.monitor``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from capkit.engine.checkpoint import save_checkpoint
from capkit.engine.distributed import broadcast_object, world_size
from capkit.engine.optim import ENCODER_GROUP, param_group, set_requires_grad
from capkit.engine.rng import get_rng_state, set_rng_state
from capkit.engine.run_dir import BEST, LAST, RunDir
from capkit.engine.trainer import Hook, Trainer

__all__ = [
    "EvalHook",
    "PeriodicCheckpointHook",
    "BestCheckpointHook",
    "EarlyStoppingHook",
    "LRSchedulerHook",
    "EncoderFinetuneHook",
    "DistributedDataParallelHook",
]

MODES = ("max", "min")


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
        metrics = self._evaluate(trainer.eval_module) if trainer.is_main else None
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


class _CheckpointHook(Hook):
    """Writes checkpoints of the trainer's state into ``RUN_DIR/checkpoints`` (rank 0 only), with the run's
    config and vocabulary, which loading a checkpoint for captioning needs.

    Args:
        run_dir: the run's directory (``RunDir`` or a path).
        config: the resolved experiment config (plain dict), stored in every checkpoint.
        vocab: the vocabulary (its word list or dict form), stored in every checkpoint.
    """

    def __init__(
        self, run_dir: RunDir | str | os.PathLike, *, config: Mapping[str, Any] | None = None, vocab: Any = None
    ):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.config, self.vocab = config, vocab

    def before_train(self, trainer: Trainer) -> None:
        first = next(i for i, h in enumerate(trainer.hooks) if isinstance(h, _CheckpointHook))
        if not all(isinstance(h, _CheckpointHook) for h in trainer.hooks[first:]):
            raise ValueError(
                "the checkpoint hooks must come after every other hook: a checkpoint must hold what the other hooks "
                f"did at the end of the epoch (evaluation, LR schedule, early stopping); hooks are "
                f"{[h.name for h in trainer.hooks]}"
            )

    def save(self, trainer: Trainer, name: str) -> None:
        """Write checkpoint ``name`` of the trainer's current state (on rank 0; a no-op elsewhere)."""
        if trainer.is_main:
            state = {**trainer.state_dict(), "config": self.config, "vocab": self.vocab}
            save_checkpoint(self.run.checkpoint(name), state)


class PeriodicCheckpointHook(_CheckpointHook):
    """Saves ``checkpoints/last`` after every epoch, every ``every_steps`` steps (to resume inside an epoch),
    and at the end of a run that stops without error between two of these (``max_steps``).

    Args: ``run_dir``, ``config``, ``vocab`` (see ``_CheckpointHook``); ``every_steps``: None saves per epoch only.
    """

    def __init__(self, run_dir: RunDir | str | os.PathLike, *, every_steps: int | None = None, **contents: Any):
        super().__init__(run_dir, **contents)
        self.every_steps = every_steps
        self._saved_step: int | None = None

    def save(self, trainer: Trainer, name: str = LAST) -> None:
        self._saved_step = trainer.global_step
        super().save(trainer, name)

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if self.every_steps and trainer.global_step % self.every_steps == 0:
            self.save(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        self.save(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.error is None and self._saved_step != trainer.global_step:
            self.save(trainer)


class BestCheckpointHook(_CheckpointHook):
    """Saves ``checkpoints/best`` after an epoch whose evaluation improved ``metric`` (and at the end of a run
    that stops on ``max_steps`` inside an epoch, when the evaluation at its stop improved it).

    Args:
        run_dir, config, vocab: see ``_CheckpointHook``.
        metric: the validation metric that selects ``best``.
        mode: ``max`` if larger is better, else ``min``.
    """

    aliases = ("CheckpointHook",)  # one hook saved both checkpoints before: runs it checkpointed resume here

    def __init__(self, run_dir: RunDir | str | os.PathLike, *, metric: str, mode: str = "max", **contents: Any):
        _check_mode(mode)
        super().__init__(run_dir, **contents)
        self.metric, self.mode = metric, mode
        self.best: float | None = None
        self._improved = False

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = _metric(metrics, self.metric, self.name)
        if _improves(value, self.best, self.mode):
            self.best, self._improved = value, True

    def after_epoch(self, trainer: Trainer) -> None:
        self._save_if_improved(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.error is None:
            self._save_if_improved(trainer)

    def _save_if_improved(self, trainer: Trainer) -> None:
        if self._improved:
            self.save(trainer, BEST)
            self._improved = False

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
    """Steps an LR scheduler (``build_scheduler``): ReduceLROnPlateau on each evaluation's ``metric``, a
    ``per_step`` one (warm-up schedules) after every optimizer step, any other once per epoch. Its state is
    saved in checkpoints."""

    def __init__(self, scheduler: LRScheduler | ReduceLROnPlateau, metric: str | None = None, per_step: bool = False):
        self.plateau = isinstance(scheduler, ReduceLROnPlateau)
        if self.plateau and metric is None:
            raise ValueError("a ReduceLROnPlateau schedule needs the validation metric it watches (metric=...)")
        self.scheduler, self.metric, self.per_step = scheduler, metric, per_step

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.plateau:
            self.scheduler.step(_metric(metrics, self.metric, self.name))

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self, trainer: Trainer) -> None:
        if not self.plateau and not self.per_step:
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


class DistributedDataParallelHook(Hook):
    """Wraps the model in DistributedDataParallel when several ranks train (``trainer.model``; hooks keep using
    ``trainer.module``), and wraps it again before an epoch whose set of trainable parameters changed: DDP
    registers the parameters that require grad at construction (e.g. before encoder fine-tuning starts).
    Put it after the hooks that change what trains (``EncoderFinetuneHook``)."""

    def __init__(self) -> None:
        self._trainable: tuple[bool, ...] | None = None

    def before_epoch(self, trainer: Trainer) -> None:
        if world_size() == 1:
            return
        trainable = tuple(p.requires_grad for p in trainer.module.parameters())
        if trainable != self._trainable:
            ids = [trainer.device.index] if trainer.device.type == "cuda" else None
            trainer.model = DistributedDataParallel(trainer.module, device_ids=ids)
            self._trainable = trainable


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
