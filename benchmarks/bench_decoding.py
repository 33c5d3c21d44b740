"""Decoding throughput: capkit's batched beam search vs the same model decoding one image at a time.

256 images of precomputed 8x8x2048 features (inception_v3's grid), ``show_attend_tell`` decoder with
``bahdanau`` attention, vocabulary 5,000, embedding / hidden / attention size 512, random weights (the output
layer scaled x5 so the word distributions are peaked like a trained model's), at most 16 words. For beam sizes
1, 3 and 5:

- **one image at a time**: ``model.generate`` called per image (what the widely used implementations do:
  a beam of K hypotheses for one image per step);
- **batched**: ``model.generate`` on all 256 images in one call (every image's beams in one tensor per step),
  and on batches of ``EVAL_BATCH`` images, the evaluator's default ``eval.batch_size``;
- **usual implementation**: the beam search of the widely used tutorials (sgrvinod's ``caption.py`` style,
  ``usual_beam_search`` below) on the same weights (``TutorialShowAttendTell`` of the training benchmark, with
  capkit's tanh score so that the captions can be compared): one
  image at a time, its features copied to every hypothesis, the encoder-side attention projection recomputed
  at every step, Python lists for the hypotheses. It is slow, so it decodes the first ``USUAL_IMAGES`` images
  and its images/s is compared with the batched search's.

All must return identical captions (asserted, in fp32; under CUDA autocast the share of identical captions
in the timed bf16 runs is recorded too) before the timings are reported. Both run the same
arithmetic, so the gain is what large matrix products gain over small ones on the machine; the table's
"GEMM ceiling" measures that for the LSTM's largest product (beam rows vs 256 x beam rows). One-image-at-a-time
is timed once over all 256 images; the batched sizes and usual are each the median of ``TIMED`` passes after a
warm-up, interleaved (each batched size, then a usual pass: the machine's load changes over a minute). On CUDA
(when available) all are timed under bf16 autocast. Prints a table and writes
``benchmarks/results/bench_decoding.json``. Run: ``python -m benchmarks`` (or ``make bench``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from torch import Tensor

from benchmarks.bench_decoder_train import TutorialShowAttendTell, baseline_from
from benchmarks.common import sync, write_results
from capkit.engine.device import cpu_has_native_bf16
from capkit.config import EvalConfig
from capkit.models.attention.bahdanau import BahdanauAttention
from capkit.models.decoders.base import Decoder
from capkit.models.decoders.show_attend_tell import ShowAttendTellDecoder
from capkit.models.decoders.word_lstm import WordGates
from capkit.types import BOS_ID, EOS_ID, PAD_ID, EncoderOutput, Hypothesis

IMAGES, GRID, CHANNELS, VOCAB, DIM, MAX_LEN = 256, (8, 8), 2048, 5000, 512, 16
EVAL_BATCH = EvalConfig().batch_size  # images per generate call in the evaluator, by default
PER_CALL = (IMAGES, EVAL_BATCH)  # batched sizes timed; the first is the table's "batched"
BEAMS = (1, 3, 5)
TIMED = 5
USUAL_IMAGES = 16  # images the usual implementation decodes (it recomputes the attention projection per step)


def build(channels: int, vocab: int, dim: int, device: torch.device) -> ShowAttendTellDecoder:
    torch.manual_seed(0)
    decoder = ShowAttendTellDecoder(
        partial(BahdanauAttention, attn_dim=dim), channels, vocab, embed_dim=dim, hidden_dim=dim, dropout=0.5
    )
    with torch.no_grad():
        decoder.out.weight.mul_(5.0)
    return decoder.to(device).eval()


@torch.no_grad()
def usual_beam_search(model: TutorialShowAttendTell, feats: Tensor, beam: int, max_len: int) -> tuple[list[int], float]:
    """Beam search over one image's features (N, C) as the widely used tutorials write it, with capkit's search
    rules (so the captions can be compared): ``<pad>`` and ``<start>`` banned, a finished hypothesis kept with
    its score frozen, ``<end>`` forced after ``max_len`` words, the best total log-probability returned."""
    enc = feats.unsqueeze(0)  # (1, N, C)
    mean = enc.mean(dim=1)
    h, c = model.init_h(mean).tanh(), model.init_c(mean).tanh()
    words = torch.tensor([BOS_ID], device=feats.device)
    scores = torch.zeros(1, device=feats.device)
    seqs: list[list[int]] = [[]]
    finished = [False]
    for t in range(max_len + 1):
        context, _ = model.attend(enc.expand(len(seqs), -1, -1), h)  # the projection of every copy, every step
        context = torch.sigmoid(model.f_beta(h)) * context
        emb = model.embedding(words)
        h, c = model.decode_step(torch.cat([emb, context], dim=1), (h, c))
        logp = model.fc((emb + model.L_h(h) + model.L_z(context)).tanh()).float().log_softmax(dim=-1)
        logp[:, [PAD_ID, BOS_ID]] = float("-inf")
        if t == max_len:
            logp[:, :EOS_ID] = logp[:, EOS_ID + 1 :] = float("-inf")
        for i, done in enumerate(finished):
            if done:
                logp[i] = float("-inf")
                logp[i, PAD_ID] = 0.0
        vocab = logp.shape[1]
        scores, flat = (scores.unsqueeze(1) + logp).view(-1).topk(beam)
        parents, new = (flat // vocab).tolist(), (flat % vocab).tolist()
        seqs = [seqs[p] if finished[p] else seqs[p] + [w] for p, w in zip(parents, new)]
        finished = [finished[p] or w == EOS_ID for p, w in zip(parents, new)]
        h, c, words = h[parents], c[parents], flat % vocab
        if all(finished):
            break
    best = int(scores.argmax())
    return seqs[best][:-1], float(scores[best])  # without <end>


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
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, weight)
        sync(device)
        per_row.append((time.perf_counter() - start) / (repeats * m))
    return per_row[0] / per_row[1]


def run(
    images: int = IMAGES, per_call: tuple[int, ...] = PER_CALL, grid: tuple[int, int] = GRID,
    channels: int = CHANNELS, vocab: int = VOCAB, dim: int = DIM, max_len: int = MAX_LEN,
    beams: tuple[int, ...] = BEAMS, timed: int = TIMED, device: torch.device | None = None,
) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cuda" else None
    decoder, feats = setup(images, grid, channels, vocab, dim, device)

    def decode(beam: int, per_batch: int, amp: torch.dtype | None = amp) -> list[Hypothesis]:
        return decode_in_batches(decoder, feats, beam, per_batch, grid=grid, max_len=max_len, amp=amp)

    usual = baseline_from(decoder, torch.tanh).eval()

    def usual_images(
        beam: int, amp: torch.dtype | None = amp, images: int = USUAL_IMAGES
    ) -> list[tuple[list[int], float]]:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return [usual_beam_search(usual, feats[i], beam, max_len) for i in range(images)]

    def timed_call(fn, *args):
        sync(device)
        start = time.perf_counter()
        out = fn(*args)
        sync(device)
        return out, time.perf_counter() - start

    rows = []
    for beam in beams:
        decode_in_batches(decoder, feats[:4], beam, 1, grid=grid, max_len=max_len, amp=amp)  # warm-up
        alone, alone_s = timed_call(decode, beam, 1)
        usual_images(beam, images=1)  # warm-up
        times: dict[int, list[float]] = {size: [] for size in per_call}
        usual_times, together = [], {}
        for i in range(1 + timed):  # batched and usual passes interleaved, so that all see the same machine
            for size in per_call:
                together[size], seconds = timed_call(decode, beam, size)
                if i:
                    times[size].append(seconds)
            if i:
                usual_out, seconds = timed_call(usual_images, beam)
                usual_times.append(seconds)
        timed_same = {size: sum(a.tokens == b.tokens for a, b in zip(alone, out)) / images
                      for size, out in together.items()}
        if amp is not None:  # bf16 products of different row counts round differently: the check runs in fp32
            alone = decode(beam, 1, None)
            together = {size: decode(beam, size, None) for size in per_call}
            usual_out = usual_images(beam, None)
        worst = 0.0
        for size, out in together.items():
            mismatched = [i for i, (a, b) in enumerate(zip(alone, out)) if a.tokens != b.tokens]
            assert not mismatched, f"beam {beam}, {size} per call: captions differ for images {mismatched[:10]}"
            worst = max(worst, *(abs(a.score - b.score) for a, b in zip(alone, out)))
        differ = [i for i, (tokens, _) in enumerate(usual_out) if tokens != alone[i].tokens]
        assert not differ, f"beam {beam}: the usual implementation's captions differ for images {differ}"
        worst = max(worst, *(abs(score - alone[i].score) for i, (_, score) in enumerate(usual_out)))
        usual_s = statistics.median(usual_times)
        usual_img_s = USUAL_IMAGES / usual_s
        sizes = []
        for size in per_call:
            seconds = statistics.median(times[size])
            sizes.append({
                "images_per_call": size, "s": seconds, "all_s": times[size], "img_s": images / seconds,
                "speedup_vs_usual": images / seconds / usual_img_s, "speedup_vs_one_at_a_time": alone_s / seconds,
                "same_captions_timed": timed_same[size],
            })
        rows.append({
            "beam": beam, "gemm_ceiling": gemm_ceiling(beam, per_call[0] * beam, channels + dim, 4 * dim, device),
            "one_at_a_time_s": alone_s, "one_at_a_time_img_s": images / alone_s, "batched": sizes,
            "max_score_diff": worst, "usual_images": USUAL_IMAGES, "usual_s": usual_s, "usual_all_s": usual_times,
            "usual_img_s": usual_img_s, "mean_words": statistics.mean(len(h.tokens) for h in together[per_call[0]]),
        })
    return {"device": device.type, "amp": str(amp) if amp else "fp32", "images": images, "per_call": list(per_call),
            "grid": list(grid), "channels": channels, "vocab": vocab, "dim": dim, "max_len": max_len,
            "timed": timed, "results": rows,
            "bf16": compare_bf16(decoder, feats, grid=grid, max_len=max_len, timed=timed) if device.type == "cpu"
            else None}


def compare_bf16(
    decoder: ShowAttendTellDecoder, feats: Tensor, *, beam: int = 3, grid: tuple[int, int] = GRID,
    max_len: int = MAX_LEN, timed: int = TIMED,
) -> dict:
    """Beam-``beam`` images/s of the batched search (all images in one call) in fp32 and under bf16 autocast
    (``eval.amp=bf16``), interleaved, and the share of images whose caption is the same in both; None where the
    CPU has no native bf16 (it would be emulated, slower)."""
    if not cpu_has_native_bf16():
        return {"native_bf16": False}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    out: dict[str, list[Hypothesis]] = {}
    for i in range(1 + timed):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            start = time.perf_counter()
            out[name] = decode_in_batches(decoder, feats, beam, len(feats), grid=grid, max_len=max_len, amp=dtype)
            if i:
                times[name].append(time.perf_counter() - start)
    same = sum(a.tokens == b.tokens for a, b in zip(out["fp32"], out["bf16"])) / len(feats)
    img_s = {name: len(feats) / statistics.median(ts) for name, ts in times.items()}
    return {"native_bf16": True, "beam": beam, "img_s": img_s, "all_s": times, "speedup": img_s["bf16"] / img_s["fp32"],
            "same_captions": same}


def decode_in_batches(
    decoder: ShowAttendTellDecoder, feats: Tensor, beam: int, per_batch: int, *, grid: tuple[int, int] = GRID,
    max_len: int = MAX_LEN, amp: torch.dtype | None = None, plain_step: bool = False,
) -> list[Hypothesis]:
    """The best hypothesis of every image of feats (I, N, C), ``per_batch`` images per ``generate`` call (1: one
    image at a time), under ``amp`` autocast when given. ``plain_step``: decode as ``Decoder.generate`` does,
    without the LSTM decoders' per-word gate cache."""
    generate = partial(Decoder.generate, decoder) if plain_step else decoder.generate
    with torch.autocast(feats.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return [h for i in range(0, len(feats), per_batch) for h in
                generate(EncoderOutput(feats[i : i + per_batch], grid), beam_size=beam, max_len=max_len).best]


def batched_pass(
    decoder: ShowAttendTellDecoder, feats: Tensor, beam: int, plain_step: bool = False
) -> tuple[list[Hypothesis], float]:
    """Batched decoding of every image in one call: (best hypotheses, seconds)."""
    start = time.perf_counter()
    best = decode_in_batches(decoder, feats, beam, IMAGES, plain_step=plain_step)
    return best, time.perf_counter() - start


def setup(
    images: int = IMAGES, grid: tuple[int, int] = GRID, channels: int = CHANNELS, vocab: int = VOCAB, dim: int = DIM,
    device: torch.device = torch.device("cpu"),
) -> tuple[ShowAttendTellDecoder, Tensor]:
    """The benchmark's decoder and its images' features (I, N, C) on ``device``."""
    feats = torch.rand(images, grid[0] * grid[1], channels, generator=torch.Generator().manual_seed(0))
    return build(channels, vocab, dim, device), feats.to(device)


def compare_compiled(beam: int = 3, timed: int = TIMED) -> dict:
    """Batched decoding with the decoder's plain step compiled (inductor, weights frozen) against eager decoding
    as ``generate`` runs it (with ``WordGates``, whose per-word bookkeeping depends on the data and so breaks
    a compiled graph), same captions asserted. Not part of ``make bench`` (compiling takes a while):
    ``python -m benchmarks.bench_decoding --compile``."""
    import torch._inductor.config as inductor_config

    decoder, feats = setup()
    batched_pass(decoder, feats, beam)  # warm-up
    eager = [batched_pass(decoder, feats, beam) for _ in range(timed)]
    inductor_config.freezing = True
    with torch.no_grad():
        decoder.step = torch.compile(decoder.step, dynamic=False)
        batched_pass(decoder, feats, beam, plain_step=True)  # compiles
        compiled = [batched_pass(decoder, feats, beam, plain_step=True) for _ in range(timed)]
    assert all(a.tokens == b.tokens for a, b in zip(eager[0][0], compiled[0][0])), "compiled captions differ"
    eager_s, compiled_s = statistics.median(t for _, t in eager), statistics.median(t for _, t in compiled)
    print(f"beam {beam}, {IMAGES} images: eager {eager_s:.2f} s, compiled step {compiled_s:.2f} s "
          f"({eager_s / compiled_s:.2f}x), same captions")
    return {"beam": beam, "eager_s": eager_s, "compiled_s": compiled_s}


def compare_word_gates(beam: int = 3, passes: int = 7) -> dict:
    """Batched decoding with each word's share of the LSTM gates computed once per call (``WordGates``, what
    ``generate`` does) against the plain step, at 256 and at ``EVAL_BATCH`` images per call: the median of
    ``passes`` interleaved passes after a warm-up, same captions asserted, and the distinct words whose gates a
    call computed. ``python -m benchmarks.bench_decoding --word-gates``."""
    decoder, feats = setup()
    variants = {"plain step": True, "word gates": False}  # plain_step
    times: dict[tuple[int, str], list[float]] = {}
    best: dict[str, list[Hypothesis]] = {}
    for i in range(1 + passes):
        for size in PER_CALL:
            for name, plain_step in variants.items():
                start = time.perf_counter()
                best[name] = decode_in_batches(decoder, feats, beam, size, plain_step=plain_step)
                if i:
                    times.setdefault((size, name), []).append(time.perf_counter() - start)
    assert all(a.tokens == b.tokens for a, b in zip(*best.values())), "captions differ"
    tables: list[WordGates] = []  # one more call of EVAL_BATCH images, to count its words
    init = WordGates.__init__
    WordGates.__init__ = lambda self, *args: tables.append(self) or init(self, *args)
    try:
        decode_in_batches(decoder, feats[:EVAL_BATCH], beam, EVAL_BATCH)
    finally:
        WordGates.__init__ = init
    tokens_fed = (1 + MAX_LEN * beam) * EVAL_BATCH
    words = int(tables[0].known.sum())
    result = {"beam": beam, "passes": passes, "distinct_words_per_call": words, "tokens_fed_per_call": tokens_fed}
    for size in PER_CALL:
        plain, gated = (statistics.median(times[size, name]) for name in variants)
        result[f"{size}_per_call"] = {"plain_s": plain, "word_gates_s": gated, "speedup": plain / gated}
        print(f"beam {beam}, {IMAGES} images, {size} per call: plain step {plain:.2f} s, word gates {gated:.2f} s "
              f"({plain / gated:.2f}x; median of {passes} interleaved passes), same captions")
    print(f"a call of {EVAL_BATCH} images feeds {tokens_fed} tokens and computes the gates of {words} distinct words")
    return result


def profile_batched(beam: int = 3, rows: int = 20) -> None:
    """Where batched decoding spends its time: ``torch.profiler``'s operators (by input shapes) sorted by self CPU
    time, over one pass of the images after a warm-up: ``python -m benchmarks.bench_decoding --profile``."""
    from torch.profiler import ProfilerActivity, profile

    decoder, feats = setup()
    batched_pass(decoder, feats, beam)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _, seconds = batched_pass(decoder, feats, beam)
    print(f"beam {beam}, {IMAGES} images in one call, {torch.get_num_threads()} threads: "
          f"{seconds:.2f} s under the profiler")
    table = prof.key_averages(group_by_input_shape=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=24,
                      max_shapes_column_width=60))


