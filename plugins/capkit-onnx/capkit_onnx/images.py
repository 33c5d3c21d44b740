"""Pictures as the exported encoder takes them, with Pillow and numpy: opened as capkit opens them
(``capkit/data/images.py``), then resized and cropped as timm's evaluation transform does (the same Pillow calls
torchvision makes on a PIL image), to uint8 pixels (H, W, 3); the encoder graph scales and normalises them."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_PIXELS", "INTERPOLATIONS", "open_image", "to_rgb", "preprocess", "resized_size"]

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own default: about 13,000 x 13,000
INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def open_image(source: str | os.PathLike | IO[bytes], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at ``source`` in 8-bit RGB, upright as its EXIF orientation says, decoded fully.

    Raises:
        ValueError: more than ``max_pixels`` pixels (None: no limit).
        OSError: the file cannot be read or decoded.
    """
    with Image.open(source) as img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ValueError(f"image {getattr(source, 'name', source)} has {img.width} x {img.height} pixels, over "
                             f"the limit of {max_pixels:,}")
        return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as capkit makes it: 16-bit and float grey scaled (not clipped to white), transparency laid over
    white, every other mode through PIL."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        top = 1.0 if img.mode == "F" else 65535.0
        values = np.asarray(img, dtype=np.float64) / top
        return Image.fromarray((np.clip(values, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    if "transparency" in img.info or img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resized_size(width: int, height: int, preprocessing: Mapping[str, Any]) -> tuple[int, int]:
    """(width, height) after the resize of timm's eval transform: the shorter side to floor(crop / crop_pct),
    the longer in proportion (torchvision's ``Resize(int)``) for ``center``; each side so for ``squash``."""
    _, crop_h, crop_w = preprocessing["input_size"]
    crop_pct = preprocessing.get("crop_pct") or 0.875
    mode = preprocessing.get("crop_mode") or "center"
    if mode == "squash":
        return math.floor(crop_w / crop_pct), math.floor(crop_h / crop_pct)
    if mode != "center" or crop_h != crop_w:
        raise ValueError(f"preprocessing crop_mode {mode!r} with input {crop_h} x {crop_w} is not supported (center "
                         f"with a square input, or squash)")
    short = math.floor(crop_h / crop_pct)
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def preprocess(picture: Image.Image, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """An RGB picture -> uint8 pixels (H, W, 3) of the encoder's input size: resized (Pillow, the model's
    interpolation) and centre-cropped as torchvision's ``Resize`` and ``CenterCrop`` do it on a PIL image."""
    _, crop_h, crop_w = preprocessing["input_size"]
    size = resized_size(*picture.size, preprocessing)
    if picture.size != size:
        picture = picture.resize(size, INTERPOLATIONS[preprocessing.get("interpolation") or "bilinear"])
    pixels = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    height, width = pixels.shape[:2]
    if crop_w > width or crop_h > height:  # torchvision pads with zeros, then crops
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = pixels.shape[:2]
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return np.ascontiguousarray(pixels[top : top + crop_h, left : left + crop_w])
