"""Load a trained captioner from a training checkpoint, and the evaluation data of the dataset it was trained on."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from capkit.config import to_container
from capkit.data.build import LoadedSplit, load_split
from capkit.errors import DataError
from capkit.evaluation import CaptionEvaluator
from capkit.pretrained.format import is_pretrained_dir
from capkit.pretrained.model import SAFE_MODEL_KWARGS, TrainedCaptioner
from capkit.recipes.experiment import build_eval_loader_for

__all__ = ["TrainedCaptioner", "load_trained", "load_eval_split", "give_training_captions", "SAFE_MODEL_KWARGS"]

log = logging.getLogger(__name__)


def load_trained(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu", *, plugins: Sequence[str] = ()
) -> TrainedCaptioner:
    """A training checkpoint (``RUN_DIR/checkpoints/best``, with its ``.old`` fallback) or a directory written by
    ``save_pretrained``, loaded as data (``TrainedCaptioner.from_checkpoint`` / ``from_pretrained``)."""
    if is_pretrained_dir(checkpoint):
        return TrainedCaptioner.from_pretrained(checkpoint, device=device, plugins=plugins)
    return TrainedCaptioner.from_checkpoint(checkpoint, device, plugins=plugins)


def load_eval_split(
    trained: TrainedCaptioner, split: str, dataset_overrides: Mapping[str, Any] | None = None
) -> tuple[LoadedSplit, DataLoader]:
    """A split of the dataset the model was trained on (``dataset_overrides``, e.g. another ``root``, win) and
    its evaluation batches, prepared as the run's data config says (cached features where it used them)."""
    data = trained.config.data
    dataset = {**to_container(data.dataset), **(dataset_overrides or {})}
    loaded = load_split(dataset, split, skip_missing_images=data.skip_missing_images)
    return loaded, build_eval_loader_for(trained.config, loaded, trained.model.encoder, trained.device)


def give_training_captions(
    evaluator: CaptionEvaluator, trained: TrainedCaptioner, dataset_overrides: Mapping[str, Any] | None = None
) -> None:
    """Give ``evaluator``'s metrics that want them (``novel_captions``) the captions of the training split of the
    dataset the model was trained on; where that split cannot be read they go without, with a warning."""
    if not evaluator.wants_training_captions:
        return
    dataset = {**to_container(trained.config.data.dataset), **(dataset_overrides or {})}
    try:
        records = load_split(dataset, "train", skip_missing_images=True).records
    except DataError as err:
        log.warning("novel_captions is not reported: the training captions cannot be read (%s)", err)
        return
    evaluator.use_training_captions(caption for record in records for caption in record.captions)
