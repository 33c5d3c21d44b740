"""Small shared fixtures: tiny JPEGs, a tiny Flickr8k-layout copy, a tiny encoder, the real data folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # real Flickr8k / COCO, where this machine has them


def write_jpeg(path: Path, seed: int = 0, size: int = 32) -> Path:
    """A small random JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_truncated_jpeg(path: Path, seed: int = 0) -> Path:
    data = write_jpeg(path, seed).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def flickr8k_copy(tmp_path: Path) -> Path:
    """Flickr8k layout: train t0..t3 (t3.jpg missing), val v0 (fine) and v1 (truncated), test x0;
    plus the bogus ``bogus.jpg.1#0..4`` token entries of the real file."""
    text, images = tmp_path / "Flickr8k_text", tmp_path / "Flicker8k_Dataset"
    splits = {"train": ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg"], "dev": ["v0.jpg", "v1.jpg"], "test": ["x0.jpg"]}
    text.mkdir(parents=True)
    lines = []
    for split, names in splits.items():
        (text / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
        for n in names:
            lines += [f"{n}#{k}\t{n[:-4].upper()} caption number {k} ." for k in range(5)]
    lines[3:3] = [f"bogus.jpg.1#{k}\tA bogus caption ." for k in range(5)]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for i, n in enumerate(["t0.jpg", "t1.jpg", "t2.jpg", "v0.jpg", "x0.jpg"]):
        write_jpeg(images / n, seed=i)
    write_truncated_jpeg(images / "v1.jpg")
    return tmp_path


@pytest.fixture
def make_jpeg():
    """``make_jpeg(path, seed=0, size=32)`` writes a small random JPEG."""
    return write_jpeg


@pytest.fixture(scope="session")
def tiny_encoder():
    """A tiny random timm encoder (frozen, 160 px input, grid 5 x 5, 256 channels)."""
    from capkit.registry import ENCODERS

    return ENCODERS.build({"name": "timm", "model_name": "test_efficientnet"})


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data relative to the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished one-epoch run of ``toys.TINY_SHAPES_CONFIG`` (``RunDir``), shared by the tests that only read it."""
    from capkit.cli import train as train_cli
    from capkit.engine import RunDir
    from toys import TINY_SHAPES_CONFIG

    root = tmp_path_factory.mktemp("tiny_run")
    (root / "tiny.yaml").write_text(TINY_SHAPES_CONFIG)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPKIT_CACHE", str(root / "cache"))
        assert train_cli.main([str(root / "tiny.yaml"), f"train.output_dir={root / 'runs'}", "train.run_name=tiny",
                               "eval.tensorboard_samples=0"]) == 0
    return RunDir(root / "runs" / "tiny")
