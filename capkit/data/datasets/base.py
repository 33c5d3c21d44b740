"""What registered datasets share: the split check, the data root lookup and the "not found" error."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from capkit.data.records import ImageRecord
from capkit.errors import DatasetNotFoundError

__all__ = ["CaptionDataset", "DatasetNotFoundError", "DATA_ENV", "resolve_root", "require_file"]

DATA_ENV = "CAPKIT_DATA"  # a folder holding one sub-folder per dataset (flickr8k/, coco/, ...)


class CaptionDataset:
    """Base of the registered datasets (``DATASETS``): the ``records`` of one ``split``.

    Subclasses set ``name`` and ``splits``, fill ``self.records`` and extend ``identity()`` with whatever
    else decides their content (root, seed, ...); the feature cache keys on it.
    """

    name: str = ""
    splits: tuple[str, ...] = ("train", "val", "test")

    def __init__(self, split: str):
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; its splits: {', '.join(self.splits)}")
        self.split = split
        self.records: list[ImageRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.name, "split": self.split}


def resolve_root(root: str | os.PathLike | None, subdir: str) -> Path:
    """``root`` when given, else ``$CAPKIT_DATA/<subdir>``, else the current directory's ``data/<subdir>``."""
    if root is not None:
        return Path(root).expanduser()
    base = os.environ.get(DATA_ENV)
    return Path(base).expanduser() / subdir if base else Path("data") / subdir


def require_file(path: Path, dataset: str, download: str) -> Path:
    """``path`` if it exists, else a ``DatasetNotFoundError`` saying where it was expected and how to get it."""
    if path.exists():
        return path
    raise DatasetNotFoundError(
        f"{dataset}: expected {path} but it does not exist. Set the dataset's root in the config "
        f"(data.dataset.root=PATH) or ${DATA_ENV} (a folder with one sub-folder per dataset). {download}"
    )
