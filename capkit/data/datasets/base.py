"""What registered datasets share: the split check, the data root lookup and the "not found" error."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capkit.data.records import ImageRecord
from capkit.errors import CaptionFileError, DatasetNotFoundError

__all__ = [
    "CaptionDataset",
    "DatasetNotFoundError",
    "DATA_ENV",
    "resolve_root",
    "require_file",
    "read_text",
    "read_json",
    "field",
    "caption_text",
]

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


def read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM allowed), or a ``CaptionFileError`` naming the file where it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise CaptionFileError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from err


def read_json(path: Path) -> Any:
    """The file's JSON, or a ``CaptionFileError`` naming the file and line where it is not valid."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise CaptionFileError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err


def field(record: Any, key: str, where: str, kind: type | tuple[type, ...] = object) -> Any:
    """``record[key]`` of type ``kind``, or a ``CaptionFileError`` saying which record lacks what."""
    if not isinstance(record, Mapping):
        raise CaptionFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise CaptionFileError(f"{where}: has no {key!r} field")
    value = record[key]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CaptionFileError(f"{where}: {key!r} must be a {expected}, got {value!r}")
    return value


def caption_text(value: Any, where: str) -> str:
    """A caption, stripped: a non-empty string, or a ``CaptionFileError``."""
    if not isinstance(value, str) or not value.strip():
        raise CaptionFileError(f"{where}: a caption must be a non-empty string, got {value!r}")
    return value.strip()
