"""On-disk cache of an encoder's frozen features: one float16 ``.npy`` (memory-mapped) + JSON sidecar per split.

What is cached is ``encoder.forward_frozen(images)``: the whole encoder's output when it is frozen, its frozen
trunk's (``unfinished``) when it trains its last stages.

A cache file is named ``<dataset>_<split>_<hash>`` where the hash covers everything that decides the
features: the encoder's ``cache_key()`` (model and weights) and the digest of the weights its frozen part holds
(``frozen_state``: the same model name can hold weights loaded from a checkpoint), the transform and the split's
identity (dataset, root/seed, image ids). Extraction writes ``*.partial-<pid>`` files and publishes them with
``os.replace``, the sidecar last, so an interrupted run (even ``kill -9``) never leaves a cache that reads
as complete, and the next run starts over. Extraction holds a file lock on its cache entry: a second process
asking for the same features waits, then reads what the first one wrote. The sidecar records each image file's
size, times and SHA-256: an entry serves while every file's size and times are the same, or else its content
(a dataset restored in place or mounted again at the same path keeps its features).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from filelock import FileLock
from torch import Tensor, nn
from tqdm.auto import tqdm

from capkit.data.images import DEFAULT_MAX_PIXELS
from capkit.data.loaders import EvaluationDataset, ImageSource, build_loader
from capkit.data.records import ImageRecord
from capkit.digests import state_sha256
from capkit.errors import DataError

__all__ = ["FeatureStore", "default_cache_dir", "cached_features"]

CACHE_ENV = "CAPKIT_CACHE"
IMAGE_DECODING = 2  # bumped when decoding changes the pixels (2: EXIF orientation, 16-bit grey, alpha on white)


def default_cache_dir() -> Path:
    """``$CAPKIT_CACHE/features``, else ``~/.cache/capkit/features``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "capkit") / "features"


class FeatureStore:
    """Cached features of one split: ``store[i]`` -> (N, C) float16 tensor of image ``image_ids[i]``.

    The array is memory-mapped on first access in each process (DataLoader workers included).
    """

    def __init__(self, path: Path, image_ids: list[str], grid: tuple[int, int], unfinished: bool = False):
        self.path, self.image_ids, self.grid, self.unfinished = path, image_ids, grid, unfinished
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Tensor:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[index]))  # (N, C), copied out of the map

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # workers map the file themselves


