"""ONNX export of the shipped model: onnxruntime (``capkit_onnx``) against PyTorch on the CPU, and their parity.

Speed (``python -m benchmarks export``): the shipped ``sat-flickr8k`` (EfficientNet-Lite2 + Bahdanau + Show,
Attend and Tell) is exported (``capkit.export.export_onnx``, float32, and float16 weights for their sizes); the
first ``IMAGES`` Flickr8k dev photos of ../shared/data (else generated 500 x 375 pictures) are opened and
preprocessed once for each runtime (the same Pillow resize and crop), then both caption the same pixels at the
model's beam (3) in one call each: PyTorch ``TrainedCaptioner.caption_pictures`` (encoder in chunks of 16, then
the batched beam search) and onnxruntime ``OnnxCaptioner.caption_pixels`` (the same chunks, the numpy twin of the
search). One warm-up each, then ``TIMED`` passes interleaved; the median is reported. Both use every core
(torch's and onnxruntime's default thread counts), or ``--threads N`` each. The captions of the two are compared
too.

Parity (``python -m benchmarks.bench_export --parity``): ``PARITY_IMAGES`` dev photos at beams 1 and 3, for the
shipped model and for a Transformer-decoder model (the same encoder and vocabulary, a 2-layer decoder with random
weights, its output layer scaled x3 so that captions differ between photos): the number of identical captions
and the largest |score difference|. Writes ``benchmarks/results/bench_export.json`` (and
``bench_export_parity.json``; ``bench_export_threads<N>.json`` with ``--threads N``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

import capkit
from benchmarks.common import write_results
from capkit.config import ExperimentConfig
from capkit.data.images import open_image
from capkit.export import export_onnx
from capkit.pretrained import TrainedCaptioner

IMAGES = 50
PARITY_IMAGES = 100
TIMED = 3
MODEL = "sat-flickr8k"
FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
TRANSFORMER = {"name": "transformer", "d_model": 256, "num_layers": 2, "num_heads": 4, "ffn_dim": 1024,
               "max_len": 20, "dropout": 0.1}


def pictures(count: int) -> tuple[list[Image.Image], str]:
    """The first ``count`` Flickr8k dev photos (RGB), or generated pictures where the data is absent."""
    split = FLICKR8K / "Flickr8k_text" / "Flickr_8k.devImages.txt"
    if split.is_file():
        names = split.read_text().split()[:count]
        return [open_image(FLICKR8K / "Flicker8k_Dataset" / name) for name in names], \
            f"the first {len(names)} Flickr8k dev photos"
    rng = np.random.default_rng(0)
    generated = [Image.fromarray(np.clip(rng.integers(0, 256, 3) + rng.normal(0, 60, (375, 500, 3)), 0, 255)
                                 .astype(np.uint8)) for _ in range(count)]
    return generated, f"{count} generated 500 x 375 pictures (no Flickr8k at {FLICKR8K})"


def transformer_model(shipped: TrainedCaptioner) -> TrainedCaptioner:
    """The shipped model's encoder and vocabulary under a random 2-layer Transformer decoder."""
    model_cfg = {"encoder": dict(shipped.config.model.encoder), "attention": {"name": "none"},
                 "decoder": TRANSFORMER}
    torch.manual_seed(0)
    model = capkit.build_captioner(model_cfg, len(shipped.vocab)).eval()
    with torch.no_grad():
        model.decoder.out.weight.mul_(3.0)
    config = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), {"model": model_cfg,
                                                                      "eval": dict(shipped.config.eval)})
    return TrainedCaptioner(model, shipped.vocab, config, torch.device("cpu"), dict(shipped.preprocessing))


def compare(torch_results, onnx_results) -> dict:
    same = sum(a.caption == b.caption for a, b in zip(torch_results, onnx_results))
    diff = max(abs(a.score - b.score) for a, b in zip(torch_results, onnx_results))
    return {"identical": same, "of": len(torch_results), "max_abs_score_diff": float(diff),
            "distinct_captions": len({a.caption for a in torch_results})}


def parity(model: TrainedCaptioner, export_dir: Path, photos: list[Image.Image]) -> dict:
    from capkit_onnx import OnnxCaptioner

    runtime = OnnxCaptioner.from_pretrained(export_dir)
    found = {}
    for beam in (1, 3):
        want = model.caption(photos, beam_size=beam, batch_size=50)
        got = runtime.caption(photos, beam_size=beam, batch_size=50)
        found[f"beam_{beam}"] = compare(want, got)
    return found


