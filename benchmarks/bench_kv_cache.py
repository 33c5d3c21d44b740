"""Transformer decoding: the key/value cache against recomputing the prefix at every step (beam search).

A small random ``transformer`` decoder captions random encoder features (a 7 x 7 x 512 grid, like a CNN's
last feature map) with batched beam search, once with ``use_cache`` and once without; ``<end>`` is
suppressed so every caption runs to ``max_len`` words and both modes do the same number of steps. Checks
that both give the same tokens and scores, prints a table and writes ``benchmarks/results/bench_kv_cache.json``.
Run: ``python -m benchmarks`` (all benchmarks) or ``python -m benchmarks.bench_kv_cache``.
"""
from __future__ import annotations

import argparse
import time

import torch

import capkit  # noqa: F401  (registers the decoders)
from benchmarks.common import sync, write_results
from capkit.registry import DECODERS
from capkit.types import EOS_ID, EncoderOutput

NUM_IMAGES = 64
BATCH_SIZE = 16  # images per beam search call
BEAM_SIZE = 3
MAX_LEN = 16
REPEATS = 2  # best of: the machine may be shared
GRID, CHANNELS, VOCAB = (7, 7), 512, 5000
DECODER = {"name": "transformer", "d_model": 256, "num_layers": 3, "num_heads": 8, "ffn_dim": 1024, "dropout": 0.1}


@torch.inference_mode()
def _decode(decoder, batches: list[EncoderOutput], use_cache: bool, beam_size: int, max_len: int, repeats: int):
    decoder.use_cache = use_cache
    device = batches[0].feats.device
    decoder.generate(batches[0], beam_size=beam_size, max_len=2)  # warm-up
    best, generations = float("inf"), []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        generations = [decoder.generate(b, beam_size=beam_size, max_len=max_len) for b in batches]
        sync(device)
        best = min(best, time.perf_counter() - start)
    tokens = [t for g in generations for t in g.tokens]
    scores = torch.cat([g.scores for g in generations]).cpu()
    return best, tokens, scores


def main(
    num_images: int = NUM_IMAGES,
    beam_size: int = BEAM_SIZE,
    max_len: int = MAX_LEN,
    repeats: int = REPEATS,
    decoder_cfg: dict | None = None,
    write: bool = True,
    device: torch.device | None = None,
) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(decoder_cfg or DECODER)
    cfg.setdefault("max_len", max_len + 1)
    torch.manual_seed(0)
    decoder = DECODERS.build(cfg, attention=None, encoder_dim=CHANNELS, vocab_size=VOCAB).to(device).eval()
    with torch.no_grad():
        decoder.out.bias[EOS_ID] = -1e4  # every hypothesis runs to max_len: equal work in both modes
    feats = torch.randn(num_images, GRID[0] * GRID[1], CHANNELS, generator=torch.Generator().manual_seed(1)).to(device)
    batches = [EncoderOutput(feats[i : i + BATCH_SIZE], GRID) for i in range(0, num_images, BATCH_SIZE)]

    cached_s, cached_tokens, cached_scores = _decode(decoder, batches, True, beam_size, max_len, repeats)
    plain_s, plain_tokens, plain_scores = _decode(decoder, batches, False, beam_size, max_len, repeats)
    same_tokens = cached_tokens == plain_tokens
    max_score_diff = float((cached_scores - plain_scores).abs().max())
    row = {
        "device": device.type,
        "images": num_images,
        "beam_size": beam_size,
        "max_len": max_len,
        "cache_s": cached_s,
        "recompute_s": plain_s,
        "cache_img_s": num_images / cached_s,
        "recompute_img_s": num_images / plain_s,
        "speedup": plain_s / cached_s,
        "same_tokens": same_tokens,
        "max_score_diff": max_score_diff,
    }
    params = sum(p.numel() for p in decoder.parameters())
    print(f"{num_images} images of {GRID[0]}x{GRID[1]}x{CHANNELS} random features, batch {BATCH_SIZE}, beam {beam_size}, "
          f"max_len {max_len}, decoder {cfg} ({params / 1e6:.1f} M params), vocab {VOCAB}, "
          f"{device.type} fp32, {torch.get_num_threads()} threads, best of {repeats}")
    print(f"{'mode':<22}{'seconds':>10}{'img/s':>10}")
    print(f"{'kv cache':<22}{cached_s:>10.2f}{row['cache_img_s']:>10.1f}")
    print(f"{'recompute prefix':<22}{plain_s:>10.2f}{row['recompute_img_s']:>10.1f}")
    print(f"speed-up {row['speedup']:.2f}x; same tokens: {same_tokens}; max score difference {max_score_diff:.1e}")
    if not same_tokens or max_score_diff > 1e-4:
        raise AssertionError("the cached and recomputed decodings differ")
    if write:
        write_results("bench_kv_cache", device, {"decoder": cfg, "vocab": VOCAB, "grid": list(GRID),
                                                 "channels": CHANNELS, "batch_size": BATCH_SIZE, "results": [row]})
    return row


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=NUM_IMAGES)
    parser.add_argument("--beam-size", type=int, default=BEAM_SIZE)
    parser.add_argument("--max-len", type=int, default=MAX_LEN)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    main(args.images, args.beam_size, args.max_len, args.repeats)
