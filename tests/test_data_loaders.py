import itertools

import pytest
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
    grid, unfinished = None, False

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


def test_an_encoder_training_its_last_stages_trains_on_its_cached_trunk_as_on_images(tmp_path):
    import json

    import capkit

    train = load_split(SHAPES, "train")
    vocab = Vocabulary.build((c for r in train.records for c in r.captions), min_count=1)
    model = capkit.build_captioner({
        "encoder": {"name": "timm", "model_name": "test_efficientnet", "finetune": "last"},
        "attention": {"name": "bahdanau", "attn_dim": 16},
        "decoder": {"name": "show_attend_tell", "embed_dim": 16, "hidden_dim": 32},
    }, vocab_size=len(vocab)).eval()  # eval: no dropout, the same computation from either input
    common = dict(batch_size=8, num_workers=0, cache_dir=tmp_path)
    cached = next(iter(build_train_loader(train, model.encoder, vocab, **common)))
    raw = next(iter(build_train_loader(train, model.encoder, vocab, cache_features=False, **common)))
    assert cached.images is None and cached.features.unfinished and raw.features is None
    assert cached.image_ids == raw.image_ids and torch.equal(cached.captions, raw.captions)
    trunk_channels = model.encoder.model.blocks[3][-1].conv_pwl.out_channels
    assert cached.features.feats.shape == (8, 100, trunk_channels) and cached.features.grid == (10, 10)
    [sidecar] = tmp_path.glob("*.json")
    assert json.loads(sidecar.read_text())["unfinished"] is True
    val = next(iter(build_eval_loader(load_split(SHAPES, "val"), model.encoder, **common)))
    assert val.features.unfinished  # evaluation reads the trunk too

    head = model.encoder.model.conv_head.weight
    grads = []
    for batch in (cached, raw):
        loss = -model.log_prob(batch.captions, images=batch.images, features=batch.features).sum()
        grads.append(torch.autograd.grad(loss, head)[0])
    assert torch.allclose(grads[0], grads[1], rtol=0.01, atol=1e-5)  # the trunk's float16 cache
    assert grads[0].abs().sum() > 0


def _augment_source(tiny_encoder, seed):
    from capkit.data import ImageSource, build_transform

    train = load_split(SHAPES, "train")
    return ImageSource(train.records, build_transform(tiny_encoder.data_config, augment=True), seed=seed)


def test_a_seeded_image_source_gives_each_image_one_fixed_augmented_view(tiny_encoder):
    import random

    import numpy as np

    view0, view0_again, view1 = (_augment_source(tiny_encoder, s) for s in (0, 0, 1))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert torch.equal(view0[3], view0_again[3])  # the same view, whatever came before
    assert not torch.equal(view0[3], view1[3]) and not torch.equal(view0[3], view0[4])
    # the callers' random streams are left where they were
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == (
        random.Random(7).random(), np.random.RandomState(7).rand(), torch.rand(1, generator=torch.Generator().manual_seed(7)).item()
    )
    unseeded = _augment_source(tiny_encoder, None)
    assert not torch.equal(unseeded[3], unseeded[3])  # without a seed, a new draw each time


class _ViewSource(_Source):  # view v of image i is the constant 10 * v + i
    def __init__(self, n, view):
        super().__init__(n)
        self.view = view

    def __getitem__(self, i):
        return torch.full((3, 4, 4), 10.0 * self.view + i)