def run_parity(count: int) -> None:
    photos, source = pictures(count)
    shipped = capkit.from_pretrained(MODEL)
    results = {}
    with tempfile.TemporaryDirectory(prefix="capkit-bench-export-") as tmp:
        for name, model in ((MODEL, shipped), ("transformer (random decoder)", transformer_model(shipped))):
            out = Path(tmp) / name.split()[0]
            export_onnx(model, out)
            results[name] = {"architecture": model.architecture, **parity(model, out, photos)}
            for beam, r in results[name].items():
                if beam.startswith("beam"):
                    print(f"{name}, {beam.replace('_', ' ')}: {r['identical']}/{r['of']} identical captions, max "
                          f"|score diff| {r['max_abs_score_diff']:.2e} ({r['distinct_captions']} distinct captions)",
                          flush=True)
    write_results("bench_export_parity", torch.device("cpu"), {"images": source, "transformer": TRANSFORMER,
                                                               "models": results})


def main(count: int = IMAGES, threads: int | None = None) -> None:
    from capkit_onnx import OnnxCaptioner

    if threads is not None:
        torch.set_num_threads(threads)
    photos, source = pictures(count)
    model = capkit.from_pretrained(MODEL)
    decoding = model.decoding
    with tempfile.TemporaryDirectory(prefix="capkit-bench-export-") as tmp:
        start = time.perf_counter()
        summary = export_onnx(model, Path(tmp) / "fp32")
        export_s = time.perf_counter() - start
        half = export_onnx(model, Path(tmp) / "fp16", fp16=True)
        runtime = OnnxCaptioner.from_pretrained(Path(tmp) / "fp32", threads=threads)
        inputs = torch.stack([model.transform(p) for p in photos])  # (B, 3, H, W)
        pixels = np.stack([runtime.preprocess(p) for p in photos])  # (B, H, W, 3) uint8
        batch = [(p, None) for p in photos]

        def run_torch():
            return model.caption_pictures(batch, inputs=inputs, **decoding)

        def run_onnx():
            return runtime.caption_pixels(pixels, **decoding)

        seconds: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        outputs = {"torch": run_torch(), "onnxruntime": run_onnx()}  # warm-up
        for _ in range(TIMED):
            for name, fn in (("torch", run_torch), ("onnxruntime", run_onnx)):
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    speed = {name: round(count / statistics.median(times), 2) for name, times in seconds.items()}
    agreement = compare(outputs["torch"], outputs["onnxruntime"])
    sizes = {"float32": summary.sizes, "float16_weights": half.sizes}
    print(f"{source}; {model.architecture}, beam {decoding['beam_size']}, {count} images per call, median of "
          f"{TIMED}; torch {torch.get_num_threads()} threads, onnxruntime {threads or 'its default'}")
    print(f"{'runtime':>12}{'images/s':>10}")
    for name, value in speed.items():
        print(f"{name:>12}{value:>10.2f}")
    print(f"onnxruntime / torch: {speed['onnxruntime'] / speed['torch']:.2f}x; captions identical: "
          f"{agreement['identical']}/{agreement['of']}, max |score diff| {agreement['max_abs_score_diff']:.1e}")
    for kind, files in sizes.items():
        print(f"{kind} files: " + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in files.items()))
    print(f"export (float32, with its onnxruntime check): {export_s:.1f} s")
    write_results("bench_export" if threads is None else f"bench_export_threads{threads}", torch.device("cpu"), {
        "images": source, "model": MODEL, "architecture": model.architecture, "decoding": decoding,
        "count": count, "timed": TIMED, "onnxruntime_threads": threads or "default (one per core)", "seconds": seconds, "images_per_s": speed,
        "speedup_onnxruntime_over_torch": round(speed["onnxruntime"] / speed["torch"], 2),
        "captions": agreement, "file_bytes": sizes, "export_seconds": round(export_s, 1),
        "max_abs_diff_at_export": summary.max_abs_diff,
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, help=f"photos to caption (default: {IMAGES}; {PARITY_IMAGES} "
                        "with --parity)")
    parser.add_argument("--threads", type=int, help="threads of each runtime (default: each one's own default)")
    parser.add_argument("--parity", action="store_true", help="count identical captions at beams 1 and 3 instead")
    args = parser.parse_args()
    if args.parity:
        run_parity(args.images or PARITY_IMAGES)
    else:
        main(args.images or IMAGES, args.threads)
