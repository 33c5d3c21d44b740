"""Grounding: does the attention look at the object a word names?

For every generated word that names an object in the image (a colour or shape word of one of its labelled
boxes), the grounding of that step is the share of its attention mass inside the object's box: each grid
cell's weight times the fraction of the cell the box covers. Uniform attention scores the box's area
fraction, reported next to it as the baseline.

Grid cells are laid over the part of the image the encoder sees: the eval transform resizes and centre-crops
(timm's ``crop_pct``), so boxes are mapped through the same geometry.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capkit.data.records import Box
from capkit.data.transforms import visible_region

__all__ = ["box_coverage", "GroundingMeter", "run_grounding"]

SIZE_WORDS = frozenset({"small", "large", "big", "tiny"})  # describe an object but do not identify it


def box_coverage(
    boxes: Sequence[Box], region: tuple[float, float, float, float], grid: tuple[int, int]
) -> np.ndarray:
    """(N,) fraction of each grid cell covered by the boxes (which must not overlap), row-major."""
    h, w = grid
    x0, y0, x1, y1 = region
    xs = np.linspace(x0, x1, w + 1)
    ys = np.linspace(y0, y1, h + 1)
    covered = np.zeros((h, w))
    for box in boxes:
        overlap_x = np.clip(np.minimum(xs[1:], box.x1) - np.maximum(xs[:-1], box.x0), 0, None)  # (w,)
        overlap_y = np.clip(np.minimum(ys[1:], box.y1) - np.maximum(ys[:-1], box.y0), 0, None)  # (h,)
        covered += np.outer(overlap_y, overlap_x)
    cell_area = (xs[1] - xs[0]) * (ys[1] - ys[0])
    return np.clip(covered / cell_area, 0.0, 1.0).reshape(-1)


@dataclass
class GroundingMeter:
    """Accumulates grounding over images: ``add`` each caption, then read ``result()``."""

    scores: list[float] = field(default_factory=list)
    baselines: list[float] = field(default_factory=list)

    def add(
        self,
        words: Sequence[str],
        alphas: np.ndarray,
        grid: tuple[int, int],
        boxes: Sequence[Box],
        image_size: tuple[int, int],
        data_config: Mapping[str, Any],
    ) -> None:
        """One caption: words (T',), its attention alphas (T >= T', N), the image's boxes and (width, height)."""
        alphas = np.asarray(alphas, dtype=np.float64)
        region = visible_region(*image_size, data_config)
        for step, word in enumerate(words):
            named = [b for b in boxes if word in set(b.label.split()) - SIZE_WORDS]
            if not named:
                continue
            coverage = box_coverage(named, region, grid)
            self.scores.append(float(alphas[step] @ coverage))
            self.baselines.append(float(coverage.mean()))

    def result(self) -> dict[str, float]:
        """``grounding`` (mean attention mass on the named object), ``grounding_uniform`` (what uniform
        attention would get on the same words) and ``grounded_words`` (how many words were scored)."""
        if not self.scores:
            return {"grounding": float("nan"), "grounding_uniform": float("nan"), "grounded_words": 0.0}
        return {
            "grounding": float(np.mean(self.scores)),
            "grounding_uniform": float(np.mean(self.baselines)),
            "grounded_words": float(len(self.scores)),
        }


def run_grounding(
    model: Any,
    loader: Any,
    records: Mapping[str, Any],
    itos: Sequence[str],
    *,
    beam_size: int,
    max_len: int,
) -> dict[str, float]:
    """Caption every batch of ``loader`` and measure grounding against ``records[image_id].boxes``.

    Args:
        model: a ``Captioner`` (put in eval mode here; its mode is restored after).
        loader: evaluation batches (``CaptionBatch``) of a split whose records have boxes.
        records: image id -> ``ImageRecord`` (with ``boxes``).
        itos: the vocabulary's id -> word list.
    """
    import torch

    meter = GroundingMeter()
    device = next(model.parameters()).device
    data_config = model.encoder.data_config
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(device)
                generation = model.generate(batch.images, batch.features, beam_size=beam_size, max_len=max_len)
                for image_id, hyp in zip(batch.image_ids, generation.best):
                    record = records[image_id]
                    if not record.boxes:
                        continue
                    with record.open() as image:
                        size = image.size
                    words = [itos[t] for t in hyp.tokens]
                    meter.add(words, hyp.alphas.numpy(), generation.grid, record.boxes, size, data_config)
    finally:
        model.train(was_training)
    return meter.result()
