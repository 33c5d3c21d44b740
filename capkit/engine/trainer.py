"""The Trainer runs the training loop and calls hooks; everything else (evaluation, logging, checkpoints, LR
schedules, early stopping, DDP wrapping) is a hook (``capkit.engine.hooks``)."""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from capkit.engine.checkpoint import load_checkpoint
from capkit.engine.cpu_amp import keep_depthwise_fp32
from capkit.engine.device import resolve_amp_dtype, resolve_device
from capkit.engine.distributed import is_main_process, mean_over_ranks, world_size
from capkit.engine.loss import Criterion, CrossEntropyCriterion
from capkit.engine.replay import EpochReplay, batches_per_epoch
from capkit.errors import TrainingDivergedError
from capkit.types import CaptionBatch

__all__ = ["Trainer", "Hook"]


class Hook:
    """Base hook: override any subset of the events. ``state_dict`` is saved in checkpoints under ``name``
    (and found under an earlier name in ``aliases``)."""

    aliases: tuple[str, ...] = ()

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


class Trainer:
    """Trains a ``Captioner`` on batches of ``CaptionBatch`` (captions plus images or features, or images or
    features plus references for the self-critical criterion).

    Args:
        model: moved to ``device``. optimizer: built on its parameters (``build_optimizer``).
        train_loader: yields ``CaptionBatch``; a sampler with ``set_epoch`` (``build_train_sampler``) makes
            each epoch's order a function of (seed, epoch), which exact resume needs (``EpochReplay``).
        epochs: number of epochs. max_steps: stop after this many optimizer steps in total.
        hooks: called in list order at each event; the checkpoint hooks come last.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        grad_clip: clip the gradient norm to this value (None: no clipping).
        amp: ``auto`` | ``bf16`` | ``fp16`` | ``none`` (``resolve_amp_dtype``); fp16 uses a GradScaler. bf16 on
            the CPU leaves the model's depthwise convolutions in fp32 (``keep_depthwise_fp32``).
        channels_last: on CUDA, keep images and the model in channels-last memory format.
        criterion: (model, batch) -> (loss, parts) (``capkit.engine.loss``); default ``CrossEntropyCriterion()``.
        ema_decay: keep an exponential moving average of the weights (timm's ``ModelEmaV3``), updated after every
            optimizer step; its decay warms up as ``1 - (1 + step) ** -0.75`` to this cap. The average is what
            hooks evaluate and what checkpoints hold as ``model`` (what captions); the trained weights are
            checkpointed beside it as ``training_model``. None: no average.

    Attributes:
        epoch, global_step, batch_in_epoch: the position; ``batch_in_epoch`` batches of ``epoch`` are done.
        captions_seen: training captions this process has stepped on since it started.
        module: the unwrapped model; ``model``, what the criterion calls, may be its DistributedDataParallel
            wrapper (``DistributedDataParallelHook``).
        eval_module: the weights hooks evaluate and checkpoints hold as ``model``: ``module``, or its moving
            average with ``ema_decay``.
        loss_parts: the last step's loss parts (floats).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: DataLoader, *, epochs: int,
        hooks: Iterable[Hook] = (), device: str | torch.device = "auto", grad_clip: float | None = None,
        amp: str = "auto", channels_last: bool = True, criterion: Criterion | None = None,
        max_steps: int | None = None, ema_decay: float | None = None,
    ):
        self.device = resolve_device(device)
        self.amp_dtype = resolve_amp_dtype(amp, self.device, key="train.amp")
        self.channels_last = channels_last and self.device.type == "cuda"
        self.module = model.to(self.device)
        if self.amp_dtype == torch.bfloat16 and self.device.type == "cpu":
            keep_depthwise_fp32(self.module)
        if self.channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.model: nn.Module = self.module
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        # power 3/4: timm's advice for runs under ~100k steps (the decay reaches 0.998 after 4k steps, 0.999 after 10k)
        self.ema = None if ema_decay is None else ModelEmaV3(self.module, decay=ema_decay, use_warmup=True,
                                                             warmup_power=0.75)
        self.eval_module: nn.Module = self.module if self.ema is None else self.ema.module
        self.optimizer, self.train_loader, self.epochs, self.hooks = optimizer, train_loader, epochs, list(hooks)
        names = [h.name for h in self.hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"hook names must be unique (they key the checkpointed hook states), got {names}")
        self.grad_clip, self.max_steps = grad_clip, max_steps
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = criterion or CrossEntropyCriterion()
        self.epoch = self.global_step = self.batch_in_epoch = self.captions_seen = 0
        self.loss_parts: dict[str, float] = {}
        self.error: BaseException | None = None  # what ended ``fit``, for the hooks' ``after_train``
        self.stop_reason: str | None = None  # set by ``request_stop``
        self.replay, self._epoch_done = EpochReplay(), False

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
        self.replay.start_epoch(self.train_loader, self.epoch)
        self.call("before_epoch")
        if self.model is self.module and world_size() > 1:  # the ranks would train apart, silently
            raise RuntimeError("several ranks train an unwrapped model: add DistributedDataParallelHook() to the hooks")
        self.model.train()
        length = batches_per_epoch(self.train_loader)
        for batch in self.replay.batches(self.train_loader, self.batch_in_epoch):
            loss = self.train_step(batch)
            self.global_step += 1
            self.batch_in_epoch += 1
            self.captions_seen += len(batch) * batch.captions_per_image
            self.call("after_step", loss=loss)
            if self._should_stop() and self.batch_in_epoch != length:
                return  # stopped inside the epoch; a stop on its last batch still ends it (evaluation, best)
        self._epoch_done = True
        self.call("after_epoch")
        self.epoch, self.batch_in_epoch, self._epoch_done = self.epoch + 1, 0, False

    def train_step(self, batch: CaptionBatch) -> float:
        """One optimizer step on ``batch``; returns the total loss (averaged over ranks)."""
        batch = batch.to(self.device, non_blocking=True)
        if batch.images is not None and self.channels_last:
            batch = dataclasses.replace(batch, images=batch.images.contiguous(memory_format=torch.channels_last))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, parts = self.criterion(self.model, batch)
        value = mean_over_ranks(loss.detach())
        if not math.isfinite(value):  # every rank sees the same value, so all stop together
            raise TrainingDivergedError(
                f"training diverged: non-finite loss {value} at epoch {self.epoch}, global step "
                f"{self.global_step + 1} (parts: { {k: v.item() for k, v in parts.items()} }); lower train.lr, "
                f"set train.grad_clip (e.g. 5.0) or use train.amp=none"
            )
        self.loss_parts = {k: v.item() for k, v in parts.items()}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.module, step=self.global_step + 1)  # its first update copies the weights
        return value

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (the checkpoint's content, minus config and vocab)."""
        epoch, batch = (self.epoch + 1, 0) if self._epoch_done else (self.epoch, self.batch_in_epoch)
        trained = {} if self.ema is None else {"training_model": self.module.state_dict()}
        return {
            "model": self.eval_module.state_dict(), **trained, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": self.replay.state_dict(self.train_loader, mid_epoch=batch > 0),
            "epoch": epoch, "batch_in_epoch": batch, "global_step": self.global_step,
            "hooks": {h.name: h.state_dict() for h in self.hooks},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; the RNG state is restored when ``fit`` reaches the saved position. A state
        saved without a moving average starts one from its weights."""
        self.module.load_state_dict(state.get("training_model", state["model"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = state["global_step"]
        for hook in self.hooks:
            saved = [state["hooks"][n] for n in (hook.name, *hook.aliases) if n in state["hooks"]]
            if saved:
                hook.load_state_dict(saved[0])
        mid_epoch = self.batch_in_epoch > 0
        self.replay.load_state_dict(self.train_loader, state["rng"], epoch=self.epoch, mid_epoch=mid_epoch)

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from the checkpoint directory ``path`` (e.g. ``RunDir(...).last``)."""
        self.load_state_dict(load_checkpoint(path))

