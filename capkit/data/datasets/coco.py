"""``coco``: COCO captions in the official layout (``annotations/captions_<split><year>.json`` + image folder)."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from capkit.data.datasets.base import CaptionDataset, require_file, resolve_root
from capkit.data.records import ImageRecord
from capkit.registry import DATASETS

__all__ = ["CocoDataset"]

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
        with open(self.annotations, encoding="utf-8") as f:
            data = json.load(f)
        captions: dict[str, list[str]] = defaultdict(list)
        for ann in data["annotations"]:
            captions[str(ann["image_id"])].append(ann["caption"].strip())
        base = self.root / (image_dir or f"{split}{year}")
        self.records = [
            ImageRecord(str(img["id"]), captions[str(img["id"])], path=base / img["file_name"])
            for img in data["images"]
            if str(img["id"]) in captions
        ]

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "annotations": str(self.annotations.resolve())}
