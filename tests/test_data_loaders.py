import torch

from capkit.data import (
    TrainingDataset,
    Vocabulary,
    build_eval_loader,
    build_loader,
    build_train_loader,
    collate_batch,
    load_split,
)
from capkit.data.loaders import Sample
from capkit.types import BOS_ID, EOS_ID, PAD_ID

SHAPES = {"name": "shapes", "num_train": 12, "num_val": 4, "num_test": 2, "image_size": 64}


class _Source:  # a stand-in image source: image i is a constant tensor
    grid = None

    def __init__(self, n):
        self.image_ids = [f"img{i}" for i in range(n)]

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i))


def _records(n):
    from capkit.data import ImageRecord

    return [ImageRecord(f"img{i}", [f"a dog {i}", "a cat"]) for i in range(n)]


def test_collate_pads_captions():
    batch = collate_batch([Sample("a", torch.zeros(3, 2, 2), [1, 4, 2], None), Sample("b", torch.ones(3, 2, 2), [1, 2], None)])
    assert batch.captions.tolist() == [[BOS_ID, 4, EOS_ID], [BOS_ID, EOS_ID, PAD_ID]]
    assert batch.images.shape == (2, 3, 2, 2) and batch.features is None
    feats = collate_batch([Sample("a", torch.zeros(6, 5, dtype=torch.float16), None, ["x"])], grid=(2, 3))
    assert feats.images is None and feats.features.feats.shape == (1, 6, 5) and feats.features.grid == (2, 3)
    assert feats.features.feats.dtype == torch.float32 and feats.references == [["x"]]


def test_one_training_sample_per_caption_and_seeded_epoch_order():
    vocab = Vocabulary.build(["a dog", "a cat"], min_count=1)
    data = TrainingDataset(_Source(6), _records(6), vocab, max_len=16)
    assert len(data) == 12

    def order(epoch, seed=0, rank=0, world_size=1):
        loader = build_loader(data, 4, shuffle=True, seed=seed, rank=rank, world_size=world_size)
        loader.sampler.set_epoch(epoch)
        return [i for b in loader for i in b.image_ids]

    assert order(0) == order(0) and order(0) != order(1) and order(0, seed=1) != order(0)
    shards = [order(2, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6 and sorted(shards[0] + shards[1]) == sorted(order(2))


def test_train_and_eval_loaders_on_shapes_with_and_without_cache(tiny_encoder, tmp_path):
    common = dict(num_workers=0, cache_dir=tmp_path)
    train, val = load_split(SHAPES, "train"), load_split(SHAPES, "val")
    vocab = Vocabulary.build((c for r in train.records for c in r.captions), min_count=1)
    cached_train = build_train_loader(train, tiny_encoder, vocab, batch_size=8, **common)
    cached_val = build_eval_loader(val, tiny_encoder, batch_size=8, **common)
    assert len(cached_train.dataset) == 60 and len(cached_val.dataset) == 4
    batch = next(iter(cached_train))
    assert batch.images is None and batch.features.feats.shape == (8, 25, 256) and batch.features.grid == (5, 5)
    assert batch.captions[:, 0].eq(BOS_ID).all() and batch.captions.shape[0] == 8
    first_val = next(iter(cached_val))
    assert len(first_val.references) == 4 and all(len(r) == 5 for r in first_val.references)
    assert len(build_eval_loader(val, tiny_encoder, batch_size=8, max_images=3, **common).dataset) == 3

    raw_train = build_train_loader(train, tiny_encoder, vocab, batch_size=8, cache_features=False, **common)
    batch = next(iter(raw_train))
    assert batch.features is None and batch.images.shape == (8, 3, 160, 160)
    raw_val = build_eval_loader(val, tiny_encoder, batch_size=8, cache_features=False, **common)
    out = tiny_encoder(next(iter(raw_val)).images)
    assert torch.allclose(out.feats, first_val.features.feats, atol=0.05, rtol=0.01)  # float16 cache
