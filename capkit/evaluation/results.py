"""Caption files: COCO results (``[{"image_id", "caption"}]``), ``capkit caption``'s JSON Lines and CSV,
references, per-image scores."""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capkit.errors import CaptionFileError, DatasetNotFoundError, OutputPathError
from capkit.evaluation.metric import ImageId

__all__ = [
    "OUTPUT_FORMATS",
    "CAPTION_FIELDS",
    "output_format",
    "read_caption_rows",
    "CaptionFileWriter",
    "load_predictions",
    "load_references",
    "write_coco_results",
    "write_per_image",
]

OUTPUT_FORMATS = ("jsonl", "csv", "coco")
CAPTION_FIELDS = ("image_id", "file", "caption", "score")  # a row of capkit caption's JSON Lines and CSV


def output_format(path: str | os.PathLike, given: str | None = None) -> str:
    """``given``, or the format a captions file's name says: ``.csv`` CSV, ``.json`` COCO results, else JSON Lines."""
    if given is not None:
        if given not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {given!r}")
        return given
    suffix = Path(path).suffix.lower()
    return {".csv": "csv", ".json": "coco"}.get(suffix, "jsonl")


def read_caption_rows(path: str | os.PathLike, fmt: str | None = None) -> list[dict[str, Any]]:
    """The rows of a captions file (``output_format``): dicts with at least ``image_id`` and ``caption``.

    A JSON Lines or CSV file cut short by an interruption loses only its unfinished last line.

    Raises:
        CaptionFileError: a malformed line or row, named by its number.
    """
    fmt = output_format(path, fmt)
    path = Path(path)
    if fmt == "coco":
        data = _read_json(path)
        rows = data if isinstance(data, list) else None
    elif fmt == "csv":
        text = read_text(path)
        if text and not text.endswith("\n"):  # the row a killed run did not finish (as the writer sees it)
            text = text[: text.rfind("\n") + 1]
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    else:
        rows, lines = [], read_text(path).split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                # no newline after it, and cut short: the line a killed run did not finish (a complete last line
                # without its newline counts; CaptionFileWriter adds the newline)
                if number == len(lines) and number > 1:
                    break
                raise CaptionFileError(f"{path}:{number}: not a JSON object ({err.msg})") from err
    if rows is None:
        raise CaptionFileError(f'{path}: expected COCO results, a JSON list of {{"image_id": ..., "caption": ...}}')
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not {"image_id", "caption"} <= row.keys():
            raise CaptionFileError(f'{path}: row {number} needs "image_id" and "caption", got {row!r}')
        if not isinstance(row["caption"], str) or not isinstance(row["image_id"], (str, int)) \
                or isinstance(row["image_id"], bool):
            # JSON null or a number, or a CSV row short of a column (its missing fields read as None)
            raise CaptionFileError(f'{path}: row {number} needs a text "caption" and a text or integer "image_id", '
                                   f'got {row!r}')
    return rows


