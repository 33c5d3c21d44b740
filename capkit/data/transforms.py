"""Image transforms from the encoder's timm data config (size, interpolation, mean, std, crop)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import timm.data
from PIL import Image
from torch import Tensor

__all__ = ["build_transform"]


def build_transform(data_config: Mapping[str, Any], augment: bool = False) -> Callable[[Image.Image], Tensor]:
    """PIL image -> (3, H, W) normalised tensor, built by ``timm.data.create_transform``.

    Args:
        data_config: the encoder's ``data_config`` (timm's ``resolve_model_data_config``): never a YAML copy.
        augment: timm's training transform (random resized crop, colour jitter), without horizontal flips
            (captions say "left of") and with crops keeping at least half the image (named objects stay in).
    """
    extra = {"hflip": 0.0, "scale": (0.5, 1.0)} if augment else {}
    return timm.data.create_transform(**data_config, is_training=augment, **extra)
