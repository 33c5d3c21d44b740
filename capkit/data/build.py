"""Loaders for a run: a loaded split -> images or cached features -> a DataLoader of ``CaptionBatch``es."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from capkit.data.datasets.base import CaptionDataset
from capkit.data.feature_cache import cached_features
from capkit.data.images import DEFAULT_MAX_PIXELS
from capkit.data.loaders import (
    AugmentedViews,
    CaptionGroups,
    EvaluationDataset,
    ImageSource,
    Source,
    TrainingDataset,
    build_loader,
)
from capkit.data.records import ImageRecord, drop_missing
from capkit.data.transforms import build_transform
from capkit.data.vocab import Vocabulary
from capkit.registry import DATASETS

__all__ = ["LoadedSplit", "load_split", "build_source", "build_train_loader", "build_eval_loader"]

log = logging.getLogger(__name__)


class LoadedSplit(NamedTuple):
    data: CaptionDataset
    records: list[ImageRecord]  # the records whose images exist


def load_split(dataset: Mapping[str, Any], split: str, *, skip_missing_images: bool = False) -> LoadedSplit:
    """Build the registered dataset ``{name, **kwargs}`` for ``split``; keep the records whose images exist
    (``MissingImagesError`` unless ``skip_missing_images``)."""
    data = DATASETS.build(dataset, split=split)
    records = drop_missing(data.records, skip_missing_images, f"{data.name} {split}")
    log.info("%s %s: %d images, %d captions", data.name, split, len(records), sum(len(r.captions) for r in records))
    return LoadedSplit(data, records)


def build_source(
    split: LoadedSplit,
    encoder: nn.Module,
    *,
    augment: bool = False,
    view_seed: int | None = None,
    space_for: int = 1,
    cache_features: bool = True,
    cache_dir: str | os.PathLike | None = None,
    skip_corrupt_images: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    num_workers: int = 0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> Source:
    """Cached features when ``cache_features`` and the encoder is ``cacheable`` (frozen, or frozen but for its
    last stages) and nothing is augmented, else images.

    With ``augment`` and a ``view_seed``, the cached features of one augmented view of every image (the training
    transform, its randomness drawn from the seed and the image): augmentation for a frozen encoder at the cost of
    one extraction per view. An extraction first checks that the cache's disk holds ``space_for`` entries of its
    size (itself and the views still to come).
    """
    cacheable = getattr(encoder, "cacheable", False)
    if view_seed is not None and not (augment and cache_features and cacheable):
        raise ValueError("an augmented view caches the augmented features of the encoder's frozen part: it needs "
                         "augment=True, cache_features=True and a cacheable encoder (one without a frozen part "
                         "needs its images augmented at every step)")
    transform = build_transform(encoder.data_config, augment)
    if cache_features and cacheable and (not augment or view_seed is not None):
        return cached_features(
            split.records, encoder, transform, identity=split.data.identity(), cache_dir=cache_dir,
            batch_size=batch_size, num_workers=num_workers, device=device, skip_corrupt=skip_corrupt_images,
            max_pixels=max_image_pixels, view_seed=view_seed, space_for=space_for,
        )
    return ImageSource(split.records, transform, skip_corrupt_images, max_image_pixels)


def build_train_loader(
    split: LoadedSplit,
    encoder: nn.Module,
    vocab: Vocabulary,
    *,
    batch_size: int,
    max_caption_len: int = 16,
    augment: bool = False,
    augment_views: int = 0,
    cache_features: bool = True,
    cache_dir: str | os.PathLike | None = None,
    skip_corrupt_images: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    per_image: bool = False,
    captions_per_image: int = 1,
) -> DataLoader:
    """One (image, caption) sample per caption, shuffled by (seed, epoch): call ``sampler.set_epoch(epoch)``.
    With ``captions_per_image`` K > 1, one sample per image with K of its captions drawn each epoch
    (``CaptionGroups``), ``batch_size`` // K images a batch (``batch_size`` counts captions). With ``per_image``,
    one sample per image with all its references instead (self-critical training).

    With a ``cacheable`` encoder and ``cache_features`` (and no augmentation), batches carry cached ``features``
    (extracted on ``device`` the first time) instead of ``images``. With ``augment`` and ``augment_views`` K > 0,
    they carry the features of one of K cached augmented views of each image, drawn anew each epoch
    (``ViewSampler``); with ``augment`` alone, augmented images.
    """
    options = dict(augment=augment, cache_features=cache_features, cache_dir=cache_dir,
                   skip_corrupt_images=skip_corrupt_images, max_image_pixels=max_image_pixels,
                   num_workers=num_workers, batch_size=batch_size, device=device)
    if captions_per_image > 1 and not per_image:  # refused before any feature is extracted
        if batch_size % captions_per_image:
            raise ValueError(f"batch_size {batch_size} is not a multiple of captions_per_image {captions_per_image}: "
                             f"a batch holds {captions_per_image} captions of each of its images")
        if augment_views:
            raise ValueError(f"captions_per_image {captions_per_image} cannot be combined with augment_views yet")
    seeds = range(augment_views) if augment_views else [None]  # view k is seeded by k
    sources = [build_source(split, encoder, view_seed=seed, space_for=len(seeds) - k, **options)
               for k, seed in enumerate(seeds)]
    if per_image:
        datasets = [EvaluationDataset(source, split.records) for source in sources]
    elif captions_per_image > 1:
        datasets = [CaptionGroups(sources[0], split.records, vocab, max_caption_len, captions_per_image)]
        batch_size //= captions_per_image
    else:
        datasets = [TrainingDataset(source, split.records, vocab, max_caption_len) for source in sources]
    dataset = AugmentedViews(datasets) if augment_views else datasets[0]
    return build_loader(
        dataset, batch_size, shuffle=True, seed=seed, num_workers=num_workers, rank=rank, world_size=world_size
    )


def build_eval_loader(
    split: LoadedSplit,
    encoder: nn.Module,
    *,
    batch_size: int,
    max_images: int | None = None,
    cache_features: bool = True,
    cache_dir: str | os.PathLike | None = None,
    skip_corrupt_images: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
) -> DataLoader:
    """One item per image with all its references, in dataset order (the first ``max_images`` only, if set)."""
    if max_images is not None:
        split = LoadedSplit(split.data, split.records[:max_images])
    source = build_source(
        split, encoder, cache_features=cache_features, cache_dir=cache_dir,
        skip_corrupt_images=skip_corrupt_images, max_image_pixels=max_image_pixels, num_workers=num_workers,
        batch_size=batch_size, device=device,
    )
    return build_loader(EvaluationDataset(source, split.records), batch_size, num_workers=num_workers)
