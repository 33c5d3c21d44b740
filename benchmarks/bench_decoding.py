"""Decoding throughput: capkit's batched beam search vs the same model decoding one image at a time.

256 images of precomputed 8x8x2048 features (inception_v3's grid), ``show_attend_tell`` decoder with
``bahdanau`` attention, vocabulary 5,000, embedding / hidden / attention size 512, random weights (the output
layer scaled x5 so the word distributions are peaked like a trained model's), at most 16 words. For beam sizes
1, 3 and 5:

- **one image at a time**: ``model.generate`` called per image (what the widely used implementations do:
  a beam of K hypotheses for one image per step);
- **batched**: ``model.generate`` on batches of ``IMAGES_PER_BATCH`` images (every image's beams in one tensor
  per step).

Both must return identical captions (asserted, in fp32; under CUDA autocast the share of identical captions
in the timed bf16 runs is recorded too) before the timings are reported. Both run the same
arithmetic, so the gain is what large matrix products gain over small ones on the machine; the table's
"GEMM ceiling" measures that for the LSTM's largest product (beam rows vs 64 x beam rows). One-image-at-a-time is timed
once over all 256 images; batched is the median of ``TIMED`` passes after a warm-up pass. On CUDA (when
available) both are timed under bf16 autocast. Prints a table and writes ``benchmarks/results/bench_decoding.json``.
Run: ``python -m benchmarks`` (or ``make bench``).
"""
from __future__ import annotations

import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.bench_decoder_train import machine
from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.types import EncoderOutput

IMAGES, IMAGES_PER_BATCH, GRID, CHANNELS, VOCAB, DIM, MAX_LEN = 256, 64, (8, 8), 2048, 5000, 512, 16
BEAMS = (1, 3, 5)
TIMED = 3
RESULTS = Path(__file__).resolve().parent / "results" / "bench_decoding.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(channels: int, vocab: int, dim: int, device: torch.device) -> ShowAttendTellDecoder:
    torch.manual_seed(0)
    decoder = ShowAttendTellDecoder(
        partial(BahdanauAttention, attn_dim=dim), channels, vocab, embed_dim=dim, hidden_dim=dim, dropout=0.5
    )
    with torch.no_grad():
        decoder.out.weight.mul_(5.0)
    return decoder.to(device).eval()


def gemm_ceiling(
    rows: int, batched_rows: int, inner: int, outer: int, device: torch.device, repeats: int = 20
) -> float:
    """How much faster per row the LSTM's largest product, (rows, inner) x (inner, outer), runs with
    ``batched_rows`` rows than with ``rows``: roughly the most batching can gain when both paths do the
    same arithmetic (it gains more where small products are slower, e.g. on GPUs)."""
    weight = torch.randn(outer, inner, device=device)
    per_row = []
    for m in (rows, batched_rows):
        x = torch.randn(m, inner, device=device)
        torch.nn.functional.linear(x, weight)  # warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, weight)
        _sync(device)
        per_row.append((time.perf_counter() - start) / (repeats * m))
    return per_row[0] / per_row[1]


def run(
    images: int = IMAGES, per_batch: int = IMAGES_PER_BATCH, grid: tuple[int, int] = GRID, channels: int = CHANNELS,
    vocab: int = VOCAB, dim: int = DIM, max_len: int = MAX_LEN, beams: tuple[int, ...] = BEAMS, timed: int = TIMED,
    device: torch.device | None = None,
) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cuda" else None
    decoder = build(channels, vocab, dim, device)
    feats = torch.rand(images, grid[0] * grid[1], channels, generator=torch.Generator().manual_seed(0)).to(device)

    def decode(start: int, stop: int, beam: int, amp: torch.dtype | None = amp) -> list:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return decoder.generate(EncoderOutput(feats[start:stop], grid), beam_size=beam, max_len=max_len).best

    def batched(beam: int, amp: torch.dtype | None = amp) -> list:
        return [h for i in range(0, images, per_batch) for h in decode(i, min(i + per_batch, images), beam, amp)]

    def one_at_a_time(beam: int, amp: torch.dtype | None = amp) -> list:
        return [h for i in range(images) for h in decode(i, i + 1, beam, amp)]

    rows = []
    for beam in beams:
        for i in range(4):  # warm-up
            decode(i, i + 1, beam)
        _sync(device)
        start = time.perf_counter()
        alone = one_at_a_time(beam)
        _sync(device)
        alone_s = time.perf_counter() - start
        times, together = [], None
        for i in range(1 + timed):
            _sync(device)
            start = time.perf_counter()
            together = batched(beam)
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
        timed_same = sum(a.tokens == b.tokens for a, b in zip(alone, together)) / images
        if amp is not None:  # bf16 products of different row counts round differently: the check runs in fp32
            alone, together = one_at_a_time(beam, None), batched(beam, None)
        mismatched = [i for i, (a, b) in enumerate(zip(alone, together)) if a.tokens != b.tokens]
        assert not mismatched, f"beam {beam}: captions differ for images {mismatched[:10]}"
        worst = max(abs(a.score - b.score) for a, b in zip(alone, together))
        batched_s = statistics.median(times)
        ceiling = gemm_ceiling(beam, per_batch * beam, channels + dim, 4 * dim, device)
        rows.append({
            "beam": beam, "gemm_ceiling": ceiling, "one_at_a_time_s": alone_s, "batched_s": batched_s,
            "batched_all_s": times,
            "one_at_a_time_img_s": images / alone_s, "batched_img_s": images / batched_s,
            "speedup": alone_s / batched_s, "max_score_diff": worst, "same_captions_timed": timed_same,
            "mean_words": statistics.mean(len(h.tokens) for h in together),
        })
    return {"device": device.type, "amp": str(amp) if amp else "fp32", "images": images, "images_per_batch": per_batch,
            "grid": list(grid), "channels": channels, "vocab": vocab, "dim": dim, "max_len": max_len,
            "timed": timed, "results": rows}


def main() -> None:
    result = run()
    print(f"decoding {result['images']} images: grid {result['grid'][0]}x{result['grid'][1]}x{result['channels']}, "
          f"vocab {result['vocab']}, dim {result['dim']}, max {result['max_len']} words, {result['device']} "
          f"{result['amp']}, {torch.get_num_threads()} threads; batched = {result['images_per_batch']} images per "
          f"generate call (median of {result['timed']}), one image at a time = 1 pass")
    print(f"{'beam':>4}{'1-at-a-time img/s':>19}{'batched img/s':>15}{'speedup':>9}{'same captions':>15}"
          f"{'max |dscore|':>14}{'GEMM ceiling':>14}")
    for r in result["results"]:
        print(f"{r['beam']:>4}{r['one_at_a_time_img_s']:>19.1f}{r['batched_img_s']:>15.1f}{r['speedup']:>8.1f}x"
              f"{'yes':>15}{r['max_score_diff']:>14.1e}{r['gemm_ceiling']:>13.1f}x")
    print("GEMM ceiling: per-row speed of the LSTM's (rows, 2560) x (2560, 2048) product with 64 x beam rows "
          "over beam rows, on this machine")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine(), **result}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
