"""Images as users have them: EXIF orientation, every PIL mode, decompression bombs; and a feature cache that
notices a changed image file or a damaged array."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capkit.data import build_transform, cached_features
from capkit.data.images import open_image
from capkit.data.loaders import ImageSource
from capkit.data.records import ImageRecord
from capkit.errors import CorruptImageError
from capkit.registry import DATASETS


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show it rotated 90 degrees clockwise
    wide.save(tmp_path / "turned.jpg", exif=exif)
    assert open_image(tmp_path / "turned.jpg").size == (20, 40)


def test_16_bit_grey_is_scaled_not_clipped_to_white(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as raw:
        assert raw.mode.startswith("I")  # what PIL gives a 16-bit PNG, which its convert("RGB") turns white
    assert np.asarray(open_image(tmp_path / "grey16.png"))[0, 0].tolist() == [128, 128, 128]


def transparent_black_with_a_red_dot(mode: str) -> Image.Image:
    if mode == "P":  # palette entry 0 black, declared transparent; entry 1 red
        img = Image.new("P", (4, 4), 0)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.putpixel((0, 0), 1)
        img.info["transparency"] = 0
        return img
    if mode == "L":  # a transparent grey level (tRNS), no alpha band
        img = Image.new("L", (4, 4), 0)
        img.putpixel((0, 0), 200)
        img.info["transparency"] = 0
        return img
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L"])
def test_transparent_pixels_are_laid_over_white(tmp_path, mode):
    img = transparent_black_with_a_red_dot(mode)
    img.save(tmp_path / "a.png", **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
    pixels = np.asarray(open_image(tmp_path / "a.png"))
    assert pixels.shape == (4, 4, 3) and pixels[3, 3].tolist() == [255, 255, 255]  # transparent: white
    assert pixels[0, 0].tolist() != [255, 255, 255]  # the opaque dot keeps its colour


def test_the_torch_free_runtime_converts_every_mode_as_capkit_does():
    """capkit_onnx keeps its own copy of ``to_rgb`` (the runtime imports neither torch nor capkit): both copies
    must give the same pixels for every awkward mode."""
    from capkit_onnx.images import to_rgb as runtime_to_rgb

    from capkit.data.images import to_rgb

    pictures = [transparent_black_with_a_red_dot(mode) for mode in ("RGBA", "LA", "P", "L")] + [
        Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000),  # 16-bit grey
        Image.fromarray(np.linspace(-0.5, 1.5, 64, dtype=np.float32).reshape(8, 8)),  # float grey, out of range too
        Image.new("CMYK", (4, 4), (0, 255, 255, 0)),
        Image.new("RGB", (4, 4), (10, 20, 30)),
    ]
    for picture in pictures:
        assert np.array_equal(np.asarray(runtime_to_rgb(picture)), np.asarray(to_rgb(picture))), picture.mode


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = np.asarray(open_image(tmp_path / "cmyk.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_a_decompression_bomb_is_refused_and_covered_by_the_skip_setting(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    with pytest.raises(CorruptImageError, match=r"big\.png has 100 x 100 pixels, over the limit of 5,000 "
                       r"\(data\.max_image_pixels\)"):
        open_image(tmp_path / "big.png", max_pixels=5000)
    records = [ImageRecord("big", ["x"], path=tmp_path / "big.png"), ImageRecord("small", ["y"], path=tmp_path / "small.png")]
    source = ImageSource(records, build_transform({"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                                   "interpolation": "bilinear", "crop_pct": 1.0}), True, 5000)
    with pytest.warns(UserWarning, match=r"big\.png has 100 x 100 pixels.*Skipped \(data\.skip_corrupt_images=true\)"):
        assert source[0] is None
    assert source[1].shape == (3, 8, 8)


def test_the_pixel_limit_is_capkits_own_whatever_pils_is(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # PIL's process-wide bomb limit, lower than the image
    assert open_image(tmp_path / "big.png", max_pixels=None).size == (100, 100)  # data.max_image_pixels: null
    assert open_image(tmp_path / "big.png", max_pixels=20_000).size == (100, 100)  # raised
    assert Image.MAX_IMAGE_PIXELS == 5000  # left as it was


def test_a_non_image_file_names_the_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(CorruptImageError, match=r"cannot decode image .*notes\.jpg"):
        open_image(tmp_path / "notes.jpg")


@pytest.fixture
def folder_split(tmp_path):
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(tmp_path / f"{i}.png")
    (tmp_path / "captions.csv").write_text("image,caption,split\n" + "".join(f"{i}.png,a thing,train\n" for i in range(3)))
    return DATASETS.build({"name": "folder", "root": str(tmp_path)}, split="train")


def test_the_cache_notices_a_changed_image_and_a_damaged_array(tmp_path, folder_split, tiny_encoder):
    cache, transform = tmp_path / "cache", build_transform(tiny_encoder.data_config)
    extract = lambda: cached_features(folder_split.records, tiny_encoder, transform,  # noqa: E731
                                      identity=folder_split.identity(), cache_dir=cache, batch_size=2)
    first = extract()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(extract()[1], first[1])  # unchanged: read back, no warning
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "1.png")  # the user fixes or replaces a file
    os.utime(tmp_path / "1.png", ns=(1, 1))
    with pytest.warns(UserWarning, match=r"1 images changed since the features .* were extracted \(e\.g\. \['1\.png'\]\)"):
        again = extract()
    assert not torch.equal(again[1], first[1]) and torch.equal(again[0], first[0])
    (array,) = cache.glob("*.npy")
    array.write_bytes(array.read_bytes()[:-100])  # cut short, as a full disk leaves it
    with pytest.warns(UserWarning, match=r"is damaged \(shape .*its sidecar says \[3, "):
        repaired = extract()
    assert torch.equal(repaired[1], again[1])
    (sidecar,) = cache.glob("*.json")
    assert sorted(json.loads(sidecar.read_text())["files"]) == ["0.png", "1.png", "2.png"]
    sidecar.write_text('{"key": ')  # cut short
    with pytest.warns(UserWarning, match=r"\.json is damaged .*extracting the features again"):
        assert torch.equal(extract()[1], again[1])


def test_an_image_rewritten_with_the_same_size_and_time_is_noticed(tmp_path, folder_split, tiny_encoder):
    cache, transform = tmp_path / "cache", build_transform(tiny_encoder.data_config)
    extract = lambda: cached_features(folder_split.records, tiny_encoder, transform,  # noqa: E731
                                      identity=folder_split.identity(), cache_dir=cache, batch_size=2)
    path = tmp_path / "1.png"
    Image.new("RGB", (32, 32), (40, 80, 120)).save(path, compress_level=0)  # stored: its size is the pixels'
    first = extract()[1]  # read now: the store maps its file when first read
    before = path.stat()
    Image.new("RGB", (32, 32), (255, 255, 255)).save(path, compress_level=0)  # white now, the same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and its old modification time
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.warns(UserWarning, match=r"1 images changed since the features .* \(e\.g\. \['1\.png'\]\)"):
        again = extract()
    assert not torch.equal(again[1], first)


def test_a_cache_made_by_skipping_unreadable_images_does_not_serve_a_run_that_does_not_skip(tmp_path, folder_split,
                                                                                             tiny_encoder):
    (tmp_path / "2.png").write_bytes(b"damaged")
    cache, transform = tmp_path / "cache", build_transform(tiny_encoder.data_config)

    def extract(skip):
        return cached_features(folder_split.records, tiny_encoder, transform, identity=folder_split.identity(),
                               cache_dir=cache, batch_size=2, skip_corrupt=skip)

    with pytest.warns(UserWarning, match=r"2\.png"):
        assert len(extract(True).image_ids) == 2
    with pytest.raises(CorruptImageError, match=r"2\.png"):
        extract(False)


def test_images_written_anew_with_the_same_content_keep_their_features_without_extraction(tmp_path, folder_split,
                                                                                           tiny_encoder, monkeypatch):
    cache, transform = tmp_path / "cache", build_transform(tiny_encoder.data_config)
    extract = lambda: cached_features(folder_split.records, tiny_encoder, transform,  # noqa: E731
                                      identity=folder_split.identity(), cache_dir=cache, batch_size=2)
    first = extract()[1]
    (sidecar,) = cache.glob("*.json")
    for i in range(3):  # a copy without -p, a new mount: every file rewritten with its own bytes, new times
        path = tmp_path / f"{i}.png"
        path.write_bytes(path.read_bytes())
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    stale = json.loads(sidecar.read_text())["files"]
    calls = []
    tiny_encoder.register_forward_hook(lambda *args: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "images changed" warning
        assert torch.equal(extract()[1], first)
    assert calls == []  # read back, not extracted
    files = json.loads(sidecar.read_text())["files"]  # the new times recorded: the next run compares times only
    assert files != stale and files["1.png"][1] == 10**18 + 1
    assert not list(cache.glob("*.partial-*"))
    os.utime(tmp_path / "2.png", ns=(7, 7))
    read_bytes = Path.read_bytes

    def unreadable_2(path):
        if path.name == "2.png":
            raise OSError(5, "Input/output error", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", unreadable_2)
    with pytest.warns(UserWarning, match=r"1 images changed since the features .* \(e\.g\. \['2\.png'\]\)"):
        extract()  # its times differ and it cannot be read to compare: extracted again
    assert calls
    monkeypatch.undo()
    meta = json.loads(sidecar.read_text())
    meta["content"] = ["damaged"]  # like an entry from before the digests: times alone decide, as they did
    sidecar.write_text(json.dumps(meta))
    os.utime(tmp_path / "0.png", ns=(5, 5))
    calls.clear()
    with pytest.warns(UserWarning, match=r"1 images changed since the features .* \(e\.g\. \['0\.png'\]\)"):
        assert torch.equal(extract()[1], first)
    assert calls  # extracted again: the hook sees extraction
