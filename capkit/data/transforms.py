"""Image transforms from the encoder's timm data config (size, interpolation, mean, std, crop)."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import timm.data
from PIL import Image
from torch import Tensor

__all__ = ["build_transform", "visible_region"]


def build_transform(data_config: Mapping[str, Any], augment: bool = False) -> Callable[[Image.Image], Tensor]:
    """PIL image -> (3, H, W) normalised tensor, built by ``timm.data.create_transform``.

    Args:
        data_config: the encoder's ``data_config`` (timm's ``resolve_model_data_config``): never a YAML copy.
        augment: timm's training transform (random resized crop, colour jitter), without horizontal flips
            (captions say "left of") and with crops keeping at least half the image (named objects stay in).
    """
    extra = {"hflip": 0.0, "scale": (0.5, 1.0)} if augment else {}
    return timm.data.create_transform(**data_config, is_training=augment, **extra)


def visible_region(width: int, height: int, data_config: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """The part (x0, y0, x1, y1) of a width x height image that timm's eval transform keeps."""
    _, crop_h, crop_w = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or 0.875
    mode = data_config.get("crop_mode") or "center"
    if mode == "center":  # shorter side resized to floor(crop / crop_pct), then a centre crop
        scale = math.floor(crop_h / crop_pct) / min(width, height)
        seen_w, seen_h = crop_w / scale, crop_h / scale
    elif mode == "squash":  # each side resized to floor(crop / crop_pct), then a centre crop
        seen_w = width * crop_w / math.floor(crop_w / crop_pct)
        seen_h = height * crop_h / math.floor(crop_h / crop_pct)
    else:
        raise ValueError(f"grounding supports the 'center' and 'squash' crop modes, not {mode!r}")
    x0, y0 = (width - seen_w) / 2, (height - seen_h) / 2
    return x0, y0, x0 + seen_w, y0 + seen_h
