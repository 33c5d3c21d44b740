"""Opening an image as users have them: EXIF orientation applied, every PIL mode turned into 8-bit RGB, and a
size limit against decompression bombs."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from capkit.errors import CorruptImageError

__all__ = ["open_image", "to_rgb", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own default: about 13,000 x 13,000


def open_image(source: str | os.PathLike | IO[bytes], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at ``source`` in 8-bit RGB, upright as its EXIF orientation says, decoded fully (a truncated
    file fails here, not later).

    Raises:
        CorruptImageError: the file cannot be decoded, or it has more than ``max_pixels`` pixels (a decompression
            bomb; None: no limit).
    """
    name = getattr(source, "name", source)
    try:
        with _own_pixel_limit(), Image.open(source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise CorruptImageError(
                    f"image {name} has {img.width} x {img.height} pixels, over the limit of {max_pixels:,} "
                    f"(data.max_image_pixels); raise the limit if the file is trusted"
                )
            return to_rgb(ImageOps.exif_transpose(img))
    except CorruptImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot decode image {name}: {err}") from err


_PIL_LIMIT = threading.Lock()


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """PIL's process-wide limit off while capkit opens an image: ``max_pixels`` decides instead (header only:
    ``Image.open`` reads no pixels)."""
    with _PIL_LIMIT:
        before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit grey (modes ``I;16*``, and ``I``, which PIL gives 16-bit PNGs) scaled from 0..65535 and
    float grey (``F``) from 0..1, where PIL's own conversion clips both to white; transparency (an alpha band or a
    transparent colour) laid over white, as a viewer shows it; palette, CMYK and the rest through PIL."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        top = 1.0 if img.mode == "F" else 65535.0
        values = np.asarray(img, dtype=np.float64) / top
        return Image.fromarray((np.clip(values, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    if "transparency" in img.info or img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