def cached_features(
    records: list[ImageRecord],
    encoder: nn.Module,
    transform: Callable[[Image.Image], Tensor],
    *,
    identity: dict[str, Any],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    skip_corrupt: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    view_seed: int | None = None,
    space_for: int = 1,
) -> FeatureStore:
    """The split's features from the cache, extracting them first when absent or incomplete.

    Args:
        records: the split's images.
        encoder: an encoder with ``cache_key()`` whose ``forward_frozen`` is cached (``cacheable``); it is run in
            eval mode.
        transform: the image transform fed to the encoder: deterministic, or random with ``view_seed``.
        identity: what identifies the split (``CaptionDataset.identity()``: dataset, split, root, ...).
        cache_dir: default ``default_cache_dir()``.
        skip_corrupt: leave undecodable images out of the cache (with a warning) instead of raising.
        max_pixels: the largest image accepted (see ``open_image``).
        view_seed: for a random (augmenting) transform: each image's randomness comes from (view_seed, its index),
            so the entry holds one fixed augmented view of each image (``ImageSource``'s ``seed``).
        space_for: an extraction first checks that the disk holds this many entries of its size (itself and the
            augmented views still to come), so that a run needing more than the disk has stops before the first.
    """
    ids = [r.image_id for r in records]
    key = {
        "encoder": encoder.cache_key(),
        "frozen_weights": state_sha256(encoder.frozen_state()),
        "transform": repr(transform),
        "decoding": IMAGE_DECODING,
        "data": identity,
        "image_ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        # which images an entry holds: one made by skipping unreadable images must not serve a run that does not
        # skip them (it would train without them, and without a word)
        "skip_corrupt": skip_corrupt,
        "max_pixels": max_pixels,
    }
    if view_seed is not None:  # absent otherwise, so that the entries made before views keep their names
        key["view_seed"] = view_seed
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    view = "" if view_seed is None else f"_view{view_seed}"
    stem = f"{identity.get('dataset', 'data')}_{identity.get('split', 'split')}{view}_{digest}"
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data_path, meta_path = directory / f"{stem}.npy", directory / f"{stem}.json"
    directory.mkdir(parents=True, exist_ok=True)
    files = _fingerprints(records)
    with _entry_lock(directory / f"{stem}.lock"):
        if meta_path.is_file() and data_path.is_file():
            meta = _read_sidecar(meta_path)
            if meta is not None and meta["key"] == key and _still_valid(meta, files, records, data_path, meta_path):
                return FeatureStore(data_path, meta["image_ids"], tuple(meta["grid"]), meta["unfinished"])
        for stale in directory.glob(f"{stem}.*.partial-*"):  # a killed extraction's (the lock is ours now)
            stale.unlink()
        if not os.access(directory, os.W_OK):
            raise DataError(f"the feature cache {directory} is not writable and holds no complete entry for "
                            f"{stem}; set data.cache_dir (or ${CACHE_ENV}) to a folder you can write")
        content = _content_digests(records)  # before extraction: a file changed during it reads as changed later
        source = ImageSource(records, transform, skip_corrupt, max_pixels, seed=view_seed)
        kept, grid, unfinished = _extract(source, encoder, data_path, batch_size, num_workers, device, space_for)
        shape = list(np.load(data_path, mmap_mode="r").shape)
        partial_meta = _partial(meta_path)
        meta = {"key": key, "image_ids": kept, "grid": list(grid), "unfinished": unfinished, "shape": shape,
                "files": files, "content": content}
        partial_meta.write_text(json.dumps(meta))
        os.replace(partial_meta, meta_path)  # the sidecar marks the cache complete
    return FeatureStore(data_path, kept, grid, unfinished)


@contextmanager
def _entry_lock(path: Path) -> Iterator[None]:
    """Hold a cache entry's lock; a read-only cache (shared by others) is read without one."""
    lock = FileLock(path)
    try:
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    """A cache entry's sidecar, or None (with a warning) where it is damaged."""
    try:
        meta = json.loads(path.read_text())
        if isinstance(meta, dict) and {"key", "image_ids", "grid", "shape"} <= meta.keys():
            return meta
        problem = "fields are missing"
    except (OSError, ValueError) as err:
        problem = str(err)
    warnings.warn(f"{path} is damaged ({problem}); extracting the features again", stacklevel=3)
    return None


def _fingerprints(records: list[ImageRecord]) -> dict[str, list[int]]:
    """Each image file's size, modification time and status-change time: a rewritten (or fixed) file changes
    them, even one rewritten with the same size whose modification time was set back (a copy that keeps times,
    ``touch -d``): only the kernel sets the status-change time."""
    out = {}
    for r in records:
        if r.path is not None and r.path.is_file():
            stat = r.path.stat()
            out[r.image_id] = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    return out


def _content_digests(records: list[ImageRecord], only: set[str] | None = None) -> dict[str, str]:
    """Each image file's SHA-256 (of the ids in ``only``, when given); a file that cannot be read is left out, so
    that it reads as changed."""
    out = {}
    for r in records:
        if r.path is not None and (only is None or r.image_id in only):
            try:
                out[r.image_id] = hashlib.sha256(r.path.read_bytes()).hexdigest()
            except OSError:
                pass
    return out


def _changed_files(meta: dict[str, Any], files: dict[str, list[int]], records: list[ImageRecord]) -> set[str]:
    """The images whose files differ from those the entry was extracted from.

    A file whose size or times differ is compared by content with the SHA-256 recorded at extraction, as DVC
    does: restored in place, mounted again at the same path or touched, it keeps its features. A file of an entry
    written before the digests were recorded counts as changed whenever its size or times differ."""
    recorded, digests = meta.get("files", {}), meta.get("content")
    digests = digests if isinstance(digests, dict) else {}  # absent (an older entry) or damaged: times decide
    moved = {i for i in files.keys() | recorded.keys() if files.get(i) != recorded.get(i)}
    now = _content_digests(records, moved) if moved and digests else {}
    return {i for i in moved if i not in digests or now.get(i) != digests[i]}


