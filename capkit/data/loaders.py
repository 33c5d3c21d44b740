"""Torch datasets over images or cached features, collation into ``CaptionBatch``, and the DataLoader."""
from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from capkit.data.images import DEFAULT_MAX_PIXELS
from capkit.data.records import CorruptImageError, ImageRecord
from capkit.data.vocab import Vocabulary
from capkit.types import PAD_ID, CaptionBatch, EncoderOutput

__all__ = [
    "Source", "ImageSource", "Sample", "CaptionGroup", "TrainingDataset", "CaptionGroups", "EvaluationDataset",
    "AugmentedViews", "ViewSampler", "CaptionGroupSampler", "collate_batch", "build_loader",
]


class Source(Protocol):
    """Per-image inputs: ``ImageSource`` (pixels) or ``FeatureStore`` (cached features, ``grid`` set; ``unfinished``
    when they are the output of the encoder's frozen part only, see ``Encoder.forward_frozen``)."""

    image_ids: list[str]
    grid: tuple[int, int] | None
    unfinished: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Tensor | None: ...


class ImageSource:
    """Decoded, transformed images: ``source[i]`` -> (3, H, W), or None for a corrupt file when skipping.

    Args:
        records: the split's images.
        transform: PIL image -> tensor (``build_transform``).
        skip_corrupt: warn and skip an undecodable file (or one over ``max_pixels``) instead of raising
            ``CorruptImageError``.
        max_pixels: the largest image accepted (decompression bombs); None: no limit.
        seed: when set, the randomness of image i's transform is drawn from (seed, i) alone, so a random
            (augmenting) transform gives each image one fixed view: the same in every epoch, process and worker
            for this list of records (i is the image's place in it).
    """

    grid = None
    unfinished = False

    def __init__(
        self,
        records: list[ImageRecord],
        transform: Callable[[Image.Image], Tensor],
        skip_corrupt: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        seed: int | None = None,
    ):
        self.records, self.transform, self.skip_corrupt, self.max_pixels = records, transform, skip_corrupt, max_pixels
        self.seed = seed
        self.image_ids = [r.image_id for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Tensor | None:
        try:
            image = self.records[index].open(self.max_pixels)
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise
            warnings.warn(f"{err} Skipped (data.skip_corrupt_images=true).", stacklevel=2)
            return None
        if self.seed is None:
            return self.transform(image)
        return _seeded(self.transform, image, [self.seed, index])


def _seeded(transform: Callable[[Image.Image], Tensor], image: Image.Image, entropy: list[int]) -> Tensor:
    """``transform(image)`` with python's, numpy's and torch's CPU RNGs seeded from ``entropy``, then put back as
    they were (timm's crops draw from ``random``, torchvision's colour jitter from torch's CPU generator). Not
    ``seed_everything``: ``torch.manual_seed`` would reseed the CUDA generators too, which nothing here restores."""
    seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            return transform(image)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class Sample(NamedTuple):
    image_id: str
    x: Tensor | None  # (3, H, W) pixels or (N, C) features; None: a skipped corrupt image
    caption: list[int] | None  # training: <start> ids <end>
    references: list[str] | None  # evaluation: every caption of the image


class CaptionGroup(NamedTuple):
    image_id: str
    x: Tensor | None  # (3, H, W) pixels or (N, C) features; None: a skipped corrupt image
    captions: list[list[int]]  # K captions of the image, each <start> ids <end>


class TrainingDataset(Dataset):
    """One sample per (image, caption) pair.

    Args:
        source: images or cached features of the split.
        records: the split's records (captions are looked up by image id).
        vocab: encodes the captions.
        max_len: words kept per caption.
    """

    def __init__(self, source: Source, records: list[ImageRecord], vocab: Vocabulary, max_len: int):
        captions = {r.image_id: r.captions for r in records}
        self.source = source
        self.pairs = [(i, vocab.encode(c, max_len)) for i, iid in enumerate(source.image_ids) for c in captions[iid]]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        i, caption = self.pairs[index]
        return Sample(self.source.image_ids[i], self.source[i], caption, None)


class CaptionGroups(Dataset):
    """One sample per image with K of its captions (``data.captions_per_image``), so that a batch runs the encoder,
    or its trained stages over a cached trunk, once per image instead of once per caption (``seq_per_img`` in
    ruotianluo/ImageCaptioning.pytorch). Indexed by ``(image, caption indices)`` as a ``CaptionGroupSampler`` draws
    them; images without captions are left out.

    Args:
        source, records, vocab, max_len: as ``TrainingDataset``'s.
        captions_per_image: K.
    """

    def __init__(
        self, source: Source, records: list[ImageRecord], vocab: Vocabulary, max_len: int, captions_per_image: int
    ):
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
        captions = {r.image_id: r.captions for r in records}
        self.source, self.captions_per_image = source, captions_per_image
        self.images = [(i, [vocab.encode(c, max_len) for c in captions[iid]])
                       for i, iid in enumerate(source.image_ids) if captions[iid]]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def caption_counts(self) -> list[int]:
        """How many captions each item's image has, in item order."""
        return [len(c) for _, c in self.images]

    def __getitem__(self, key: tuple[int, Sequence[int]]) -> CaptionGroup:
        if not isinstance(key, tuple):
            raise TypeError(f"CaptionGroups is indexed by (image, caption indices), got {key!r}: draw it with a "
                            f"CaptionGroupSampler (build_loader does)")
        item, picks = key
        i, captions = self.images[item]
        return CaptionGroup(self.source.image_ids[i], self.source[i], [captions[k] for k in picks])


class EvaluationDataset(Dataset):
    """One sample per image, with all its reference captions."""

    def __init__(self, source: Source, records: list[ImageRecord]):
        captions = {r.image_id: r.captions for r in records}
        self.source = source
        self.references = [captions[iid] for iid in source.image_ids]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Sample:
        return Sample(self.source.image_ids[index], self.source[index], None, self.references[index])


class AugmentedViews(Dataset):
    """K datasets over K cached views of the same images, as one: index ``view * n + i`` is item i of view ``view``.

    Drawn by a ``ViewSampler``, which gives each item one view per epoch. The views share their images' order,
    so item i is the same (image, caption) pair in each.
    """

    def __init__(self, views: Sequence[TrainingDataset | EvaluationDataset]):
        sizes = {len(v) for v in views}
        ids = {tuple(v.source.image_ids) for v in views}
        if not views or len(sizes) != 1 or len(ids) != 1:
            raise ValueError("augmented views must be at least one, over the same images in the same order")
        self.views, self.items = list(views), sizes.pop()
        self.source = self.views[0].source  # what build_loader's collation reads (the grid)

    def __len__(self) -> int:
        return len(self.views) * self.items

    def __getitem__(self, index: int) -> Sample:
        view, item = divmod(index, self.items)
        return self.views[view][item]


class _EpochDraws(Sampler):
    """Each epoch, every one of ``items`` once, in the order a ``DistributedSampler`` gives, with a draw of the
    subclass's for each from (seed, epoch): ``set_epoch`` makes the epoch repeatable, as resuming needs.

    Args:
        items: an epoch has this many samples (shared among ``world_size`` ranks).
        shuffle, seed, rank, world_size, drop_last: as ``DistributedSampler``'s.
    """

    def __init__(self, items: int, *, shuffle: bool, seed: int, rank: int, world_size: int, drop_last: bool):
        self.order = DistributedSampler(
            range(items), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def draws(self, stream: int) -> np.random.Generator:
        """The epoch's generator for a draw over every item, the same on every rank: ``stream`` keeps each
        subclass's apart from the others' and from the order's (seed + epoch)."""
        return np.random.default_rng([self.seed, self.epoch, stream])


class ViewSampler(_EpochDraws):
    """Each epoch, every item of an ``AugmentedViews`` once, in the order a ``DistributedSampler`` gives, each
    with one view drawn from (seed, epoch): ``set_epoch`` makes the epoch repeatable, as resuming needs.

    Args:
        dataset: the views; an epoch has ``dataset.items`` samples (shared among ``world_size`` ranks).
        shuffle, seed, rank, world_size, drop_last: as ``DistributedSampler``'s.
    """

    def __init__(
        self, dataset: AugmentedViews, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
        drop_last: bool = False,
    ):
        super().__init__(dataset.items, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                         drop_last=drop_last)
        self.items, self.num_views = dataset.items, len(dataset.views)

    def __iter__(self) -> Iterator[int]:
        views = self.draws(1).integers(self.num_views, size=self.items)
        return (int(views[i]) * self.items + i for i in self.order)


class CaptionGroupSampler(_EpochDraws):
    """Each epoch, every image of a ``CaptionGroups`` once, in the order a ``DistributedSampler`` gives, with K
    (``dataset.captions_per_image``) of its captions drawn from (seed, epoch): K of them without replacement, or
    all of them and the rest drawn again where it has fewer than K. ``set_epoch`` makes the epoch repeatable, as
    resuming needs.

    Args:
        dataset: the groups; an epoch has ``len(dataset)`` samples (shared among ``world_size`` ranks).
        shuffle, seed, rank, world_size, drop_last: as ``DistributedSampler``'s.
    """

    def __init__(
        self, dataset: CaptionGroups, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
        drop_last: bool = False,
    ):
        super().__init__(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                         drop_last=drop_last)
        self.counts = np.array(dataset.caption_counts)  # (I,)
        self.k = dataset.captions_per_image

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        rng = self.draws(2)
        counts = self.counts[:, None]  # (I, 1)
        width = max(int(self.counts.max(initial=0)), self.k)
        keys = rng.random((len(self.counts), width))
        keys[np.arange(width) >= counts] = np.inf  # an image's captions in a random order, then the places past them
        picks = np.argsort(keys, axis=1)[:, : self.k]  # (I, K)
        again = (rng.random((len(self.counts), self.k)) * counts).astype(np.int64)  # drawn with replacement
        picks = np.where(np.arange(self.k) < counts, picks, again)
        return ((i, tuple(int(k) for k in picks[i])) for i in self.order)


def collate_batch(
    samples: list[Sample] | list[CaptionGroup], grid: tuple[int, int] | None = None, unfinished: bool = False
) -> CaptionBatch:
    """Stack samples into a ``CaptionBatch``: images when ``grid`` is None, else ``features`` on that grid
    (``unfinished``: the encoder's frozen part's, see ``EncoderOutput``). ``CaptionGroup``s give a batch of K
    captions per image (``CaptionBatch.captions_per_image``).

    Skipped (corrupt) images are left out, so a batch can be smaller than asked, even empty.
    """
    samples = [s for s in samples if s.x is not None]
    if not samples:
        return CaptionBatch(image_ids=[])
    x = torch.stack([s.x for s in samples])  # (B, 3, H, W) or (B, N, C)
    grouped = isinstance(samples[0], CaptionGroup)
    sizes = sorted({len(s.captions) for s in samples}) if grouped else [1]
    if len(sizes) != 1:  # the model repeats each image K times
        raise ValueError(f"caption groups of different sizes {sizes} in one batch")
    texts = [c for s in samples for c in s.captions] if grouped else [s.caption for s in samples]
    captions = None
    if texts[0] is not None:  # (B * K, L): <start> w .. <end> <pad> ..
        captions = pad_sequence([torch.tensor(c) for c in texts], batch_first=True, padding_value=PAD_ID)
    return CaptionBatch(
        image_ids=[s.image_id for s in samples],
        captions=captions,
        images=x if grid is None else None,
        features=None if grid is None else EncoderOutput(x.float(), grid, unfinished),
        references=None if grouped or samples[0].references is None else [s.references for s in samples],
        captions_per_image=sizes[0],
    )


def build_loader(
    dataset: TrainingDataset | CaptionGroups | EvaluationDataset | AugmentedViews,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader of ``CaptionBatch``es.

    Shuffling (or sharding when ``world_size > 1``) uses a ``DistributedSampler`` seeded with ``seed``: call
    ``loader.sampler.set_epoch(epoch)`` before each epoch and the order is a function of (seed, epoch),
    which exact resume needs. An ``AugmentedViews`` dataset gets a ``ViewSampler`` (the same order, one view
    per item), a ``CaptionGroups`` dataset a ``CaptionGroupSampler`` (the same order of its images, their captions
    drawn). Pass ``sampler`` to use your own instead.

    Args:
        batch_size: samples per batch (images, for ``CaptionGroups``).
        pin_memory: default: when CUDA is available.
    """
    if sampler is None and isinstance(dataset, CaptionGroups):
        sampler = CaptionGroupSampler(
            dataset, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last
        )
    elif sampler is None and isinstance(dataset, AugmentedViews):
        sampler = ViewSampler(
            dataset, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last
        )
    elif sampler is None and (shuffle or world_size > 1):
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=partial(collate_batch, grid=dataset.source.grid, unfinished=dataset.source.unfinished),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # worker seeds (augmentations) follow ``seed``
    )
