"""What every recipe reads from an experiment config: the loaders' settings.

The components take typed keyword arguments; these functions are where a config's sections become them, so
that training, testing, evaluation and the ablation build their loaders and decode the same way.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from capkit.data.build import LoadedSplit, build_eval_loader, build_train_loader
from capkit.data.vocab import Vocabulary
from capkit.engine.distributed import DistInfo

__all__ = ["build_train_loader_for", "build_eval_loader_for"]


def _source_options(cfg: DictConfig, device: str | torch.device) -> dict[str, Any]:
    d = cfg.data
    return dict(
        # what can be read from the cache is: the whole encoder's output when it is frozen, its frozen trunk's when
        # it trains its last stages (``Encoder.cacheable``); else the batches carry images
        cache_features=d.cache_features, cache_dir=d.cache_dir, skip_corrupt_images=d.skip_corrupt_images,
        max_image_pixels=d.max_image_pixels,
        num_workers=d.num_workers, device=device,
    )


def build_train_loader_for(
    cfg: DictConfig, split: LoadedSplit, encoder: nn.Module, vocab: Vocabulary, dist: DistInfo
) -> DataLoader:
    """The training batches of ``split`` as the config says: per caption (``data.captions_per_image`` of each image
    together), or per image for self-critical training."""
    t, d = cfg.train, cfg.data
    return build_train_loader(
        split, encoder, vocab, batch_size=t.batch_size, max_caption_len=d.max_caption_len, augment=d.augment,
        augment_views=d.augment_views,
        seed=t.seed, rank=dist.rank, world_size=dist.world_size, per_image=t.objective == "scst",
        captions_per_image=d.captions_per_image,
        **_source_options(cfg, dist.device),
    )


def build_eval_loader_for(
    cfg: DictConfig, split: LoadedSplit, encoder: nn.Module, device: str | torch.device, max_images: int | None = None
) -> DataLoader:
    """The evaluation batches of ``split`` (``eval.batch_size`` images each; the first ``max_images`` only)."""
    return build_eval_loader(
        split, encoder, batch_size=cfg.eval.batch_size, max_images=max_images, **_source_options(cfg, device)
    )
