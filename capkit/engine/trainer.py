"""The Trainer: the training loop, and nothing else. Evaluation, logging, checkpoints, LR schedules and
early stopping are hooks (``capkit.engine.hooks``)."""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, SequentialSampler
from tqdm.auto import tqdm

from capkit.engine.checkpoint import load_checkpoint
from capkit.engine.device import resolve_amp_dtype, resolve_device
from capkit.engine.distributed import is_main_process, world_size
from capkit.engine.hooks import Hook
from capkit.engine.loss import CrossEntropyCriterion, Criterion
from capkit.engine.rng import get_rng_state, set_rng_state
from capkit.types import CaptionBatch

__all__ = ["Trainer"]

HOOK_EVENTS = ("before_train", "before_epoch", "after_step", "after_epoch", "after_eval", "after_train")


class Trainer:
    """Trains a ``Captioner`` on batches of ``CaptionBatch``: captions (B, L) plus images or features for the
    cross-entropy criterion, images or features plus references for the self-critical one.

    Args:
        model: the model; moved to ``device`` (and wrapped in DistributedDataParallel when a process group
            with several ranks is initialised, see ``init_distributed``).
        optimizer: built on ``model``'s parameters (``build_optimizer``).
        train_loader: yields ``CaptionBatch``; its sampler's ``set_epoch(epoch)`` is called before each epoch
            (``build_train_sampler``), which exact resume needs.
        epochs: number of epochs.
        hooks: called in list order at each event; ``CheckpointHook`` must be last.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        grad_clip: clip the gradient norm to this value (None: no clipping).
        amp: ``auto`` | ``bf16`` | ``fp16`` | ``none`` (see ``resolve_amp_dtype``); fp16 uses a GradScaler.
        channels_last: on CUDA, keep images and the model in channels-last memory format.
        criterion: the objective, (model, batch) -> (loss, parts) (``capkit.engine.loss``); default:
            ``CrossEntropyCriterion()``, which has no auxiliary-loss weights (a decoder that returns auxiliary
            losses needs them).
        max_steps: stop after this many optimizer steps in total.
        progress: show a tqdm bar with the loss and captions/s (rank 0 only).

    Attributes:
        epoch, global_step, batch_in_epoch: the position; ``batch_in_epoch`` batches of ``epoch`` are done.
        module: the unwrapped model (``model`` may be its DDP wrapper). Hooks evaluate ``module``.
        loss_parts: the last step's loss parts as the criterion names them (e.g. ``ce`` and the unweighted
            auxiliary losses), floats.
        error: the exception that ended ``fit``, if any (hooks read it in ``after_train``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        *,
        epochs: int,
        hooks: Iterable[Hook] = (),
        device: str | torch.device = "auto",
        grad_clip: float | None = None,
        amp: str = "auto",
        channels_last: bool = True,
        criterion: Criterion | None = None,
        max_steps: int | None = None,
        progress: bool = True,
    ):
        self.device = resolve_device(device)
        self.amp_dtype = resolve_amp_dtype(amp, self.device)
        self.channels_last = channels_last and self.device.type == "cuda"
        self.module = model.to(self.device)
        if self.channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.model: nn.Module = self.module
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.epochs = epochs
        self.hooks = list(hooks)
        names = [h.name for h in self.hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"hook names must be unique (they key the checkpointed hook states), got {names}")
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = criterion or CrossEntropyCriterion()
        self.max_steps = max_steps
        self.progress = progress
        self.epoch = self.global_step = self.batch_in_epoch = 0
        self.captions_seen = 0  # training captions this process has stepped on since it started (throughput)
        self.loss_parts: dict[str, float] = {}
        self.error: BaseException | None = None
        self.stop_reason: str | None = None
        self._epoch_done = False
        self._epoch_rng: dict[str, Any] | None = None  # the RNG states at the start of the current epoch
        self._loader_rng: torch.Tensor | None = None
        self._resume_rng: dict[str, Any] | None = None  # set by load_state_dict until fit reaches that position
        self._trainable: tuple[bool, ...] | None = None

    @property
    def is_main(self) -> bool:
        return is_main_process()

    def call(self, event: str, **kwargs: Any) -> None:
        """Run ``event`` on every hook, in list order."""
        for hook in self.hooks:
            getattr(hook, event)(self, **kwargs)

    def request_stop(self, reason: str) -> None:
        """End training after the current step (early stopping)."""
        self.stop_reason = reason

    def fit(self) -> None:
        """Train from the current position (0, or where ``resume`` left off) to ``epochs`` or ``max_steps``."""
        self.call("before_train")
        try:
            while self.epoch < self.epochs and not self._should_stop():
                self._run_epoch()
        except BaseException as err:
            self.error = err
            raise
        finally:
            self.call("after_train")

    def _should_stop(self) -> bool:
        return self.stop_reason is not None or (self.max_steps is not None and self.global_step >= self.max_steps)

    def _run_epoch(self) -> None:
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        # Exact resume replays the epoch's start with the RNGs as they were then: iter() draws the workers'
        # base seed from the loader's generator (or the global RNG), and skipping the finished batches brings
        # every worker to the same point of its stream. Then the global RNG is set to its state after the
        # checkpoint's step (dropout, in-process data loading).
        generator = getattr(self.train_loader, "generator", None)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng["epoch"])
            if generator is not None and self._resume_rng["loader"] is not None:
                generator.set_state(self._resume_rng["loader"])
        self._epoch_rng = get_rng_state()
        self._loader_rng = None if generator is None else generator.get_state()
        self.call("before_epoch")
        self._sync_parallel()
        self.model.train()
        batches = iter(self.train_loader)
        for _ in range(self.batch_in_epoch):  # resume: skip the batches done before the checkpoint
            next(batches)
        if self._resume_rng is not None:
            if self.batch_in_epoch:
                set_rng_state(self._resume_rng["step"])
            self._resume_rng = None
        bar = tqdm(
            total=_length(self.train_loader), initial=self.batch_in_epoch, desc=f"epoch {self.epoch}",
            disable=not (self.progress and self.is_main), dynamic_ncols=True,
        )
        start, seen_before = time.perf_counter(), self.captions_seen
        with bar:
            for batch in batches:
                loss = self.train_step(batch)
                self.global_step += 1
                self.batch_in_epoch += 1
                self.captions_seen += len(batch)
                bar.update()
                rate = (self.captions_seen - seen_before) / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss:.4f}", captions_s=f"{rate:.1f}")
                self.call("after_step", loss=loss)
                if self._should_stop() and self.batch_in_epoch != _length(self.train_loader):
                    return  # stopped inside the epoch; a stop on its last batch still ends it (evaluation, best)
        self._epoch_done = True
        self.call("after_epoch")
        self.epoch += 1
        self.batch_in_epoch = 0
        self._epoch_done = False

    def train_step(self, batch: CaptionBatch) -> float:
        """One optimizer step on ``batch``; returns the total loss (averaged over ranks)."""
        batch = batch.to(self.device, non_blocking=True)
        if batch.images is not None and self.channels_last:
            batch = dataclasses.replace(batch, images=batch.images.contiguous(memory_format=torch.channels_last))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, parts = self.criterion(self.model, batch)
        value = self._mean_over_ranks(loss.detach())
        if not math.isfinite(value):  # every rank sees the same value, so all stop together
            raise FloatingPointError(
                f"non-finite loss {value} at epoch {self.epoch}, global step {self.global_step + 1} "
                f"(parts: { {k: v.item() for k, v in parts.items()} }); try a lower lr, grad_clip or amp=none"
            )
        self.loss_parts = {k: v.item() for k, v in parts.items()}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value

    @staticmethod
    def _mean_over_ranks(loss: torch.Tensor) -> float:
        if world_size() > 1:
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= world_size()
        return loss.item()

    def _sync_parallel(self) -> None:
        """(Re)wrap the model in DDP when several ranks train and the set of trainable parameters changed
        (DDP registers the parameters that require grad at construction, e.g. before encoder fine-tuning)."""
        if world_size() == 1:
            return
        trainable = tuple(p.requires_grad for p in self.module.parameters())
        if trainable != self._trainable:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
            self._trainable = trainable

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (the checkpoint's content, minus config and vocab)."""
        epoch, batch = (self.epoch + 1, 0) if self._epoch_done else (self.epoch, self.batch_in_epoch)
        rng = get_rng_state()
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {  # see _run_epoch
                "step": rng,
                "epoch": self._epoch_rng if batch else rng,
                "loader": self._loader_rng if batch else _generator_state(self.train_loader),
            },
            "epoch": epoch,
            "batch_in_epoch": batch,
            "global_step": self.global_step,
            "hooks": {h.name: h.state_dict() for h in self.hooks},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; the RNG state is restored when ``fit`` reaches the saved position."""
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = state["global_step"]
        for hook in self.hooks:
            if hook.name in state["hooks"]:
                hook.load_state_dict(state["hooks"][hook.name])
        self._resume_rng = state["rng"]
        sampler = getattr(self.train_loader, "sampler", None)
        if self.batch_in_epoch and not hasattr(sampler, "set_epoch") and not isinstance(sampler, SequentialSampler):
            warnings.warn(
                f"resuming inside epoch {self.epoch}, but the train loader's sampler ({type(sampler).__name__}) has "
                f"no set_epoch: the rest of the epoch will not see the same batches; use build_train_sampler",
                stacklevel=2,
            )
        if getattr(self.train_loader, "persistent_workers", False):
            warnings.warn(
                "the train loader has persistent workers: their random streams are not replayed on resume, so "
                "random augmentations drawn in the workers (if the dataset makes any) differ from the interrupted run's",
                stacklevel=2,
            )

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from the checkpoint directory ``path`` (e.g. ``RUN_DIR/checkpoints/last``)."""
        self.load_state_dict(load_checkpoint(path))


def _generator_state(loader: Any) -> torch.Tensor | None:
    generator = getattr(loader, "generator", None)
    return None if generator is None else generator.get_state()


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable dataset without __len__
        return None
