"""build_dataloaders: dataset config -> records -> vocabulary -> images or cached features -> DataLoaders."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from capkit.data.datasets.base import CaptionDataset
from capkit.data.feature_cache import cached_features
from capkit.data.loaders import EvaluationDataset, ImageSource, Source, TrainingDataset, build_loader
from capkit.data.records import ImageRecord, drop_missing
from capkit.data.transforms import build_transform
from capkit.data.vocab import Vocabulary
from capkit.registry import DATASETS

__all__ = ["DataLoaders", "load_split", "build_source", "build_dataloaders"]


@dataclass
class DataLoaders:
    train: DataLoader  # CaptionBatch with captions; call train.sampler.set_epoch(epoch) every epoch
    val: DataLoader  # CaptionBatch with references, one item per image
    vocab: Vocabulary


def load_split(
    dataset: Mapping[str, Any], split: str, *, skip_missing_images: bool = False
) -> tuple[CaptionDataset, list[ImageRecord]]:
    """Build the registered dataset ``{name, **kwargs}`` for ``split``; return it and its records whose
    images exist (``MissingImagesError`` unless ``skip_missing_images``)."""
    data = DATASETS.build(dataset, split=split)
    return data, drop_missing(data.records, skip_missing_images, f"{data.name} {split}")


def build_source(
    data: CaptionDataset,
    records: list[ImageRecord],
    encoder: nn.Module,
    *,
    augment: bool = False,
    cache_features: bool = True,
    cache_dir: str | os.PathLike | None = None,
    skip_corrupt_images: bool = False,
    num_workers: int = 0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> Source:
    """Cached features when ``cache_features`` and the encoder is frozen and nothing is augmented, else images."""
    if cache_features and not augment and getattr(encoder, "frozen", False):
        return cached_features(
            records, encoder, build_transform(encoder.data_config), identity=data.identity(), cache_dir=cache_dir,
            batch_size=batch_size, num_workers=num_workers, device=device, skip_corrupt=skip_corrupt_images,
        )
    return ImageSource(records, build_transform(encoder.data_config, augment), skip_corrupt_images)


def build_dataloaders(
    dataset: Mapping[str, Any],
    encoder: nn.Module,
    *,
    batch_size: int,
    eval_batch_size: int | None = None,
    vocab: Vocabulary | None = None,
    train_split: str = "train",
    val_split: str = "val",
    max_caption_len: int = 16,
    vocab_min_count: int = 5,
    vocab_max_size: int = 5000,
    num_workers: int = 2,
    cache_features: bool = True,
    cache_dir: str | os.PathLike | None = None,
    skip_missing_images: bool = False,
    skip_corrupt_images: bool = False,
    augment: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> DataLoaders:
    """Training and validation loaders for ``dataset`` (``{name, **kwargs}``, as in ``data.dataset``).

    The vocabulary is built from the training captions unless given (pass the checkpoint's on resume).
    With a frozen encoder and ``cache_features``, batches carry cached ``features`` instead of ``images``
    (the first call extracts them, on ``device``). The training order depends only on (seed, epoch).
    """
    source_kwargs = dict(
        cache_features=cache_features, cache_dir=cache_dir, skip_corrupt_images=skip_corrupt_images,
        num_workers=num_workers, batch_size=eval_batch_size or batch_size, device=device,
    )
    train_data, train_records = load_split(dataset, train_split, skip_missing_images=skip_missing_images)
    if vocab is None:
        vocab = Vocabulary.build((c for r in train_records for c in r.captions), vocab_min_count, vocab_max_size)
    train_source = build_source(train_data, train_records, encoder, augment=augment, **source_kwargs)
    val_data, val_records = load_split(dataset, val_split, skip_missing_images=skip_missing_images)
    val_source = build_source(val_data, val_records, encoder, **source_kwargs)
    loader_kwargs = dict(seed=seed, num_workers=num_workers, rank=rank, world_size=world_size)
    return DataLoaders(
        train=build_loader(
            TrainingDataset(train_source, train_records, vocab, max_caption_len), batch_size, shuffle=True,
            **loader_kwargs,
        ),
        val=build_loader(EvaluationDataset(val_source, val_records), eval_batch_size or batch_size, **loader_kwargs),
        vocab=vocab,
    )
