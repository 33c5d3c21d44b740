"""Score captions: a trained model's on a dataset split (with an optional HTML gallery), or a results file's."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capkit.data.build import LoadedSplit
from capkit.engine.run_dir import RunDir
from capkit.evaluation import (
    CaptionEvaluator,
    load_predictions,
    load_references,
    run_evaluation,
)
from capkit.recipes.inference import (
    TrainedCaptioner,
    caption_images,
    load_eval_split,
    load_trained,
)
from capkit.visualization.gallery import GalleryItem, write_gallery

__all__ = ["Scored", "score_checkpoint", "score_files"]


@dataclass
class Scored:
    """Captions scored against their references."""

    hypotheses: dict[str, str]
    references: dict[str, list[str]]
    scores: dict[str, float]
    per_image: dict[str, dict[str, float]]
    source: str  # what was scored, in words
    gallery: Path | None = None  # the gallery page, when one was written


def score_checkpoint(
    evaluator: CaptionEvaluator,
    checkpoint: str | os.PathLike,
    split: str = "test",
    *,
    beam_size: int = 3,
    max_len: int | None = None,
    length_penalty: float | None = None,
    dataset_overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    plugins: Sequence[str] = (),
    gallery: int = 0,
    gallery_dir: str | os.PathLike | None = None,
) -> Scored:
    """Caption ``split`` of the dataset a checkpoint was trained on (batched beam search) and score it.

    ``max_len`` and ``length_penalty`` default to the run's ``eval`` settings. ``gallery`` > 0 writes an HTML
    page of the first images (caption, references, scores, attention) to ``gallery_dir`` (default: the run's
    gallery folder of the split, ``RunDir.gallery``). ``plugins``: modules to import for the model's components
    (see ``load_trained``).
    """
    trained = load_trained(checkpoint, device, plugins=plugins)
    decoding = {
        **trained.decoding, "beam_size": beam_size,
        **{k: v for k, v in (("max_len", max_len), ("length_penalty", length_penalty)) if v is not None},
    }
    loaded, loader = load_eval_split(trained, split, dataset_overrides)
    run_evaluation(trained.model, loader, evaluator, decode=trained.vocab.decode, **decoding)
    result = evaluator.result
    scored = Scored(
        evaluator.hypotheses, evaluator.references, result.scores, result.per_image,
        f"{loaded.data.name} {split} split, {checkpoint}, beam {beam_size}",
    )
    if gallery:
        out = Path(gallery_dir) if gallery_dir is not None else RunDir.of_checkpoint(checkpoint).gallery(split)
        title = f"{checkpoint}: {split} split, beam {beam_size}"
        scored.gallery = _write_gallery(out, trained, loaded, scored, gallery, decoding, title)
    return scored


def _write_gallery(
    out: Path, trained: TrainedCaptioner, loaded: LoadedSplit, scored: Scored, count: int, decoding: dict, title: str
) -> Path:
    """Caption the first ``count`` images again, keeping their attention maps, and write the page."""
    records = loaded.records[:count]
    images = [r.open() for r in records]
    captions, generation = caption_images(trained, images, **decoding)
    items = [
        GalleryItem(
            image_id=r.image_id, image=image, caption=caption, references=r.captions,
            scores=scored.per_image.get(r.image_id, {}), hypothesis=hyp, grid=generation.grid,
        )
        for r, image, caption, hyp in zip(records, images, captions, generation.best)
    ]
    data_config = trained.model.encoder.data_config
    return write_gallery(out, items, words=trained.vocab.itos, data_config=data_config, title=title)


def score_files(evaluator: CaptionEvaluator, predictions: str | os.PathLike, references: str | os.PathLike) -> Scored:
    """Score a COCO results file against a references file (no model involved)."""
    hyps, refs = load_predictions(predictions), load_references(references)
    result = evaluator.score(hyps, refs)
    return Scored(hyps, refs, result.scores, result.per_image, f"{predictions} against {references}")