def main() -> None:
    result = run()
    first, second = result["per_call"]
    print(f"decoding {result['images']} images: grid {result['grid'][0]}x{result['grid'][1]}x{result['channels']}, "
          f"vocab {result['vocab']}, dim {result['dim']}, max {result['max_len']} words, {result['device']} "
          f"{result['amp']}, {torch.get_num_threads()} threads; batched = {first} images per generate call, "
          f"and {second} (eval.batch_size's default), median of {result['timed']}; one image at a time = 1 pass; "
          f"usual implementation = median of {result['timed']} over {USUAL_IMAGES} images")
    print(f"{'beam':>4}{'usual img/s':>13}{'1-at-a-time':>13}{'batched img/s':>15}{'vs usual':>10}"
          f"{'vs 1-at-a-time':>16}{f'{second}/call img/s':>17}{'vs usual':>10}{'max |dscore|':>14}{'GEMM ceiling':>14}")
    for r in result["results"]:
        batched, per_eval_batch = r["batched"]
        print(f"{r['beam']:>4}{r['usual_img_s']:>13.1f}{r['one_at_a_time_img_s']:>13.1f}{batched['img_s']:>15.1f}"
              f"{batched['speedup_vs_usual']:>9.1f}x{batched['speedup_vs_one_at_a_time']:>15.1f}x"
              f"{per_eval_batch['img_s']:>17.1f}{per_eval_batch['speedup_vs_usual']:>9.1f}x"
              f"{r['max_score_diff']:>14.1e}{r['gemm_ceiling']:>13.1f}x")
    print("usual: the tutorials' per-image beam search (attention projection recomputed per step); 1-at-a-time: "
          "capkit's search on one image per call;\nall captions identical (asserted); GEMM ceiling: per-row speed "
          f"of the LSTM's (rows, 2560) x (2560, 2048) product with {first} x beam rows over beam rows, on this machine")
    bf16 = result["bf16"]
    if bf16 and bf16["native_bf16"]:
        print(f"beam {bf16['beam']}, {result['images']} images per call: fp32 {bf16['img_s']['fp32']:.1f} img/s, bf16 "
              f"autocast {bf16['img_s']['bf16']:.1f} img/s ({bf16['speedup']:.2f}x); same caption for "
              f"{bf16['same_captions']:.1%} of the images")
    elif bf16 is not None:
        print("no native bf16 on this CPU: the bf16 comparison is not run")
    write_results("bench_decoding", torch.device(result["device"]), result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compile", action="store_true", help="compare the compiled decoder step with eager instead")
    mode.add_argument("--profile", action="store_true", help="profile batched decoding at beam 3 instead")
    mode.add_argument("--word-gates", action="store_true", help="time decoding with and without WordGates instead")
    args = parser.parse_args()
    if args.compile:
        compare_compiled()
    elif args.word_gates:
        compare_word_gates()
    elif args.profile:
        profile_batched()
    else:
        main()