class CaptionFileWriter:
    """Appends captions to a JSON Lines or CSV file as they come (each row flushed, so an interrupted run keeps
    what it wrote), or keeps a COCO results file complete (rewritten atomically after each ``write``)."""

    def __init__(self, path: str | os.PathLike, fmt: str | None = None, *, existing: Sequence[Mapping] = ()):
        """Opens (or, for COCO, writes) the file at once, so that a path that cannot be written fails before
        any image is captioned.

        Raises:
            OutputPathError: ``path`` is a folder, or it cannot be created or written.
        """
        self.path, self.fmt = Path(path), output_format(path, fmt)
        if self.path.is_dir():
            raise OutputPathError(f"{self.path} is a folder: give a file for the captions, e.g. "
                                  f"{self.path / ('captions.' + {'coco': 'json'}.get(self.fmt, self.fmt))}")
        self._coco = [{"image_id": r["image_id"], "caption": r["caption"]} for r in existing]
        self._file = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.fmt == "coco":
                self._write_coco()
            else:
                new = not self.path.exists() or self.path.stat().st_size == 0
                if not new:
                    self._drop_cut_line()
                self._file = self.path.open("a", encoding="utf-8", newline="")
                self._csv = csv.DictWriter(self._file, CAPTION_FIELDS) if self.fmt == "csv" else None
                if self._csv is not None and new:
                    self._csv.writeheader()
        except OSError as err:
            raise OutputPathError(f"{self.path}: cannot write the captions there ({err.strerror or err}); give "
                                  f"another output file") from err

    def _drop_cut_line(self) -> None:
        """An interrupted run may have left half a line (``read_caption_rows`` ignores it): cut it off; a complete
        JSON line that only lacks its newline gets it. A file with no complete line is no captions file this
        writer made: it is refused, not cut."""
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        end = data.rfind(b"\n") + 1
        if end == 0:
            raise CaptionFileError(f"{self.path} holds no complete line of captions; it is not a captions file an "
                                   f"interrupted run left: give another output file")
        if self.fmt == "jsonl" and _is_json(data[end:]):
            with self.path.open("ab") as f:
                f.write(b"\n")
            return
        with self.path.open("r+b") as f:
            f.truncate(end)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.fmt == "coco":
            self._coco += [{"image_id": r["image_id"], "caption": r["caption"]} for r in rows]
            self._write_coco()
            return
        for row in rows:
            if self._csv is not None:
                self._csv.writerow({k: row.get(k) for k in CAPTION_FIELDS})
            else:  # JSON Lines also keep an n-best list
                record = {k: row.get(k) for k in CAPTION_FIELDS}
                if row.get("n_best"):
                    record["n_best"] = row["n_best"]
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def _write_coco(self) -> None:
        """The whole results list, replacing the file atomically: it is always complete JSON."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self._coco, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CaptionFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def read_text(path: str | os.PathLike) -> str:
    """A text file as written, byte for byte (no newline translation, so that ``\r`` ends no line here while the
    writer's byte-level check would cut it), a UTF-8 byte-order mark dropped.

    Raises:
        DatasetNotFoundError: no such file (or a folder).
        CaptionFileError: it is not UTF-8, naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{str(path)!r} not found" + (" (it is a folder; give a file)" if path.is_dir()
                                                                  else ""))
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CaptionFileError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as "
                               f"UTF-8") from err


def _read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise CaptionFileError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err


def load_predictions(path: str | os.PathLike) -> dict[str, str]:
    """``{image_id: caption}`` from a COCO results file, or ``capkit caption``'s JSON Lines or CSV (by the file's
    suffix, ``output_format``); image ids become strings."""
    if not Path(path).is_file():
        raise DatasetNotFoundError(f"{str(path)!r} not found")
    data = read_caption_rows(path)
    hyps: dict[str, str] = {}
    for record in data:
        image_id = str(record["image_id"])
        if image_id in hyps:
            raise CaptionFileError(f"{path}: image {image_id!r} has more than one caption; keep one per image")
        hyps[image_id] = record["caption"]
    return hyps


def load_references(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{image_id: [captions]}`` from COCO captions JSON (``{"annotations": [{"image_id", "caption"}]}``) or
    from a plain ``{image_id: [captions]}`` mapping (detected by the ``annotations`` key); ids become strings."""
    data = _read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        refs: dict[str, list[str]] = {}
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or not {"image_id", "caption"} <= ann.keys():
                raise CaptionFileError(f'{path}: every COCO annotation needs "image_id" and "caption", got {ann!r}')
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        return refs
    if isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in data.values()
    ):
        return {str(k): v for k, v in data.items()}
    raise CaptionFileError(
        f'{path}: expected COCO captions ({{"annotations": [{{"image_id", "caption"}}, ...]}}) '
        f"or a mapping {{image_id: [caption, ...]}}"
    )


def _write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_coco_results(path: str | os.PathLike, hyps: Mapping[ImageId, str]) -> None:
    """Write ``[{"image_id", "caption"}]``, the format COCO evaluation servers and ``load_predictions`` read."""
    _write_json(path, [{"image_id": i, "caption": c} for i, c in hyps.items()])


def write_per_image(
    path: str | os.PathLike,
    hyps: Mapping[ImageId, str],
    refs: Mapping[ImageId, Sequence[str]],
    per_image: Mapping[ImageId, Mapping[str, float]],
) -> None:
    """Write ``[{"image_id", "caption", "references", <score key>: value, ...}]`` for error analysis."""
    _write_json(
        path,
        [
            {"image_id": i, "caption": c, "references": list(refs[i]), **per_image.get(i, {})}
            for i, c in hyps.items()
        ],
    )
