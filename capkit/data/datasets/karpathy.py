"""``karpathy``: Karpathy-split JSON files (``dataset_{coco,flickr8k,flickr30k}.json``)."""
from __future__ import annotations

import os
from typing import Any

from capkit.data.datasets.base import CaptionDataset, caption_text, field, read_json, require_file, resolve_root
from capkit.data.records import ImageRecord
from capkit.errors import CaptionFileError
from capkit.registry import DATASETS

__all__ = ["KarpathyDataset", "KARPATHY_SPLITS"]

KARPATHY_SPLITS = ("train", "val", "test", "restval")

DOWNLOAD = (
    "The split files are in https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip; "
    "the images come from the dataset itself (COCO: http://images.cocodataset.org/zips/train2014.zip and "
    "val2014.zip; Flickr8k: https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip)"
)


@DATASETS.register("karpathy")
class KarpathyDataset(CaptionDataset):
    """A Karpathy-style JSON: ``images[]`` with ``filename``, optional ``filepath``, ``split``,
    ``sentences[].raw`` and, for COCO, ``cocoid``. Image ids are ``cocoid`` when present, else the file name.

    Args:
        split: ``train``, ``val`` or ``test``.
        root: dataset folder (default ``$CAPKIT_DATA/<dataset>``, the dataset named by ``annotations``).
        annotations: the JSON file, relative to ``root`` or absolute.
        image_dir: folder of the images, relative to ``root``; an image is ``image_dir/[filepath/]filename``.
        use_restval: count ``restval`` images as training images (the usual COCO practice).
    """

    name = "karpathy"

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        annotations: str = "dataset_flickr8k.json",
        image_dir: str = "Flicker8k_Dataset",
        use_restval: bool = True,
    ):
        super().__init__(split)
        subdir = annotations.rsplit("/", 1)[-1].removeprefix("dataset_").split(".")[0]  # dataset_coco.json -> coco
        self.root = resolve_root(root, subdir)
        self.annotations = require_file(self.root / annotations, self.name, DOWNLOAD)
        images = field(read_json(self.annotations), "images", str(self.annotations), list)
        wanted = {split} | ({"restval"} if split == "train" and use_restval else set())
        base = self.root / image_dir
        seen: dict[str, int] = {}
        for i, img in enumerate(images):
            where = f"{self.annotations}: images[{i}]"
            filename = field(img, "filename", where, str)
            image_split = field(img, "split", where, str)
            if image_split not in KARPATHY_SPLITS:
                raise CaptionFileError(f"{where}: split {image_split!r} is not one of {', '.join(KARPATHY_SPLITS)}")
            raws = [caption_text(field(s, "raw", f"{where}.sentences[{j}]"), f"{where}.sentences[{j}]")
                    for j, s in enumerate(field(img, "sentences", where, list))]
            if not raws:
                raise CaptionFileError(f"{where}: no sentences")
            image_id = str(img.get("cocoid", filename))
            if image_id in seen:
                raise CaptionFileError(f"{where}: image {image_id} is listed twice (first at images[{seen[image_id]}])")
            seen[image_id] = i
            if image_split in wanted:
                self.records.append(ImageRecord(image_id, raws, path=base / img.get("filepath", "") / filename))
        self.use_restval = use_restval

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "annotations": str(self.annotations.resolve()), "restval": self.use_restval}
