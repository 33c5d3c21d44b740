import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from capkit.data import build_transform, cached_features, load_split
from capkit.registry import ENCODERS

SHAPES = {"name": "shapes", "num_train": 10, "num_val": 2, "num_test": 2, "image_size": 48}


@pytest.fixture
def split():
    data, records = load_split(SHAPES, "train")
    return data, records


class Interrupted(Exception):
    pass


def _count_calls(encoder):
    calls = []
    handle = encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_second_epoch_over_cache_does_no_forward_pass(split, tiny_encoder, tmp_path):
    from capkit.data import TrainingDataset, Vocabulary, build_loader

    data, records = split
    calls, handle = _count_calls(tiny_encoder)
    try:
        kwargs = dict(identity=data.identity(), cache_dir=tmp_path, batch_size=4)
        store = cached_features(records, tiny_encoder, build_transform(tiny_encoder.data_config), **kwargs)
        assert len(calls) == 3 and len(store) == 10 and store[0].shape == (25, 256)
        vocab = Vocabulary.build((c for r in records for c in r.captions), min_count=1)
        loader = build_loader(TrainingDataset(store, records, vocab, 16), 8, shuffle=True)
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            assert sum(len(b) for b in loader) == 50
        again = cached_features(records, tiny_encoder, build_transform(tiny_encoder.data_config), **kwargs)
        assert len(calls) == 3 and again.path == store.path
    finally:
        handle.remove()


def test_an_entry_holds_the_features_of_the_weights_the_encoders_frozen_part_holds(split, tmp_path):
    """Weights loaded from a checkpoint (``train.init_from``) under the same model name get their own entry;
    an encoder that trains its last stages keys its trunk's entry by the trunk's weights alone."""
    data, records = split

    def entry(encoder):
        transform = build_transform(encoder.data_config)
        return cached_features(records, encoder, transform, identity=data.identity(), cache_dir=tmp_path).path

    torch.manual_seed(0)
    frozen = ENCODERS.build({"name": "timm", "model_name": "test_efficientnet"})
    first = entry(frozen)
    assert entry(frozen) == first
    with torch.no_grad():
        frozen.model.conv_head.weight.add_(0.1)
    assert entry(frozen) != first  # the same name and config, other weights

    split_encoder = ENCODERS.build({"name": "timm", "model_name": "test_efficientnet", "finetune": "last"})
    trunk = entry(split_encoder)
    with torch.no_grad():
        split_encoder.model.conv_head.weight.add_(0.1)  # trains: not part of what is cached
    assert entry(split_encoder) == trunk
    with torch.no_grad():
        split_encoder.model.blocks[0][0].conv.weight.add_(0.1)
    assert entry(split_encoder) != trunk
    assert len(list(tmp_path.glob("*.npy"))) == 4


def test_a_cache_the_disk_cannot_hold_is_refused_before_anything_is_written(split, tiny_encoder, tmp_path,
                                                                           monkeypatch):
    import shutil

    from capkit.errors import DataError

    data, records = split
    free = 10 * 25 * 256 * 2 - 1  # one byte short of 10 images of 25 x 256 float16 features
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    with pytest.raises(DataError, match=r"the features of shapes_train_\w+ need 0\.1 MB, and .* has 0\.1 MB free; "
                                        r"free some space there, or set data\.cache_dir"):
        cached_features(records, tiny_encoder, build_transform(tiny_encoder.data_config), identity=data.identity(),
                        cache_dir=tmp_path, batch_size=4)
    assert not list(tmp_path.glob("*.npy*")) and not list(tmp_path.glob("*.json*"))


