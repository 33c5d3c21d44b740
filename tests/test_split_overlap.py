"""An image in two splits is refused before training (its test scores would be measured on a training image),
unless data.allow_split_overlap says it is meant."""
from __future__ import annotations

import logging
import re

import pytest
from PIL import Image

from capkit.cli import train as train_cli
from capkit.data import load_split
from capkit.errors import DataError
from capkit.recipes.train import check_disjoint_splits
from toys import TINY_SHAPES_CONFIG

ROWS = [("a.png", "a red square", "train"), ("b.png", "a blue circle", "train"), ("c.png", "a green square", "val"),
        ("d.png", "a red circle", "test"), ("b.png", "a blue circle again", "test")]


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i, name in enumerate(sorted({r[0] for r in ROWS})):
        Image.new("RGB", (48, 40), (60 * i, 120, 200 - 40 * i)).save(root / name)
    (root / "captions.csv").write_text("image,caption,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in ROWS))
    return root


def splits(root):
    dataset = {"name": "folder", "root": str(root)}
    return {name: load_split(dataset, name) for name in ("train", "val", "test")}


def test_an_image_in_train_and_test_is_named_with_both_splits(photos):
    with pytest.raises(DataError, match=rf"1 images are in two splits, e.g. {photos / 'b.png'} in the train and the "
                       r"test split: its test scores would be measured on an image the model trained on; remove it "
                       r"from one split, or set data.allow_split_overlap=true"):
        check_disjoint_splits(splits(photos))
    clean = splits(photos)
    clean["test"].records[:] = [r for r in clean["test"].records if r.image_id != "b.png"]
    check_disjoint_splits(clean)  # no error


def test_the_same_file_under_another_name_is_still_one_image(photos):
    (photos / "copy").mkdir()
    (photos / "copy" / "b.png").symlink_to(photos / "b.png")
    (photos / "captions.csv").write_text("image,caption,split\na.png,a red square,train\nb.png,a blue circle,train\n"
                                         "c.png,a green square,val\ncopy/b.png,a blue circle,test\n")
    with pytest.raises(DataError, match=r"in the train and the test split"):
        check_disjoint_splits(splits(photos))


@pytest.mark.parametrize("how", ["hard link", "copy"])
def test_a_hard_link_or_a_byte_identical_copy_is_the_same_image(photos, how):
    if how == "hard link":
        (photos / "b_again.png").hardlink_to(photos / "b.png")
    else:
        (photos / "b_again.png").write_bytes((photos / "b.png").read_bytes())
    (photos / "captions.csv").write_text("image,caption,split\na.png,a red square,train\nb.png,a blue circle,train\n"
                                         "c.png,a green square,val\nb_again.png,a blue circle,test\n")
    suffix = " (the same bytes)" if how == "copy" else ""
    with pytest.raises(DataError, match=rf"e.g. {photos / 'b.png'} in the train and the test split \(there as "
                                        rf"{photos / 'b_again.png'}{re.escape(suffix)}\)"):
        check_disjoint_splits(splits(photos))
    (photos / "b_again.png").unlink()
    Image.new("RGB", (48, 40), "white").save(photos / "b_again.png")  # another picture: no overlap
    check_disjoint_splits(splits(photos))


def test_training_refuses_it_before_anything_is_written_and_the_setting_allows_it(photos, tmp_path, monkeypatch,
                                                                                  capsys, caplog):
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    shapes = "  dataset: {name: shapes, num_train: 12, num_val: 4, num_test: 4, image_size: 64}\n"
    assert shapes in TINY_SHAPES_CONFIG
    config.write_text(TINY_SHAPES_CONFIG.replace(shapes, f"  dataset: {{name: folder, root: {photos}}}\n"))
    args = [str(config), "train.run_name=overlap"]
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("capkit train: error: 1 images are in two splits") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    with caplog.at_level(logging.WARNING):
        assert train_cli.main([*args, "data.allow_split_overlap=true"]) == 0
    assert "(allowed: data.allow_split_overlap=true)" in caplog.text
