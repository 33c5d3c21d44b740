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
from capkit.errors import CaptionFileError
from capkit.evaluation import (
    CaptionEvaluator,
    load_predictions,
    load_references,
    run_evaluation,
)
from capkit.data.build import load_split
from capkit.pretrained.model import TrainedCaptioner
from capkit.recipes.inference import give_training_captions, load_eval_split, load_trained
from capkit.visualization.gallery import GalleryItem, write_gallery

__all__ = ["Scored", "score_checkpoint", "score_files", "describe_decoding"]


@dataclass
class Scored:
    """Captions scored against their references."""

    hypotheses: dict[str, str]
    references: dict[str, list[str]]
    scores: dict[str, float]
    per_image: dict[str, dict[str, float]]
    source: str  # what was scored, in words
    decoding: dict[str, Any] | None = None  # the beam search settings of a model's captions
    gallery: Path | None = None  # the gallery page, when one was written


def score_checkpoint(
    evaluator: CaptionEvaluator,
    checkpoint: str | os.PathLike | TrainedCaptioner,
    split: str = "test",
    *,
    beam_size: int | None = None,
    max_len: int | None = None,
    length_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    suppress_unk: bool | None = None,
    dataset_overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    plugins: Sequence[str] = (),
    gallery: int = 0,
    gallery_dir: str | os.PathLike | None = None,
    name: str | None = None,
) -> Scored:
    """Caption ``split`` of the dataset a model was trained on (batched beam search) and score it.

    ``checkpoint``: a training checkpoint, a saved model directory, or a loaded model. ``beam_size``,
    ``max_len``, ``length_penalty``, ``no_repeat_ngram_size`` and ``suppress_unk`` default to the model's own decoding
    settings (its run's ``eval``). ``gallery`` > 0 writes an HTML
    page of the first images (caption, references, scores, attention) to ``gallery_dir`` (default: the run's
    gallery folder of the split, ``RunDir.gallery``). ``plugins``: modules to import for the model's components
    (see ``load_trained``). ``name``: what the report calls the model (default: the checkpoint's path).
    """
    name = name or checkpoint_name(checkpoint)
    trained = checkpoint if isinstance(checkpoint, TrainedCaptioner) else load_trained(checkpoint, device, plugins=plugins)
    decoding = trained.decoding_with(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                                     no_repeat_ngram_size=no_repeat_ngram_size, suppress_unk=suppress_unk)
    loaded, loader = load_eval_split(trained, split, dataset_overrides)
    give_training_captions(evaluator, trained, dataset_overrides)
    run_evaluation(trained.model, loader, evaluator, decode=trained.vocab.decode, precision=trained.precision,
                   **decoding)
    result = evaluator.result
    scored = Scored(
        evaluator.hypotheses, evaluator.references, result.scores, result.per_image,
        f"{loaded.data.name} {split} split, {name}, {describe_decoding(decoding)}",
        decoding,
    )
    if gallery:
        if gallery_dir is None and isinstance(checkpoint, TrainedCaptioner):
            raise ValueError("give gallery_dir for the gallery of a loaded model")
        out = Path(gallery_dir) if gallery_dir is not None else RunDir.of_checkpoint(checkpoint).gallery(split)
        beside = RunDir(out.parent)
        if beside.holds_run() and out == beside.gallery(split):
            beside.record(out)  # the run's own gallery: replacing the run (--overwrite) removes it
        title = f"{name}: {split} split, {describe_decoding(decoding)}"
        scored.gallery = _write_gallery(out, trained, loaded, scored, gallery, decoding, title)
    return scored


def _write_gallery(
    out: Path, trained: TrainedCaptioner, loaded: LoadedSplit, scored: Scored, count: int, decoding: dict, title: str
) -> Path:
    """Caption the first ``count`` images again, keeping their attention maps, and write the page."""
    records = loaded.records[:count]
    images = [r.open() for r in records]
    results = trained.caption_pictures([(image, None) for image in images], **decoding)
    items = [
        GalleryItem(
            image_id=r.image_id, image=image, caption=result.caption, references=r.captions,
            scores=scored.per_image.get(r.image_id, {}), hypothesis=result.hypothesis, grid=result.grid,
        )
        for r, image, result in zip(records, images, results)
    ]
    data_config = trained.model.encoder.data_config
    return write_gallery(out, items, words=trained.vocab.itos, data_config=data_config, title=title)


def score_files(
    evaluator: CaptionEvaluator, predictions: str | os.PathLike, references: str | os.PathLike | None = None, *,
    dataset: Mapping[str, Any] | None = None, split: str = "test",
) -> Scored:
    """Score a predictions file (COCO results, or ``capkit caption``'s JSON Lines or CSV) against a references
    file, or against ``split`` of ``dataset`` (``{"name": "flickr8k", "root": ...}``); no model involved.

    Raises:
        CaptionFileError: a predicted image is not among the references.
    """
    hyps = load_predictions(predictions)
    if references is not None:
        refs, against = load_references(references), os.fspath(references)
    else:
        loaded = load_split(dict(dataset or {}), split, skip_missing_images=True)
        refs, against = {r.image_id: list(r.captions) for r in loaded.records}, f"{loaded.data.name} {split} split"
    unknown = [i for i in hyps if i not in refs]
    if unknown:
        raise CaptionFileError(
            f"{predictions}: {len(unknown)} of {len(hyps)} images have no references in {against} (first: "
            f"{unknown[0]!r}); image ids must match the references' (file names for Flickr8k)"
        )
    refs = {i: refs[i] for i in hyps}
    result = evaluator.score(hyps, refs)
    return Scored(hyps, refs, result.scores, result.per_image, f"{predictions} against {against}")


def checkpoint_name(checkpoint: str | os.PathLike | TrainedCaptioner) -> str:
    return "a loaded model" if isinstance(checkpoint, TrainedCaptioner) else os.fspath(checkpoint)


def describe_decoding(decoding: Mapping[str, Any]) -> str:
    text = f"beam {decoding['beam_size']}, max_len {decoding['max_len']}, length_penalty {decoding['length_penalty']}"
    ngram = decoding.get("no_repeat_ngram_size", 0)
    text = f"{text}, no_repeat_ngram_size {ngram}" if ngram else text
    return f"{text}, suppress_unk" if decoding.get("suppress_unk") else text
