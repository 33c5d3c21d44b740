"""Integration tests on the real Flickr8k / COCO copies in ../shared/data (skipped where absent)."""
import pytest

from capkit.data import MissingImagesError, Vocabulary, load_split


def _flickr(shared_data, split, **kw):
    return load_split({"name": "flickr8k", "root": str(shared_data / "flickr8k")}, split, **kw)


def test_flickr8k_train_and_val(shared_data):
    with pytest.raises(MissingImagesError, match=r"1 of 6000 images are missing \(.*3050606344_af711c726c\.jpg\)"):
        _flickr(shared_data, "train")
    with pytest.warns(UserWarning, match="3050606344_af711c726c.jpg"):
        data, records = _flickr(shared_data, "train", skip_missing_images=True)
    assert len(data.records) == 6000 and len(records) == 5999
    assert all(len(r.captions) == 5 for r in data.records)
    vocab = Vocabulary.build((c for r in records for c in r.captions), min_count=5, max_size=5000)
    assert 2000 <= len(vocab) <= 3500
    _, val = _flickr(shared_data, "val")
    assert len(val) == 1000 and all(len(r.captions) == 5 for r in val)
    assert all(r.path.is_file() for r in val[:50])


def test_flickr8k_karpathy_json_matches_official_splits(shared_data):
    cfg = {"name": "karpathy", "root": str(shared_data / "flickr8k"), "annotations": "dataset_flickr8k.reconstructed.json"}
    _, val = load_split(cfg, "val")
    _, official = _flickr(shared_data, "val")
    assert {r.image_id for r in val} == {r.image_id for r in official}


def test_coco_val2017_present_images(shared_data):
    with pytest.warns(UserWarning, match="4841 of 5000 images are missing"):
        data, records = load_split({"name": "coco", "root": str(shared_data / "coco")}, "val", skip_missing_images=True)
    assert len(data.records) == 5000 and len(records) == 159
    assert all(len(r.captions) >= 5 for r in records)
    records[0].open()
