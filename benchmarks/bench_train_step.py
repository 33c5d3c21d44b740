"""End-to-end training step on CUDA: the reference model fine-tuned whole, in fp32, bf16 and fp16.

The model of ``configs/show_attend_tell_flickr8k.yaml`` (inception_v3 at 299 px, ``bahdanau`` attention,
``show_attend_tell`` decoder, RNN size 512) with every encoder layer trainable (``finetune: all``), vocabulary
5,000, batch 64 of random images already on the GPU and captions of 10 to 16 words: ``Trainer.train_step``
(forward, loss, backward, clipping, optimizer step) timed without any data loading, once per precision, with
channels-last images. Reports steps/s, captions/s and peak GPU memory. Needs CUDA (a full inception_v3 step
takes tens of seconds on a CPU); without it the benchmark says so and writes nothing.
Run: ``python -m benchmarks train_step``.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader

from benchmarks.bench_decoder_train import make_batch
from benchmarks.common import sync, write_results
from capkit import build_captioner
from capkit.engine import CrossEntropyCriterion, Trainer, build_optimizer
from capkit.types import CaptionBatch

BATCH, VOCAB, IMAGE_SIZE, WARMUP, TIMED = 64, 5000, 299, 5, 20
MODEL = {
    "encoder": {"name": "timm", "model_name": "inception_v3", "finetune": "all"},
    "attention": {"name": "bahdanau", "attn_dim": 512},
    "decoder": {"name": "show_attend_tell", "embed_dim": 512, "hidden_dim": 512, "dropout": 0.5},
}


def run(amp: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_captioner(MODEL, VOCAB)
    trainer = Trainer(model, build_optimizer(model, lr=4e-4), DataLoader([]), epochs=1, device=device, amp=amp,
                      criterion=CrossEntropyCriterion({"doubly_stochastic": 1.0}), grad_clip=5.0,
                      )
    _, captions = make_batch(BATCH, (1, 1), 1, VOCAB, device)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    batch = CaptionBatch([str(i) for i in range(BATCH)], captions=captions, images=images)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(WARMUP + TIMED):
        sync(device)
        start = time.perf_counter()
        loss = trainer.train_step(batch)
        sync(device)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"amp": amp, "step_s": step, "steps_per_s": 1 / step, "captions_per_s": BATCH / step, "last_loss": loss,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def main() -> None:
    if not torch.cuda.is_available():
        print("train_step: skipped, needs a CUDA device")
        return
    device = torch.device("cuda")
    rows = [run(amp, device) for amp in ("none", "bf16", "fp16")]
    print(f"training step, inception_v3 fine-tuned + show_attend_tell (bahdanau), batch {BATCH}, {IMAGE_SIZE} px, "
          f"vocab {VOCAB}, channels-last, {torch.cuda.get_device_name()}, median of {TIMED} after {WARMUP} warm-up")
    print(f"{'precision':<10}{'step (ms)':>11}{'captions/s':>12}{'peak GiB':>10}{'vs fp32':>9}")
    for r in rows:
        print(f"{r['amp'].replace('none', 'fp32'):<10}{r['step_s'] * 1e3:>11.1f}{r['captions_per_s']:>12.0f}"
              f"{r['peak_memory_gib']:>10.1f}{rows[0]['step_s'] / r['step_s']:>8.2f}x")
    write_results("bench_train_step", device, {"batch": BATCH, "vocab": VOCAB, "image_size": IMAGE_SIZE,
                                              "model": MODEL, "warmup": WARMUP, "timed": TIMED, "results": rows})


if __name__ == "__main__":
    main()
