"""Exact resume: the random state of an epoch, captured as it starts and replayed when a run continues there."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, SequentialSampler

from capkit.engine.rng import get_rng_state, set_rng_state

__all__ = ["EpochReplay", "batches_per_epoch"]


def batches_per_epoch(loader: DataLoader) -> int | None:
    """The loader's length; None for an iterable dataset without one."""
    try:
        return len(loader)
    except TypeError:
        return None


class EpochReplay:
    """Makes a resumed run draw the same random numbers as an uninterrupted one, bit for bit.

    A checkpoint taken inside an epoch stores the RNG states at that epoch's start and after its last step.
    On resume, the epoch starts again with the first: ``iter()`` draws the workers' base seed from the
    loader's generator (or the global RNG), and skipping the finished batches brings every worker to the same
    point of its stream. Then the global RNG is set to the second (dropout, in-process data loading).

    Every method takes the training loader; its sampler's ``set_epoch(epoch)`` is called at every epoch start
    (``build_train_sampler``), which makes the order a function of (seed, epoch).
    """

    def __init__(self) -> None:
        self._epoch_rng: dict[str, Any] | None = None  # the RNG states at the start of the current epoch
        self._loader_rng: torch.Tensor | None = None
        self._pending: Mapping[str, Any] | None = None  # a checkpoint's states, until the epoch they belong to

    def start_epoch(self, loader: DataLoader, epoch: int) -> None:
        """Order the epoch's samples, restore a checkpoint's epoch-start states, and capture them."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        generator = getattr(loader, "generator", None)
        if self._pending is not None:
            set_rng_state(self._pending["epoch"])
            if generator is not None and self._pending["loader"] is not None:
                generator.set_state(self._pending["loader"])
        self._epoch_rng = get_rng_state()
        self._loader_rng = None if generator is None else generator.get_state()

    def batches(self, loader: DataLoader, done: int) -> Iterator[Any]:
        """The epoch's batches after the first ``done`` (finished before the checkpoint)."""
        batches = iter(loader)
        for _ in range(done):
            next(batches)
        if self._pending is not None:
            if done:
                set_rng_state(self._pending["step"])
            self._pending = None
        return batches

    def state_dict(self, loader: DataLoader, mid_epoch: bool) -> dict[str, Any]:
        """The states a checkpoint stores: mid-epoch, the epoch's start and now; at an epoch's end, now twice."""
        now = get_rng_state()
        generator = getattr(loader, "generator", None)
        return {
            "step": now,
            "epoch": self._epoch_rng if mid_epoch else now,
            "loader": self._loader_rng if mid_epoch else (None if generator is None else generator.get_state()),
        }

    def load_state_dict(self, loader: DataLoader, state: Mapping[str, Any], *, epoch: int, mid_epoch: bool) -> None:
        """Replay ``state`` from the next ``start_epoch``; warn where the loader cannot repeat the epoch."""
        self._pending = state
        sampler = getattr(loader, "sampler", None)
        if mid_epoch and not hasattr(sampler, "set_epoch") and not isinstance(sampler, SequentialSampler):
            warnings.warn(
                f"resuming inside epoch {epoch}, but the train loader's sampler ({type(sampler).__name__}) has "
                f"no set_epoch: the rest of the epoch will not see the same batches; use build_train_sampler",
                stacklevel=3,
            )
        if getattr(loader, "persistent_workers", False):
            warnings.warn(
                "the train loader has persistent workers: their random streams are not replayed on resume, so random "
                "augmentations drawn in the workers (if the dataset makes any) differ from the interrupted run's",
                stacklevel=3,
            )