def _still_valid(meta: dict[str, Any], files: dict[str, list[int]], records: list[ImageRecord], data_path: Path,
                 meta_path: Path) -> bool:
    """Whether a complete cache entry still holds its images' features: no image file changed since it was
    written (``_changed_files``), and the array is whole (the shape its sidecar records). Says why where it does
    not. Where only files' times changed, the sidecar records the new ones, so that the next run compares times
    only."""
    changed = sorted(_changed_files(meta, files, records))
    if changed:
        warnings.warn(f"{len(changed)} images changed since the features in {data_path} were extracted "
                      f"(e.g. {changed[:3]}); extracting them again", stacklevel=3)
        return False
    try:
        shape = list(np.load(data_path, mmap_mode="r").shape)
    except (OSError, ValueError) as err:
        shape = f"unreadable ({err})"
    if shape != meta["shape"]:
        warnings.warn(f"{data_path} is damaged (shape {shape}, its sidecar says {meta['shape']}); extracting again",
                      stacklevel=3)
        return False
    if meta.get("files") != files:  # only times differ (the contents matched)
        _write_sidecar(meta_path, {**meta, "files": files})
    return True


def _write_sidecar(path: Path, meta: dict[str, Any]) -> None:
    """Publish an entry's updated sidecar; a read-only cache keeps the old one (its files are compared by content
    again next time)."""
    partial = _partial(path)
    try:
        partial.write_text(json.dumps(meta))
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)


def _check_free_space(data_path: Path, size: int, entries: int) -> None:
    """A memory-mapped array whose disk fills up kills the process (SIGBUS) on a later write: refuse it first,
    and ``entries`` - 1 more of its size (augmented views still to extract)."""
    free = shutil.disk_usage(data_path.parent).free
    if size * entries > free:
        what = f"the features of {data_path.stem}" + (f" and {entries - 1} more views" if entries > 1 else "")
        raise DataError(f"{what} need {size * entries / 1e6:,.1f} MB, and {data_path.parent} has {free / 1e6:,.1f} "
                        f"MB free; free some space there, or set data.cache_dir (or ${CACHE_ENV}) to a disk with room")


def _partial(path: Path) -> Path:
    """Where this process writes ``path`` before publishing it."""
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


@torch.no_grad()
def _extract(
    source: ImageSource,
    encoder: nn.Module,
    data_path: Path,
    batch_size: int,
    num_workers: int,
    device: str | torch.device,
    space_for: int = 1,
) -> tuple[list[str], tuple[int, int], bool]:
    """Write (len(kept), N, C) float16 features to ``data_path``; return the kept image ids, the grid and whether
    the features are ``unfinished``."""
    records = source.records
    loader = build_loader(EvaluationDataset(source, records), batch_size, num_workers=num_workers)
    partial_path = _partial(data_path)
    was_training, home = encoder.training, next(encoder.parameters()).device
    encoder.eval().to(device)  # extraction runs on ``device``; the encoder goes back where it was afterwards
    array, kept, grid, unfinished = None, [], (0, 0), False
    try:
        for batch in tqdm(loader, desc=f"features {data_path.stem}", unit="batch"):
            if not batch.image_ids:
                continue
            out = encoder.forward_frozen(batch.images.to(device))  # feats (B, N, C)
            if array is None:  # rows for every image; skipped corrupt ones leave unused rows at the end
                grid, unfinished = out.grid, out.unfinished
                shape = (len(records), *out.feats.shape[1:])
                _check_free_space(data_path, int(np.prod(shape)) * np.dtype(np.float16).itemsize, space_for)
                array = np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.float16, shape=shape)
            array[len(kept) : len(kept) + len(batch)] = out.feats.to("cpu", torch.float16).numpy()
            kept.extend(batch.image_ids)
    finally:
        encoder.train(was_training).to(home)
    if array is None:
        raise RuntimeError(f"no image of {data_path.stem} could be decoded; nothing to cache")
    array.flush()
    del array
    os.replace(partial_path, data_path)
    return kept, grid, unfinished
