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

__all__ = ["box_coverage", "GroundingMeter", "measure_grounding"]

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


def measure_grounding(
    captions: Mapping[str, Any],
    records: Mapping[str, Any],
    itos: Sequence[str],
    grid: tuple[int, int],
    data_config: Mapping[str, Any],
) -> dict[str, float]:
    """Grounding of generated captions against their images' boxes (``GroundingMeter.result()``).

    Args:
        captions: image id -> the ``Hypothesis`` generated for it (tokens and alphas (T, N)).
        records: image id -> ``ImageRecord``; images without ``boxes`` are not scored.
        itos: the vocabulary's id -> word list.
        grid: (H, W) of the attention maps.
        data_config: the encoder's data config (its crop decides where the grid lies).
    """
    meter = GroundingMeter()
    for image_id, hyp in captions.items():
        record = records[image_id]
        if not record.boxes:
            continue
        with record.open() as image:
            size = image.size
        meter.add([itos[t] for t in hyp.tokens], hyp.alphas.numpy(), grid, record.boxes, size, data_config)
    return meter.result()
