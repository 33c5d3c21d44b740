"""Micro-batching: concurrent caption requests become one beam search.

Requests wait at most ``max_wait`` seconds for others to join them (a batch closes at once when it reaches
``max_batch``); requests of one batch that ask for the same decoding settings share one ``caption_pictures``
call. The model runs on one thread of its own, off the event loop, so the server keeps accepting requests (and
answering ``/health``) while it works.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from capkit.pretrained.model import CaptionResult, TrainedCaptioner

__all__ = ["CaptionBatcher", "BatcherStats", "ServerBusyError"]

log = logging.getLogger(__name__)


class ServerBusyError(RuntimeError):
    """More requests are waiting than the queue holds."""


@dataclass
class BatcherStats:
    requests: int = 0  # pictures captioned
    calls: int = 0  # beam-search calls made for them
    largest_call: int = 0  # the most pictures in one call
    call_sizes: dict[int, int] = field(default_factory=dict)  # pictures per call -> how many calls


@dataclass
class _Pending:
    picture: Image.Image
    inputs: torch.Tensor  # (3, H, W), the model's transform of ``picture``
    decoding: tuple[tuple[str, Any], ...]  # sorted (setting, value) pairs: requests with equal ones share a call
    future: asyncio.Future


class CaptionBatcher:
    """Queues pictures and captions them in batches with ``model``.

    Args:
        model: the captioner; only this batcher's thread uses it.
        max_batch: the most pictures in one beam-search call; 1 turns batching off.
        max_wait: seconds the first request of a batch waits for others to join it.
        max_queue: the most pictures waiting; more are refused (``ServerBusyError``) rather than left to time out.
    """

    def __init__(self, model: TrainedCaptioner, *, max_batch: int = 16, max_wait: float = 0.01, max_queue: int = 256):
        if max_batch < 1 or max_wait < 0 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1 and max_wait at least 0, got {max_batch}, "
                             f"{max_queue} and {max_wait}")
        self.model, self.max_batch, self.max_wait, self.max_queue = model, max_batch, max_wait, max_queue
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="capkit-model")

    async def start(self) -> None:
        """Start collecting batches (on the running event loop)."""
        self._queue = asyncio.Queue(self.max_queue)
        self._worker = asyncio.create_task(self._collect(), name="capkit-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def caption(self, picture: Image.Image, inputs: torch.Tensor, decoding: Mapping[str, Any]) -> CaptionResult:
        """The caption of one picture (``inputs``: its transformed tensor), decoded with ``decoding`` (the
        keyword arguments of ``caption_pictures``), once its batch has run."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(picture, inputs, tuple(sorted(decoding.items())), future))
        except asyncio.QueueFull:
            raise ServerBusyError(f"{self.max_queue} images are already waiting; try again shortly") from None
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple, list[_Pending]] = {}
            for pending in batch:
                if not pending.future.done():  # a request that timed out while waiting is not captioned
                    groups.setdefault(pending.decoding, []).append(pending)
            for decoding, group in groups.items():
                await self._run(dict(decoding), group)

    async def _run(self, decoding: dict[str, Any], group: list[_Pending]) -> None:
        pictures = [(p.picture, None) for p in group]
        inputs = torch.stack([p.inputs for p in group])  # (B, 3, H, W)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: self.model.caption_pictures(pictures, inputs=inputs, **decoding)
            )
        except Exception as err:  # noqa: BLE001  (a failed call fails its requests; the server goes on)
            log.exception("captioning %d images failed", len(group))
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(err)
            return
        stats = self.stats
        stats.requests += len(group)
        stats.calls += 1
        stats.largest_call = max(stats.largest_call, len(group))
        stats.call_sizes[len(group)] = stats.call_sizes.get(len(group), 0) + 1
        for pending, result in zip(group, results):
            if not pending.future.done():
                pending.future.set_result(result)
