import json

import pytest
import torch

from capkit.data import (
    CorruptImageError,
    DatasetNotFoundError,
    EvaluationDataset,
    ImageSource,
    MissingImagesError,
    build_loader,
    load_split,
)
from capkit.errors import CaptionFileError, ConfigError
from capkit.registry import DATASETS


def _flickr(root, split, **kw):
    return load_split({"name": "flickr8k", "root": str(root)}, split, **kw)


def test_flickr8k_splits_captions_and_bogus_entries(flickr8k_copy):
    data, records = _flickr(flickr8k_copy, "val")
    assert [r.image_id for r in records] == ["v0.jpg", "v1.jpg"]
    assert records[0].captions == [f"V0 caption number {k} ." for k in range(5)]
    assert len(_flickr(flickr8k_copy, "test")[1]) == 1
    all_ids = {r.image_id for s in ("train", "val", "test") for r in DATASETS.build(
        {"name": "flickr8k", "root": str(flickr8k_copy)}, split=s).records}
    assert not any("bogus" in i for i in all_ids)  # the bogus .jpg.1 entries are dropped


def test_flickr8k_split_files_replace_the_standard_list_of_the_splits_they_name(flickr8k_copy, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("t2.jpg\nt0.jpg\n")
    (flickr8k_copy / "Flickr8k_text" / "first.txt").write_text("t1.jpg\n")
    dataset = {"name": "flickr8k", "root": str(flickr8k_copy), "split_files": {"train": str(held_out)}}
    assert [r.image_id for r in load_split(dataset, "train")[1]] == ["t2.jpg", "t0.jpg"]  # absolute, in its order
    assert [r.image_id for r in load_split(dataset, "val")[1]] == ["v0.jpg", "v1.jpg"]  # not named: the standard list
    # the feature cache's key: the replaced list's file where there is one; the standard splits' keys unchanged
    assert DATASETS.build(dataset, split="train").identity()["split_file"] == str(held_out)
    standard = {"name": "flickr8k", "root": str(flickr8k_copy)}
    assert DATASETS.build(dataset, split="val").identity() == DATASETS.build(standard, split="val").identity()
    relative = {**dataset, "split_files": {"train": "first.txt"}}  # relative to root/Flickr8k_text
    assert [r.image_id for r in load_split(relative, "train")[1]] == ["t1.jpg"]
    with pytest.raises(ConfigError, match=r"data.dataset.split_files: \['dev'\] are no flickr8k splits; name train, "
                                          r"val, test"):
        load_split({**dataset, "split_files": {"dev": str(held_out)}}, "train")
    with pytest.raises(ConfigError, match=r"data.dataset.split_files is 'oops'; it maps splits to list files"):
        load_split({**dataset, "split_files": "oops"}, "train")
    with pytest.raises(ConfigError, match=r"data.dataset.split_files.train: .*nope.txt is no file"):
        load_split({**dataset, "split_files": {"train": "nope.txt"}}, "train")
    held_out.write_text("t0.jpg\nz9.jpg\n")
    with pytest.raises(CaptionFileError, match=r"held_out.txt: 1 images have no caption in .*: \['z9.jpg'\]"):
        load_split(dataset, "train")


def test_flickr8k_missing_images_error_or_skip(flickr8k_copy):
    with pytest.raises(MissingImagesError, match=r"1 of 4 images are missing \(.*t3\.jpg\).*skip_missing_images"):
        _flickr(flickr8k_copy, "train")
    with pytest.warns(UserWarning, match="1 of 4 images are missing"):
        _, records = _flickr(flickr8k_copy, "train", skip_missing_images=True)
    assert [r.image_id for r in records] == ["t0.jpg", "t1.jpg", "t2.jpg"]
    (flickr8k_copy / "Flicker8k_Dataset" / "x0.jpg").unlink()  # the whole test split gone: nothing to skip to
    with pytest.raises(MissingImagesError, match=r"1 of 1 images are missing .*every image is missing"):
        _flickr(flickr8k_copy, "test", skip_missing_images=True)


def test_corrupt_image_error_names_file_even_in_a_worker(flickr8k_copy, tiny_encoder):
    from capkit.data import build_transform

    _, records = _flickr(flickr8k_copy, "val")
    source = ImageSource(records, build_transform(tiny_encoder.data_config))
    loader = build_loader(EvaluationDataset(source, records), batch_size=2, num_workers=1)
    with pytest.raises(CorruptImageError, match=r"v1\.jpg.*skip_corrupt_images"):
        next(iter(loader))
    skipping = ImageSource(records, build_transform(tiny_encoder.data_config), skip_corrupt=True)
    with pytest.warns(UserWarning, match="v1.jpg"):
        batch = next(iter(build_loader(EvaluationDataset(skipping, records), batch_size=2)))
    assert batch.image_ids == ["v0.jpg"] and batch.images.shape == (1, 3, 160, 160)


def test_missing_dataset_says_where_and_how_to_download(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match=r"expected .*Flickr8k\.token\.txt.*Flickr8k_Dataset\.zip"):
        _flickr(tmp_path, "train")
    monkeypatch.setenv("CAPKIT_DATA", str(tmp_path / "all"))
    with pytest.raises(DatasetNotFoundError, match=r"all/coco/annotations/captions_val2017\.json.*images\.cocodataset"):
        load_split({"name": "coco"}, "val")
    with pytest.raises(ValueError, match="no split 'dev'; its splits: train, val, test"):
        _flickr(tmp_path, "dev")


def test_karpathy_json_splits_restval_and_ids(tmp_path):
    images = [
        {"filename": f"{s}.jpg", "filepath": "val2014", "cocoid": i, "split": s,
         "sentences": [{"raw": f"{s} one ."}, {"raw": f"{s} two"}]}
        for i, s in enumerate(["train", "restval", "val", "test"])
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    cfg = {"name": "karpathy", "root": str(tmp_path), "annotations": "dataset_coco.json", "image_dir": "imgs"}
    train = DATASETS.build(cfg, split="train").records
    assert [r.image_id for r in train] == ["0", "1"]
    assert train[0].captions == ["train one .", "train two"]
    assert train[0].path == tmp_path / "imgs" / "val2014" / "train.jpg"
    assert len(DATASETS.build({**cfg, "use_restval": False}, split="train").records) == 1
    assert [r.image_id for r in DATASETS.build(cfg, split="test").records] == ["3"]


def test_coco_captions_json(tmp_path, make_jpeg):
    ann = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}, {"id": 9, "file_name": "c.jpg"}],
        "annotations": [{"image_id": 7, "id": 1, "caption": "A cat. "}, {"image_id": 7, "id": 2, "caption": "cat"},
                        {"image_id": 8, "id": 3, "caption": "dog"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(ann))
    make_jpeg(tmp_path / "val2017" / "a.jpg")
    with pytest.warns(UserWarning, match="1 of 2 images are missing"):
        _, records = load_split({"name": "coco", "root": str(tmp_path)}, "val", skip_missing_images=True)
    assert [(r.image_id, r.captions) for r in records] == [("7", ["A cat.", "cat"])]  # 9 has no caption


def test_folder_csv_with_split_column(tmp_path):
    (tmp_path / "captions.csv").write_text(
        "image,caption,split\nimgs/a.jpg,a red car,train\nimgs/a.jpg,\"a car, red\",train\nimgs/b.jpg,a dog,val\n"
    )
    records = DATASETS.build({"name": "folder", "root": str(tmp_path)}, split="train").records
    assert [(r.image_id, r.captions, r.path) for r in records] == [
        ("imgs/a.jpg", ["a red car", "a car, red"], tmp_path / "imgs" / "a.jpg")
    ]
    assert [r.image_id for r in DATASETS.build({"name": "folder", "root": str(tmp_path)}, split="val").records] == [
        "imgs/b.jpg"
    ]


def test_folder_jsonl_per_split_files_and_errors(tmp_path):
    (tmp_path / "val.jsonl").write_text('{"image": "b.jpg", "captions": ["x", "y"]}\n\n{"image": "c.jpg", "caption": "z"}\n')
    cfg = {"name": "folder", "root": str(tmp_path), "annotations": "{split}.jsonl"}
    assert [(r.image_id, r.captions) for r in DATASETS.build(cfg, split="val").records] == [
        ("b.jpg", ["x", "y"]), ("c.jpg", ["z"])
    ]
    (tmp_path / "bad.jsonl").write_text('{"image": "b.jpg", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no 'split' field"):
        DATASETS.build({**cfg, "annotations": "bad.jsonl"}, split="val")
    (tmp_path / "bad.csv").write_text("file,text\na.jpg,x\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: needs 'image' and 'caption'"):
        DATASETS.build({**cfg, "annotations": "bad.csv"}, split="val")
    with pytest.raises(DatasetNotFoundError, match=r"train\.jsonl.*CSV with the header"):
        DATASETS.build(cfg, split="train")


def test_collated_eval_batch_has_references(flickr8k_copy, tiny_encoder):
    from capkit.data import build_transform

    _, records = _flickr(flickr8k_copy, "test")
    source = ImageSource(records, build_transform(tiny_encoder.data_config))
    batch = next(iter(build_loader(EvaluationDataset(source, records), batch_size=4)))
    assert batch.captions is None and batch.references == [records[0].captions]
    assert batch.images.dtype == torch.float32
