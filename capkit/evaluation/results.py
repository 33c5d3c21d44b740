"""Caption files: COCO results (``[{"image_id", "caption"}]``), references, per-image scores."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capkit.errors import CaptionFileError, DatasetNotFoundError
from capkit.evaluation.metric import ImageId

__all__ = ["load_predictions", "load_references", "write_coco_results", "write_per_image"]


def _read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{str(path)!r} not found")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CaptionFileError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err


def load_predictions(path: str | os.PathLike) -> dict[str, str]:
    """``{image_id: caption}`` from a COCO results file; image ids become strings."""
    data = _read_json(path)
    if not isinstance(data, list) or not all(isinstance(r, dict) and {"image_id", "caption"} <= r.keys() for r in data):
        raise CaptionFileError(f'{path}: expected COCO results, a JSON list of {{"image_id": ..., "caption": ...}}')
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
