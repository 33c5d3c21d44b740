"""``folder``: your own images plus a CSV or JSON Lines caption file."""
from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capkit.data.datasets.base import CaptionDataset, require_file, resolve_root
from capkit.data.records import ImageRecord
from capkit.errors import CaptionFileError
from capkit.registry import DATASETS

__all__ = ["FolderDataset"]

log = logging.getLogger(__name__)

FORMAT_HELP = (
    "A caption file is CSV with the header 'image,caption[,split]' (one row per caption), or JSON Lines with "
    '{"image": ..., "caption": "..." or "captions": [...], "split": ...} per line.'
)


@DATASETS.register("folder")
class FolderDataset(CaptionDataset):
    """Images under ``root`` with captions from a CSV (``.csv``) or JSON Lines (``.jsonl``) file.

    Rows name the image by its path relative to ``root`` (that path is the image id). Either the rows
    have a ``split`` field, or ``annotations`` contains ``{split}`` and there is one file per split.

    Every row is checked: a CSV row has the header's fields (quote a caption that holds a comma), a caption is
    a non-empty string, ``captions`` a non-empty list of them, a split one of the dataset's; a malformed row
    is a ``CaptionFileError`` naming the file and line. A caption given twice for one image is kept once,
    and the count of such duplicates is logged with the split's image and caption counts. A UTF-8 BOM is fine.

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
        captions: dict[str, list[str]] = {}
        duplicates, splits_seen = 0, set()
        for where, row in _read_rows(self.annotations):
            image, texts, row_split = self._check(where, row, per_split_file)
            splits_seen.add(row_split)
            if row_split != split:
                continue
            kept = captions.setdefault(image, [])
            for text in texts:
                if text in kept:
                    duplicates += 1
                else:
                    kept.append(text)
        if not captions:
            found = f"; the file has the splits {', '.join(sorted(splits_seen))}" if splits_seen - {split} else ""
            raise CaptionFileError(f"{self.annotations}: no captions for the {split} split{found}. {FORMAT_HELP}")
        self.records = [ImageRecord(name, caps, path=self.root / name) for name, caps in captions.items()]
        if duplicates:
            log.info("folder %s: %d captions given twice for one image left out (%s)", split, duplicates,
                     self.annotations)

    def _check(self, where: str, row: dict[str, Any], per_split_file: bool) -> tuple[str, list[str], str]:
        """A row's image, captions and split, or a ``CaptionFileError`` saying what is wrong with it."""
        if not isinstance(row, dict):
            raise CaptionFileError(f"{where}: a record must be a JSON object, got {type(row).__name__}. {FORMAT_HELP}")
        if "image" not in row or not ("caption" in row or "captions" in row):
            raise CaptionFileError(f"{where}: needs 'image' and 'caption' (or 'captions'). {FORMAT_HELP}")
        if "caption" in row and "captions" in row:
            raise CaptionFileError(f"{where}: has both 'caption' and 'captions'; give one of them")
        image = row["image"]
        if not isinstance(image, str) or not image.strip():
            raise CaptionFileError(f"{where}: 'image' must be a file name relative to the root, got {image!r}")
        texts = row["captions"] if "captions" in row else [row["caption"]]
        if not isinstance(texts, list) or not texts:
            raise CaptionFileError(f"{where}: 'captions' must be a non-empty list of strings, got {texts!r}")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise CaptionFileError(f"{where}: a caption must be a non-empty string, got {text!r}")
        if per_split_file:
            return image, [t.strip() for t in texts], self.split
        if "split" not in row:
            raise CaptionFileError(f"{where}: no 'split' field; add one, or use '{{split}}' in the file name")
        if row["split"] not in self.splits:
            raise CaptionFileError(f"{where}: split {row['split']!r} is not one of {', '.join(self.splits)}")
        return image, [t.strip() for t in texts], row["split"]

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "annotations": str(self.annotations.resolve())}


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", row)`` for each caption row of a ``.csv`` or ``.jsonl`` file."""
    if path.suffix not in (".csv", ".jsonl"):
        raise CaptionFileError(f"{path}: unknown caption file type {path.suffix!r}. {FORMAT_HELP}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a UTF-8 BOM is read as none
            yield from _csv_rows(path, f) if path.suffix == ".csv" else _jsonl_rows(path, f)
    except UnicodeDecodeError as err:
        raise CaptionFileError(
            f"{path}: not UTF-8 text (byte {err.start} of a line cannot be decoded); save it as UTF-8"
        ) from err


QUOTE_HELP = ('a quote (") that opens a field must close it just before the next comma or the end of the line; '
              'write a caption holding a quote quoted, with the quote doubled: "a 12"" ruler"')


def _csv_rows(path: Path, f) -> Iterator[tuple[str, dict[str, Any]]]:
    # strict: a stray quote is an error, where the lenient reader would merge the lines up to the next quote
    reader = csv.reader(f, strict=True)
    header = _next_record(reader, path, 1)
    if not header:
        raise CaptionFileError(
            f"{path}:1: an empty file, where the header 'image,caption[,split]' belongs. {FORMAT_HELP}"
        )
    header = [h.strip() for h in header]
    while True:
        start = reader.line_num + 1  # the record's first line (a quoted field may run over several)
        fields = _next_record(reader, path, start)
        if fields is None:
            return
        where = f"{path}:{start}"
        if any("\n" in v or "\r" in v for v in fields):
            raise CaptionFileError(f"{where}: a quoted field runs on to line {reader.line_num}; {QUOTE_HELP}")
        if not any(v.strip() for v in fields):
            continue  # a blank line
        if len(fields) != len(header):
            raise CaptionFileError(
                f"{where}: {len(fields)} fields where the header has {len(header)} ({', '.join(header)}); "
                f"quote a caption that holds a comma"
            )
        yield where, {k: v for k, v in zip(header, fields) if v != "" or k == "caption"}  # an empty caption is an error


def _next_record(reader, path: Path, start: int) -> list[str] | None:
    try:
        return next(reader, None)
    except csv.Error as err:  # named by the line the record starts on: where the stray quote is
        raise CaptionFileError(f"{path}:{start}: {err}; {QUOTE_HELP}") from err


def _jsonl_rows(path: Path, f) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(f, 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise CaptionFileError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
