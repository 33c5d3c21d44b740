"""Caption many image files: collect them (files, folders, list files), read them in worker processes, decode
them in batches, write each batch to a captions file as it is done (resumable), report the files that cannot be
read and go on."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from capkit.data.images import open_image
from capkit.errors import CaptionFileError, CorruptImageError, DataError, OutputPathError
from capkit.evaluation.results import CaptionFileWriter, read_caption_rows, read_text
from capkit.evaluation.results import output_format as output_format_of
from capkit.pretrained.model import CaptionResult, TrainedCaptioner

__all__ = ["IMAGE_EXTENSIONS", "ImageFile", "CaptionSummary", "collect_images", "caption_files", "done_ids",
           "default_workers"]

log = logging.getLogger("capkit.caption")

LOADER_CHUNK = 16  # images a worker reads and sends at once
FIGURE_SIDE = 1024  # the longest side of the picture kept beside each caption (for its attention figure)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
LIST_EXTENSIONS = {".txt", ".lst", ".list"}


@dataclass(frozen=True)
class ImageFile:
    path: Path
    image_id: str  # the file's name, or its path relative to the folder given (unique within one output)


@dataclass
class CaptionSummary:
    captioned: int = 0
    already_done: int = 0  # in the output file before this run
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)


def default_workers() -> int:
    """Image-reading processes beside the one running the model: one per spare core, at most 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[ImageFile]:
    """The image files that ``inputs`` name, in order: image files; folders, searched recursively for files with
    an image extension (``IMAGE_EXTENSIONS``), sorted; text files (``.txt``, ``.lst``) listing one image path per
    line (relative to the list's folder; blank lines and ``#`` comments skipped).

    Raises:
        DataError: an input does not exist or is of no known kind, or two different files would get one image id.
    """
    found: list[ImageFile] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                log.warning("%s: no image files in this folder (extensions: %s)", path,
                            ", ".join(sorted(IMAGE_EXTENSIONS)))
            found += [ImageFile(p, p.relative_to(path).as_posix()) for p in files]
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            found += _listed(path)
        elif path.is_file():
            found.append(ImageFile(path, path.name))
        else:
            raise DataError(f"no such image file or folder: {path} (give image files, folders of images or a .txt "
                            f"list of image paths)")
    return _unique(found)


