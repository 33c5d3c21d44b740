"""``folder``: your own images plus a CSV or JSON Lines caption file."""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capkit.data.datasets.base import CaptionDataset, require_file, resolve_root
from capkit.data.records import ImageRecord
from capkit.registry import DATASETS

__all__ = ["FolderDataset"]

FORMAT_HELP = (
    "A caption file is CSV with the header 'image,caption[,split]' (one row per caption), or JSON Lines with "
    '{"image": ..., "caption": "..." or "captions": [...], "split": ...} per line.'
)


@DATASETS.register("folder")
class FolderDataset(CaptionDataset):
    """Images under ``root`` with captions from a CSV (``.csv``) or JSON Lines (``.jsonl``) file.

    Rows name the image by its path relative to ``root`` (that path is the image id). Either the rows
    have a ``split`` field, or ``annotations`` contains ``{split}`` and there is one file per split.

    Args:
        split: ``train``, ``val`` or ``test``.
        root: the image folder (default ``$CAPKIT_DATA/folder``).
        annotations: the caption file, relative to ``root`` or absolute; ``{split}`` is replaced by the split.
    """

    name = "folder"

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, annotations: str = "captions.csv"):
        super().__init__(split)
        self.root = resolve_root(root, "folder")
        self.annotations = require_file(self.root / annotations.format(split=split), self.name, FORMAT_HELP)
        per_split_file = "{split}" in annotations
        captions: dict[str, list[str]] = defaultdict(list)
        for where, row in _read_rows(self.annotations):
            if "image" not in row or not ("caption" in row or "captions" in row):
                raise ValueError(f"{where}: needs 'image' and 'caption' (or 'captions'). {FORMAT_HELP}")
            if not per_split_file and "split" not in row:
                raise ValueError(f"{where}: no 'split' field; add one, or use '{{split}}' in the file name")
            if per_split_file or row["split"] == split:
                texts = row["captions"] if "captions" in row else [row["caption"]]
                captions[row["image"]].extend(t.strip() for t in texts)
        self.records = [ImageRecord(name, caps, path=self.root / name) for name, caps in captions.items()]

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "annotations": str(self.annotations.resolve())}


def _read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", row dict)`` for each caption row of a ``.csv`` or ``.jsonl`` file."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".csv":
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v not in (None, "")}
        elif path.suffix == ".jsonl":
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
        else:
            raise ValueError(f"{path}: unknown caption file type {path.suffix!r}. {FORMAT_HELP}")
