"""``flickr8k``: the official Flickr8k download (token file, split lists, image folder)."""
from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capkit.data.datasets.base import CaptionDataset, caption_text, read_text, require_file, resolve_root
from capkit.data.records import ImageRecord
from capkit.errors import CaptionFileError, ConfigError
from capkit.registry import DATASETS

__all__ = ["Flickr8kDataset"]

log = logging.getLogger(__name__)

DOWNLOAD = (
    "Download and unzip both archives into the root: "
    "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip and "
    "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip"
)
SPLIT_FILES = {"train": "trainImages", "val": "devImages", "test": "testImages"}
_BOGUS_NAME = re.compile(r"\.jpg\.\d+$")  # e.g. 2258277193_586949ec62.jpg.1


@DATASETS.register("flickr8k")
class Flickr8kDataset(CaptionDataset):
    """Flickr8k with its standard splits (``val`` is the ``devImages`` list): 6,000 / 1,000 / 1,000 images,
    5 captions each; image ids are the file names.

    The token file's bogus ``2258277193_586949ec62.jpg.1#0..4`` entries (a name with ``.1`` appended) are
    dropped: they name no image file and no split list names them.

    Args:
        split: ``train``, ``val`` or ``test``.
        root: folder holding ``Flickr8k_text/`` and ``Flicker8k_Dataset/`` (default ``$CAPKIT_DATA/flickr8k``).
        split_files: split -> the path of a file listing image names (one per line) to use instead of the
            standard list, e.g. ``{train: /data/first_5000.txt}`` to hold some training images out; a path is
            relative to ``root/Flickr8k_text`` unless absolute. Splits not named keep the standard lists.
    """

    name = "flickr8k"

    def __init__(
        self, split: str = "train", root: str | os.PathLike | None = None, split_files: Mapping[str, str] | None = None
    ):
        super().__init__(split)
        self.root = resolve_root(root, "flickr8k")
        text = self.root / "Flickr8k_text"
        tokens = require_file(text / "Flickr8k.token.txt", self.name, DOWNLOAD)
        if not isinstance(split_files, (Mapping, type(None))):
            raise ConfigError(f"data.dataset.split_files is {split_files!r}; it maps splits to list files, e.g. "
                              f"{{train: my_train_images.txt}}")
        self.split_files = split_files = {k: str(v) for k, v in (split_files or {}).items()}
        unknown = sorted(set(split_files) - set(SPLIT_FILES))
        if unknown:
            raise ConfigError(f"data.dataset.split_files: {unknown} are no flickr8k splits; name "
                              f"{', '.join(SPLIT_FILES)}")
        if split in split_files:
            names_file = text / Path(split_files[split]).expanduser()  # an absolute path stands alone
            if not names_file.is_file():
                raise ConfigError(f"data.dataset.split_files.{split}: {names_file} is no file")
        else:
            names_file = require_file(text / f"Flickr_8k.{SPLIT_FILES[split]}.txt", self.name, DOWNLOAD)
        image_dir = require_file(self.root / "Flicker8k_Dataset", self.name, DOWNLOAD)

        captions: dict[str, list[str]] = defaultdict(list)
        bogus = 0
        for lineno, line in enumerate(read_text(tokens).splitlines(), 1):
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            name = key.rpartition("#")[0]
            if not sep or not name:
                raise CaptionFileError(f"{tokens}:{lineno}: expected 'name.jpg#N<TAB>caption', got {line[:80]!r}")
            if _BOGUS_NAME.search(name):
                bogus += 1
            else:
                captions[name].append(caption_text(caption, f"{tokens}:{lineno}"))

        names = [n.strip() for n in read_text(names_file).splitlines() if n.strip()]
        twice = sorted(n for n, count in Counter(names).items() if count > 1)
        if twice:
            raise CaptionFileError(f"{names_file}: {len(twice)} images are listed more than once: {twice[:5]}")
        no_caption = [n for n in names if n not in captions]
        if no_caption:
            raise CaptionFileError(
                f"{names_file}: {len(no_caption)} images have no caption in {tokens}: {no_caption[:5]}"
            )
        self.records = [ImageRecord(n, captions[n], path=image_dir / n) for n in names]
        if bogus:
            log.info("flickr8k: %d captions of names that are no image file (name.jpg.1#N) left out of %s",
                     bogus, tokens)

    def identity(self) -> dict[str, Any]:
        identity = {**super().identity(), "root": str(self.root.resolve())}
        if self.split in self.split_files:  # only then: the standard lists' features stay cached under their key
            identity["split_file"] = self.split_files[self.split]
        return identity