def _listed(list_file: Path) -> list[ImageFile]:
    out = []
    for number, line in enumerate(read_text(list_file).splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if Path(entry).is_absolute() else list_file.parent / entry
        if not path.is_file():
            raise DataError(f"{list_file}:{number}: no such image file {entry!r} (paths are relative to the list's "
                            f"folder)")
        out.append(ImageFile(path, entry))
    return out


def _unique(files: list[ImageFile]) -> list[ImageFile]:
    """The same file given twice is captioned once; two files with one id cannot share an output."""
    by_id: dict[str, Path] = {}
    out = []
    for f in files:
        seen = by_id.get(f.image_id)
        if seen is None:
            by_id[f.image_id] = f.path.resolve()
            out.append(f)
        elif seen != f.path.resolve():
            raise DataError(f"two images have the id {f.image_id!r} ({seen} and {f.path}): caption them into "
                            f"separate output files")
    return out


def _check_same_files(output: str | os.PathLike | None, files: Sequence[ImageFile], rows: list[dict[str, Any]]) -> None:
    """An image id the output already has must be the same file, or the new image would be skipped as done
    (``2023/IMG_0001.jpg`` then ``2024/IMG_0001.jpg``, each folder captioned into one output). COCO results
    record no file: their ids alone count."""
    recorded = {str(r["image_id"]): Path(r["file"]) for r in rows if r.get("file")}
    for f in files:
        earlier = recorded.get(f.image_id)
        # a relative path recorded from another working directory may not resolve here: only a file that is
        # there and is another file is known to differ
        if earlier is not None and earlier.is_file() and not os.path.samefile(earlier, f.path):
            raise DataError(f"{output} already has the image id {f.image_id!r}, from {earlier}; {f.path} has the same "
                            f"id: caption it into another output file")


def done_ids(output: str | os.PathLike, fmt: str | None = None) -> tuple[set[str], list[dict[str, Any]]]:
    """The image ids (and rows) an existing captions file already has, for a resumed run; none if it is absent."""
    if not Path(output).is_file() or Path(output).stat().st_size == 0:
        return set(), []
    try:
        rows = read_caption_rows(output, fmt)
    except (UnicodeDecodeError, OSError) as err:
        raise CaptionFileError(f"{output}: cannot be read as a captions file to resume ({err}); give another "
                               f"output file") from err
    return {str(r["image_id"]) for r in rows}, rows


def caption_files(
    model: TrainedCaptioner,
    files: Sequence[ImageFile],
    *,
    output: str | os.PathLike | None = None,
    output_format: str | None = None,
    decoding: dict[str, Any] | None = None,
    batch_size: int | None = None,
    attention_out: str | os.PathLike | None = None,
    on_result: Callable[[ImageFile, CaptionResult], None] | None = None,
    on_unreadable: Callable[[ImageFile, str], None] | None = None,
    progress: bool = True,
    workers: int | None = None,
    n_best: int = 1,
) -> CaptionSummary:
    """Caption ``files`` ``batch_size`` at a time (default: the model's ``eval.batch_size``), so memory does not
    grow with their number.

    Args:
        output: a captions file (JSON Lines, CSV or COCO results: ``output_format`` or its suffix); the images it
            already has are skipped and each finished batch is added, so an interrupted run resumes where it was.
        decoding: ``beam_size``, ``max_len``, ``length_penalty``, ``no_repeat_ngram_size``, ``suppress_unk``
            (default: the model's own).
        attention_out: a folder for each image's attention figure (``<image id without suffix>_attention.png``,
            ``/`` as ``__``).
        on_result: called with each file's result as it is done (e.g. to print it).
        on_unreadable: called with each file that cannot be read and why (default: a logged warning); it is
            left out and counted in the summary.
        workers: processes that read and preprocess the images ahead of the model (0: in this process; default:
            ``default_workers()``).
        n_best: > 1 keeps each image's best ``n_best`` captions with their scores (JSON Lines output only).
    """
    summary = CaptionSummary()
    if n_best > 1 and output is not None and output_format_of(output, output_format) != "jsonl":
        raise DataError(f"{output}: an n-best list needs JSON Lines output (a .jsonl file); CSV and COCO results "
                        f"hold one caption per image")
    done, rows = done_ids(output, output_format) if output is not None else (set(), [])
    _check_same_files(output, files, rows)
    todo = [f for f in files if f.image_id not in done]
    summary.already_done = len(files) - len(todo)
    if summary.already_done:
        log.info("%s already has %d of the %d images: captioning the other %d", output, summary.already_done,
                 len(files), len(todo))
    decoding = decoding or model.decoding
    size = batch_size or model.config.eval.batch_size
    figures = _figure_folder(attention_out) if attention_out is not None else None
    if figures is not None:
        _check_figure_names(files)
    writer = CaptionFileWriter(output, output_format, existing=rows) if output is not None else None
    workers = default_workers() if workers is None else workers
    try:
        with tqdm(total=len(todo), unit="img", desc="captioning", disable=not progress) as bar:
            report = on_unreadable or (lambda f, why: log.warning("skipped %s: %s", f.path, why))
            for batch, inputs in _opened_batches(model, todo, size, workers if todo else 0, summary, report):
                results = model.caption_pictures([(image, str(f.path)) for f, image in batch], inputs=inputs,
                                                 n_best=n_best, **decoding)
                if writer is not None:
                    writer.write([
                        {"image_id": f.image_id, "file": str(f.path), "caption": r.caption, "score": round(r.score, 4),
                         "n_best": [{"caption": c, "score": round(v, 4)} for c, v in r.n_best]}
                        for (f, _), r in zip(batch, results)
                    ])
                for (f, _), result in zip(batch, results):
                    if figures is not None:
                        result.save_figure(figures / _figure_name(f.image_id))
                    if on_result is not None:
                        on_result(f, result)
                summary.captioned += len(batch)
                bar.update(len(batch))
    finally:
        if writer is not None:
            writer.close()
    return summary


def _figure_folder(path: str | os.PathLike) -> Path:
    """``--attention-out``, created now: a path that cannot be a folder fails before any image is captioned."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"{folder}: cannot hold the attention figures ({err.strerror or err}); give a "
                              f"folder") from err
    return folder


def _check_figure_names(files: Sequence[ImageFile]) -> None:
    """Two images whose figures would get one file name (``a.jpg`` and ``a.png``; ``sub/x.jpg`` and
    ``sub__x.jpg``): refused, where the second figure would silently replace the first."""
    named: dict[str, ImageFile] = {}
    for f in files:
        other = named.setdefault(_figure_name(f.image_id), f)
        if other is not f:
            raise DataError(f"{other.path} and {f.path} would share the attention figure "
                            f"{_figure_name(f.image_id)}: caption them with separate --attention-out folders")


def _figure_name(image_id: str) -> str:
    """``sub/photo.jpg`` -> ``sub__photo_attention.png``: one flat folder of figures."""
    return f"{Path(image_id).with_suffix('').as_posix().replace('/', '__')}_attention.png"


class _ImageFiles(Dataset):
    """Opens and preprocesses the image files in the loader's worker processes: item i is
    (i, RGB picture at most ``FIGURE_SIDE`` a side, (3, H, W) input from the full picture) or (i, None, why it
    cannot be read)."""

    def __init__(self, files: Sequence[ImageFile], model: TrainedCaptioner):
        self.files, self.max_pixels, self.transform = files, model.config.data.max_image_pixels, model.transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Image.Image | None, torch.Tensor | str]:
        try:
            picture = open_image(self.files[index].path, max_pixels=self.max_pixels)
        except (CorruptImageError, OSError) as err:
            return index, None, str(err)  # the text: an exception object need not survive the trip between processes
        inputs = self.transform(picture)  # from the full picture
        # what travels to the model's process and waits there is a copy for the figure, at most FIGURE_SIDE
        # pixels a side: a 12-megapixel photo would otherwise hold 36 MB per image in the queue
        picture.thumbnail((FIGURE_SIDE, FIGURE_SIDE))
        return index, picture, inputs


def _opened_batches(
    model: TrainedCaptioner, files: Sequence[ImageFile], size: int, workers: int, summary: CaptionSummary,
    report: Callable[[ImageFile, str], None],
) -> Iterator[tuple[list[tuple[ImageFile, Image.Image]], torch.Tensor]]:
    """Batches of ((file, picture) pairs, (B, 3, H, W) inputs) of ``size`` readable images; an unreadable file
    is reported, counted and left out.

    ``workers`` processes read the files ahead of the model in chunks of at most ``LOADER_CHUNK`` images, two
    chunks each, so that what waits in the queue is small and memory does not grow with the number of files or
    the batch size; the chunks are joined into batches here."""
    loader = DataLoader(_ImageFiles(files, model), batch_size=min(size, LOADER_CHUNK), num_workers=workers,
                        collate_fn=list, prefetch_factor=2 if workers else None)
    batch: list[tuple[ImageFile, Image.Image]] = []
    inputs: list[torch.Tensor] = []
    for chunk in loader:
        for index, picture, value in chunk:
            if picture is None:
                report(files[index], value)
                summary.unreadable.append((files[index].path, value))
                continue
            batch.append((files[index], picture))
            inputs.append(value)
            if len(batch) == size:
                yield batch, torch.stack(inputs)
                batch, inputs = [], []
    if batch:
        yield batch, torch.stack(inputs)
