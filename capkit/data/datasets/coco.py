"""``coco``: COCO captions in the official layout (``annotations/captions_<split><year>.json`` + image folder)."""
from __future__ import annotations

import logging
import os
from typing import Any

from capkit.data.datasets.base import CaptionDataset, caption_text, field, read_json, require_file, resolve_root
from capkit.data.records import ImageRecord
from capkit.errors import CaptionFileError
from capkit.registry import DATASETS

__all__ = ["CocoDataset"]

log = logging.getLogger(__name__)

DOWNLOAD = (
    "Download and unzip into the root: http://images.cocodataset.org/annotations/annotations_trainval2017.zip "
    "and the images, http://images.cocodataset.org/zips/train2017.zip and http://images.cocodataset.org/zips/val2017.zip"
)


@DATASETS.register("coco")
class CocoDataset(CaptionDataset):
    """COCO captions: every image of ``images[]`` that has captions; image ids are COCO's ids (as strings).

    Args:
        split: ``train``, ``val`` or ``test``; chooses the default file names.
        root: folder holding ``annotations/`` and the image folders (default ``$CAPKIT_DATA/coco``).
        year: the release, for the default file names.
        annotations: the captions JSON relative to ``root`` (default ``annotations/captions_<split><year>.json``).
        image_dir: the image folder relative to ``root`` (default ``<split><year>``).
    """

    name = "coco"

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        year: int = 2017,
        annotations: str | None = None,
        image_dir: str | None = None,
    ):
        super().__init__(split)
        self.root = resolve_root(root, "coco")
        self.annotations = require_file(
            self.root / (annotations or f"annotations/captions_{split}{year}.json"), self.name, DOWNLOAD
        )
        data = read_json(self.annotations)
        captions: dict[str, list[str]] = {}
        for i, ann in enumerate(field(data, "annotations", str(self.annotations), list)):
            where = f"{self.annotations}: annotations[{i}]"
            image_id = str(field(ann, "image_id", where, (int, str)))
            captions.setdefault(image_id, []).append(caption_text(field(ann, "caption", where), where))
        base = self.root / (image_dir or f"{split}{year}")
        seen: set[str] = set()
        for i, img in enumerate(field(data, "images", str(self.annotations), list)):
            where = f"{self.annotations}: images[{i}]"
            image_id = str(field(img, "id", where, (int, str)))
            file_name = field(img, "file_name", where, str)
            if image_id in seen:
                raise CaptionFileError(f"{where}: image id {image_id} is listed twice")
            seen.add(image_id)
            if image_id in captions:
                self.records.append(ImageRecord(image_id, captions[image_id], path=base / file_name))
        orphans = len(captions.keys() - seen)
        if orphans or len(seen) > len(self.records):
            log.info("coco %s: %d images without captions and the captions of %d unlisted images left out (%s)",
                     split, len(seen) - len(self.records), orphans, self.annotations)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "annotations": str(self.annotations.resolve())}
