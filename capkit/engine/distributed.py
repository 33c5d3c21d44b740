"""torchrun / DistributedDataParallel support: process-group setup, the training sampler, rank-0 helpers."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from capkit.engine.device import resolve_device

__all__ = [
    "DistInfo",
    "init_distributed",
    "destroy_distributed",
    "is_main_process",
    "world_size",
    "broadcast_object",
    "mean_over_ranks",
    "build_train_sampler",
    "rank_zero_first",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_minutes: float = 60.0) -> DistInfo:
    """Join the torchrun job described by the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_*``).

    Without torchrun (no ``WORLD_SIZE``, or 1) nothing is initialised and the single process is rank 0.
    Under torchrun each process takes ``cuda:LOCAL_RANK`` with the ``nccl`` backend when ``device`` resolves
    to CUDA, else the CPU with ``gloo``.

    Args:
        device: ``auto``, ``cpu`` or ``cuda`` (the index comes from ``LOCAL_RANK`` under torchrun).
        timeout_minutes: collective timeout; rank 0 evaluates alone while the others wait in a broadcast, so
            it must exceed the validation time.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if size == 1:
        return DistInfo(0, 0, 1, dev)
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={size} but {', '.join(missing)} unset; launch with torchrun --nproc_per_node N")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank, local_rank, size, dev)


def destroy_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs: only it logs, evaluates and writes checkpoints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (identity in single-process runs)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over the ranks (its value in single-process runs)."""
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size()
    return value.item()


def build_train_sampler(dataset: Dataset, *, seed: int, shuffle: bool = True, drop_last: bool = False) -> DistributedSampler:
    """The training sampler, for one process or many: each epoch's order comes from ``(seed, epoch)`` alone.

    The trainer calls ``set_epoch`` before every epoch, which makes the order repeatable on resume. With
    several processes each rank reads its own 1/world_size share (padded by repetition unless ``drop_last``).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. extracting the feature cache), then the other ranks."""
    several = world_size() > 1
    if several and not is_main_process():
        dist.barrier()
    yield
    if several and is_main_process():
        dist.barrier()