def test_the_view_sampler_gives_every_pair_once_an_epoch_with_a_view_drawn_from_seed_and_epoch():
    from capkit.data import AugmentedViews

    vocab = Vocabulary.build(["a dog", "a cat"], min_count=1)
    views = AugmentedViews([TrainingDataset(_ViewSource(6, v), _records(6), vocab, max_len=16) for v in range(3)])
    assert len(views) == 36 and views.items == 12

    def epoch(e, seed=0, rank=0, world_size=1):  # (image, caption id, view) of each sample
        loader = build_loader(views, 4, shuffle=True, seed=seed, rank=rank, world_size=world_size)
        loader.sampler.set_epoch(e)
        out = []
        for b in loader:
            for x, iid, caption in zip(b.images, b.image_ids, b.captions.tolist()):
                view, image = divmod(int(x[0, 0, 0]), 10)
                assert f"img{image}" == iid
                out.append((iid, tuple(t for t in caption if t != PAD_ID), view))
        return out

    first = epoch(0)
    pairs = sorted((f"img{i}", tuple(c)) for i, c in views.views[0].pairs)
    assert sorted(p[:2] for p in first) == pairs and len(pairs) == 12  # every (image, caption) pair once
    assert first == epoch(0)  # set_epoch repeats an epoch exactly
    seen = {p[2] for e in range(4) for p in epoch(e)}
    assert seen == {0, 1, 2}  # every view is drawn
    by_pair = {e: {p[:2]: p[2] for p in epoch(e)} for e in range(2)}
    assert by_pair[0] != by_pair[1] and epoch(0, seed=1) != first  # a new draw each epoch and seed
    shards = [epoch(2, rank=r, world_size=2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(epoch(2))  # two ranks: each pair once, the same views


def test_augmented_views_are_extracted_once_and_trained_on_in_turn(tiny_encoder, tmp_path):
    from capkit.data import FeatureStore, build_source

    train = load_split(SHAPES, "train")
    vocab = Vocabulary.build((c for r in train.records for c in r.captions), min_count=1)
    calls = []
    handle = tiny_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        options = dict(batch_size=8, augment=True, augment_views=2, cache_dir=tmp_path, num_workers=0)
        loader = build_train_loader(train, tiny_encoder, vocab, **options)
        assert len(calls) == 2 * 2  # 12 images in batches of 8, for each view
        stores = [build_source(train, tiny_encoder, augment=True, view_seed=k, cache_dir=tmp_path, batch_size=8)
                  for k in range(2)]
        assert len(calls) == 4 and all(isinstance(s, FeatureStore) for s in stores)  # read from the cache
        assert sorted(p.name.split("_")[2] for p in tmp_path.glob("*.npy")) == ["view0", "view1"]
        assert not torch.equal(stores[0][0], stores[1][0])
        again = build_train_loader(train, tiny_encoder, vocab, **options)
        assert len(calls) == 4 and len(again) == len(loader) == 60 // 8 + 1
    finally:
        handle.remove()
    row = {store.image_ids[i]: [s[i] for s in stores] for i, store in enumerate([stores[0]] * len(stores[0]))}
    drawn = set()
    for e in range(3):
        loader.sampler.set_epoch(e)
        for batch in loader:
            assert batch.images is None and batch.features.grid == (5, 5)
            for iid, feats in zip(batch.image_ids, batch.features.feats):
                view = [v for v, cached in enumerate(row[iid]) if torch.equal(cached.float(), feats)]
                assert len(view) == 1
                drawn.add(view[0])
    assert drawn == {0, 1}
    eval_loader = build_eval_loader(load_split(SHAPES, "val"), tiny_encoder, batch_size=8, cache_dir=tmp_path,
                                    num_workers=0)
    assert len(list(tmp_path.glob("*_val_*.npy"))) == 1 and "view" not in next(tmp_path.glob("*_val_*.npy")).name
    assert len(eval_loader.dataset) == 4


def test_augmented_views_need_augmentation_and_an_encoder_with_a_frozen_part(tiny_encoder, tmp_path):
    from capkit.data import build_source
    from toys import tiny_model

    train = load_split(SHAPES, "train")
    vocab = Vocabulary.build((c for r in train.records for c in r.captions), min_count=1)
    needs = "an augmented view caches the augmented features of the encoder's frozen part: it needs augment=True"
    with pytest.raises(ValueError, match=needs):
        build_train_loader(train, tiny_encoder, vocab, batch_size=8, augment_views=2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=needs):
        build_source(train, tiny_model(finetune="all").encoder, augment=True, view_seed=0, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything is extracted


def _grouped_records():  # image i has i % 4 + 1 captions: fewer than, as many as and more than K = 3
    from capkit.data import ImageRecord

    return [ImageRecord(f"img{i}", [f"a dog {i} {j}" for j in range(i % 4 + 1)]) for i in range(8)]


def test_caption_groups_give_every_image_once_an_epoch_with_k_of_its_captions_drawn_from_seed_and_epoch():
    from capkit.data import CaptionGroups

    records = _grouped_records()
    vocab = Vocabulary.build((c for r in records for c in r.captions), min_count=1)
    groups = CaptionGroups(_Source(8), records, vocab, max_len=16, captions_per_image=3)
    assert len(groups) == 8

    def epoch(e, seed=0, rank=0, world_size=1):  # image id -> its captions in the batch, as text
        loader = build_loader(groups, 2, shuffle=True, seed=seed, rank=rank, world_size=world_size)
        loader.sampler.set_epoch(e)
        out = []
        for b in loader:
            assert b.captions_per_image == 3 and b.captions.shape[0] == 3 * len(b) and b.images.shape[0] == len(b)
            assert [int(x[0, 0, 0]) for x in b.images] == [int(i[3:]) for i in b.image_ids]
            texts = [vocab.decode([t for t in c if t not in (BOS_ID, EOS_ID, PAD_ID)]) for c in b.captions.tolist()]
            out += [(iid, tuple(texts[3 * k: 3 * k + 3])) for k, iid in enumerate(b.image_ids)]
        return out

    first = epoch(0)
    assert sorted(i for i, _ in first) == sorted(f"img{i}" for i in range(8))  # every image once
    for iid, texts in first:
        own = next(r.captions for r in records if r.image_id == iid)
        assert set(texts) <= set(own)  # its own captions only
        assert len(set(texts)) == min(3, len(own))  # distinct where it has K, every one where it has fewer
    assert first == epoch(0)  # set_epoch repeats an epoch exactly
    assert epoch(1) != first and epoch(0, seed=1) != first
    drawn = {texts for e in range(12) for iid, texts in epoch(e) if iid == "img3"}  # 4 captions, 3 drawn
    assert {frozenset(t) for t in drawn} == {frozenset(c) for c in itertools.combinations(records[3].captions, 3)}
    shards = [epoch(2, rank=r, world_size=2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(epoch(2))  # two ranks: each image once, the same draws


def test_collating_caption_groups_drops_a_skipped_images_captions_and_refuses_groups_of_different_sizes():
    from capkit.data.loaders import CaptionGroup

    groups = [CaptionGroup("a", torch.zeros(3, 2, 2), [[1, 4, 2], [1, 5, 2]]), CaptionGroup("b", None, [[1, 6, 2]] * 2),
              CaptionGroup("c", torch.ones(3, 2, 2), [[1, 7, 2], [1, 2]])]
    batch = collate_batch(groups)
    assert batch.image_ids == ["a", "c"] and batch.captions_per_image == 2 and batch.images.shape == (2, 3, 2, 2)
    assert batch.captions.tolist() == [[1, 4, 2], [1, 5, 2], [1, 7, 2], [1, 2, 0]]
    with pytest.raises(ValueError, match=r"caption groups of different sizes \[1, 2\] in one batch"):
        collate_batch([groups[0], CaptionGroup("d", torch.ones(3, 2, 2), [[1, 2]])])


def test_a_grouped_training_loader_fills_its_batch_size_in_captions_with_whole_images(tiny_encoder, tmp_path):
    train = load_split(SHAPES, "train")  # 12 images of 5 captions
    vocab = Vocabulary.build((c for r in train.records for c in r.captions), min_count=1)
    loader = build_train_loader(train, tiny_encoder, vocab, batch_size=8, captions_per_image=4, num_workers=0,
                                cache_dir=tmp_path)
    batches = list(loader)
    assert [len(b) for b in batches] == [2] * 6  # 8 captions a batch: 2 images
    assert all(b.captions.shape[0] == 8 and b.features.feats.shape[0] == 2 for b in batches)
    with pytest.raises(ValueError, match="batch_size 8 is not a multiple of captions_per_image 3"):
        build_train_loader(train, tiny_encoder, vocab, batch_size=8, captions_per_image=3, num_workers=0,
                           cache_dir=tmp_path)


def test_cross_entropy_on_grouped_captions_runs_the_encoders_trained_stage_once_per_image(monkeypatch):
    """The loss and gradients of K captions per image equal those of the same captions each with its own copy of
    the image, while the trained stage over the cached trunk runs on the B images only."""
    from toys import random_captions, tiny_model

    from capkit.engine import CrossEntropyCriterion
    from capkit.types import CaptionBatch

    torch.manual_seed(5)
    model = tiny_model(finetune="last").eval()  # eval: no dropout, so the two batches see the same function
    with torch.no_grad():
        trunk = model.encoder.forward_frozen(torch.randn(3, 3, 64, 64))
    captions = random_captions(12, torch.Generator().manual_seed(0))  # 4 captions of each of 3 images
    grouped = CaptionBatch(["x", "y", "z"], captions=captions, features=trunk, captions_per_image=4)
    repeated = CaptionBatch([i for i in "xyz" for _ in range(4)], captions=captions,
                            features=trunk.with_feats(trunk.feats.repeat_interleave(4, dim=0)))
    finish, rows = model.encoder.finish, []
    monkeypatch.setattr(model.encoder, "finish", lambda f: rows.append(f.feats.shape[0]) or finish(f))
    criterion, grads, losses = CrossEntropyCriterion({"doubly_stochastic": 1.0}), [], []
    for batch in (grouped, repeated):
        loss, _ = criterion(model, batch)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, model.encoder.model.conv_head.weight)[0])
    assert rows == [3, 12]
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0
