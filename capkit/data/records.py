"""ImageRecord: what every dataset gives for a split (an image, its captions, optional boxes)."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from capkit.data.images import DEFAULT_MAX_PIXELS, open_image
from capkit.errors import CorruptImageError, MissingImagesError

__all__ = ["Box", "ImageRecord", "CorruptImageError", "MissingImagesError", "drop_missing"]


class Box(NamedTuple):
    """An object's label and pixel box, ``0 <= x0 < x1 <= width`` and ``0 <= y0 < y1 <= height``."""

    label: str
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass
class ImageRecord:
    """One image of a split.

    Attributes:
        image_id: unique within the dataset (a file name or the dataset's own id, as a string).
        captions: every reference caption (raw text).
        path: the image file, or None when ``loader`` makes the image.
        loader: a picklable callable returning the PIL image (synthetic datasets).
        boxes: object boxes, for grounding datasets (``shapes``).
    """

    image_id: str
    captions: list[str]
    path: Path | None = None
    loader: Callable[[], Image.Image] | None = None
    boxes: list[Box] | None = None

    def open(self, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        """The image in upright 8-bit RGB (``open_image``); raises ``CorruptImageError`` naming the file and the
        image id when it cannot be decoded or exceeds ``max_pixels``."""
        if self.loader is not None:
            return self.loader()
        try:
            return open_image(self.path, max_pixels=max_pixels)
        except CorruptImageError as err:
            raise CorruptImageError(
                f"{err} (image id {self.image_id!r}). Replace the file, or set data.skip_corrupt_images=true to "
                f"leave it out."
            ) from err


def drop_missing(records: list[ImageRecord], skip: bool, dataset: str) -> list[ImageRecord]:
    """Records whose image file exists.

    Raises:
        MissingImagesError: some files are missing and ``skip`` is False, or every file is missing (count and
            first names given).
    """
    missing = [r for r in records if r.loader is None and not r.path.is_file()]
    if not missing:
        return records
    names = ", ".join(str(r.path) for r in missing[:5]) + (", ..." if len(missing) > 5 else "")
    summary = f"{dataset}: {len(missing)} of {len(records)} images are missing ({names})"
    if not skip:
        raise MissingImagesError(f"{summary}. Restore them, or set data.skip_missing_images=true to leave them out.")
    if len(missing) == len(records):
        raise MissingImagesError(f"{summary}: every image is missing, nothing is left once they are skipped")
    warnings.warn(f"{summary}; skipped (data.skip_missing_images=true)", stacklevel=2)
    missing_ids = {id(r) for r in missing}
    return [r for r in records if id(r) not in missing_ids]