def test_augmented_views_the_disk_cannot_all_hold_are_refused_before_the_first(tiny_encoder, tmp_path, monkeypatch):
    import shutil

    from capkit.data import Vocabulary, build_train_loader, load_split
    from capkit.errors import DataError

    train = load_split(SHAPES, "train")
    vocab = Vocabulary.build((c for r in train.records for c in r.captions), min_count=1)
    free = 2 * 10 * 25 * 256 * 2  # room for 2 views of 10 images of 25 x 256 float16 features, not 3
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    options = dict(batch_size=4, augment=True, cache_dir=tmp_path, num_workers=0)
    with pytest.raises(DataError, match=r"the features of shapes_train_view0_\w+ and 2 more views need 0\.4 MB, and "
                                        r".* has 0\.3 MB free"):
        build_train_loader(train, tiny_encoder, vocab, augment_views=3, **options)
    assert not list(tmp_path.glob("*.npy*"))
    build_train_loader(train, tiny_encoder, vocab, augment_views=2, **options)  # two fit
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_interrupted_cache_is_not_used_and_rerun_restarts(split, tiny_encoder, tmp_path):
    data, records = split
    transform = build_transform(tiny_encoder.data_config)

    def fail_on_second(*_):
        calls.append(1)
        if interrupt and len(calls) == 2:
            raise Interrupted

    calls, interrupt = [], True
    handle = tiny_encoder.register_forward_hook(fail_on_second)
    try:
        with pytest.raises(Interrupted):
            cached_features(records, tiny_encoder, transform, identity=data.identity(), cache_dir=tmp_path, batch_size=4)
        (partial,) = [p for p in tmp_path.iterdir() if p.suffix != ".lock"]  # nothing published
        assert partial.suffix == f".partial-{os.getpid()}"
        partial.rename(partial.with_suffix(".partial-999999"))  # as a killed process leaves it
        calls, interrupt = [], False
        store = cached_features(records, tiny_encoder, transform, identity=data.identity(), cache_dir=tmp_path, batch_size=4)
        assert len(calls) == 3 and len(store) == 10
    finally:
        handle.remove()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".lock", ".npy"]


def test_kill_9_mid_extraction_leaves_no_complete_cache(tmp_path):
    script = f"""
import time, capkit, torch
from capkit.data import build_transform, cached_features, load_split
from capkit.registry import ENCODERS
torch.manual_seed(0)  # the same random weights in both: the same features, one cache entry
enc = ENCODERS.build({{"name": "timm", "model_name": "test_efficientnet"}})
enc.register_forward_hook(lambda *_: (print("batch", flush=True), time.sleep(30)))
data, records = load_split({SHAPES!r}, "train")
cached_features(records, enc, build_transform(enc.data_config), identity=data.identity(), cache_dir={str(tmp_path)!r}, batch_size=4)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "batch"  # inside the first forward pass, after decoding
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.npy"))


def test_encoder_or_transform_change_makes_a_new_cache(split, tiny_encoder, tmp_path):
    data, records = split
    kwargs = dict(identity=data.identity(), cache_dir=tmp_path, batch_size=8)
    first = cached_features(records, tiny_encoder, build_transform(tiny_encoder.data_config), **kwargs)
    smaller = {**tiny_encoder.data_config, "input_size": (3, 128, 128)}
    second = cached_features(records, tiny_encoder, build_transform(smaller), **kwargs)
    other = ENCODERS.build({"name": "timm", "model_name": "test_resnet"})
    third = cached_features(records, other, build_transform(other.data_config), **kwargs)
    assert len({first.path, second.path, third.path}) == 3
    assert second.grid == (4, 4) and first.grid == (5, 5)
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["key"]["encoder"]["model_name"] == "test_efficientnet" and meta["image_ids"][0] == "shapes_train_00000"
    reloaded = cached_features(records, tiny_encoder, build_transform(tiny_encoder.data_config), **kwargs)
    assert torch.equal(reloaded[3], first[3])


def test_two_processes_extracting_one_cache_at_once_share_one_extraction(tmp_path):
    """The second waits on the entry's lock and reads what the first wrote."""
    script = f"""
import time, capkit, torch
from capkit.data import build_transform, cached_features, load_split
from capkit.registry import ENCODERS
torch.manual_seed(0)  # the same random weights in both: the same features, one cache entry
enc = ENCODERS.build({{"name": "timm", "model_name": "test_efficientnet"}})
enc.register_forward_hook(lambda *_: print("batch", flush=True) or time.sleep(0.5))  # the two runs overlap
data, records = load_split({SHAPES!r}, "train")
store = cached_features(records, enc, build_transform(enc.data_config), identity=data.identity(), cache_dir={str(tmp_path)!r}, batch_size=4)
print("rows", len(store), float(store[3].float().sum()))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0].splitlines() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    batches = sorted(out.count("batch") for out in outs)
    assert batches == [0, 3]  # 10 images in batches of 4: one extraction in all
    assert outs[0][-1] == outs[1][-1] and outs[0][-1].startswith("rows 10 ")
    assert not list(tmp_path.glob("*.partial-*"))
