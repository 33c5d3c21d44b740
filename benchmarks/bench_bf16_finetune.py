"""bf16 training of the offline Flickr8k recipe with its encoder's last stages trained: fp32, torch's bf16 autocast,
and bf16 with the large depthwise convolutions left in fp32 (what ``Trainer`` does on the CPU,
``keep_depthwise_fp32``).

The model and batch of ``bench_finetune_step`` (Lite2 at 260 px + ``bahdanau`` + ``show_attend_tell`` of 512,
vocabulary 2,538, batch 64 from the cached trunk), with the last stage or the last two stages trained.
``Trainer.train_step`` (forward, loss, backward, clipping, optimizer step), median of 8 steps after 2, for:

- ``fp32``: no autocast;
- ``bf16, every convolution``: torch's CPU autocast policy as it comes (every convolution in bf16), the baseline
  for bf16;
- ``bf16, 5 x 5 depthwise in fp32``: the same with the depthwise convolutions larger than 3 x 3 computed in fp32
  (the last stage's depthwise convolution is 3 x 3, blocks.5's are 5 x 5).

A second table times each depthwise convolution shape of the two stages alone (forward and backward, 64 images,
channels-last as in the model), in fp32 and in bf16. Needs a CPU with native bf16 (AVX-512 BF16 or AMX). Run:
``python -m benchmarks bf16_finetune``.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
from timm.layers import create_conv2d
from torch.utils.data import DataLoader

from benchmarks.bench_decoder_train import make_batch
from benchmarks.bench_finetune_step import BATCH, IMAGE_SIZE, MODEL, VOCAB
from benchmarks.common import median_time, write_results
from capkit import build_captioner
from capkit.engine import CrossEntropyCriterion, Trainer, build_optimizer
from capkit.engine.cpu_amp import DepthwiseFp32OnCpu
from capkit.engine.device import cpu_has_native_bf16
from capkit.types import CaptionBatch

WARMUP, TIMED = 2, 8
SETTINGS = (("fp32", "none", True), ("bf16, every convolution", "bf16", False),
            ("bf16, 5 x 5 depthwise in fp32", "bf16", True))
# (channels, kernel, stride, input side) of the depthwise convolutions in blocks.5 (the first block, then the
# other four) and blocks.6 of tf_efficientnet_lite2 at 260 px
DEPTHWISE = ((720, 5, 2, 17), (1248, 5, 1, 9), (1248, 3, 1, 9))


def step_rows() -> list[dict]:
    torch.manual_seed(0)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=torch.channels_last)
    _, captions = make_batch(BATCH, (1, 1), 1, VOCAB, torch.device("cpu"))
    rows = []
    for stages in (1, 2):
        fp32_step = None
        for name, amp, depthwise_fp32 in SETTINGS:
            torch.manual_seed(0)
            model = build_captioner({**MODEL, "encoder": {**MODEL["encoder"], "finetune_stages": stages}}, VOCAB)
            with torch.no_grad():
                batch = CaptionBatch([str(i) for i in range(BATCH)], captions=captions,
                                     features=model.encoder.forward_frozen(images))
            # the baseline: the Trainer leaves torch's autocast policy as it comes
            as_it_comes = mock.patch("capkit.engine.trainer.keep_depthwise_fp32")
            with contextlib.nullcontext() if depthwise_fp32 else as_it_comes:
                trainer = Trainer(model, build_optimizer(model, lr=4e-4, encoder_lr=1e-4), DataLoader([]), epochs=1,
                                  device="cpu", amp=amp, grad_clip=5.0,
                                  criterion=CrossEntropyCriterion({"doubly_stochastic": 1.0}))
            swapped = sum(isinstance(m, DepthwiseFp32OnCpu) for m in model.modules())
            assert (swapped > 0) == (amp == "bf16" and depthwise_fp32), (name, swapped)
            step = median_time(lambda: trainer.train_step(batch), WARMUP, TIMED)
            fp32_step = fp32_step or step
            rows.append({"finetune_stages": stages, "setting": name, "step_s": step, "vs_fp32": fp32_step / step})
    for row in rows:  # against torch's bf16 policy of the same stages
        baseline = next(r for r in rows if r["finetune_stages"] == row["finetune_stages"]
                        and r["setting"] == "bf16, every convolution")
        row["vs_bf16_every_convolution"] = baseline["step_s"] / row["step_s"]
    return rows


def depthwise_rows() -> list[dict]:
    rows = []
    for channels, kernel, stride, side in DEPTHWISE:
        torch.manual_seed(0)
        # as the model builds it: tf_ padding ("same", Conv2dSame where the stride makes it depend on the input)
        conv = create_conv2d(channels, channels, kernel, stride=stride, padding="same", depthwise=True)
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(BATCH, channels, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
        row = {"channels": channels, "kernel": kernel, "stride": stride, "input": [side, side]}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            def forward_backward():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = conv(x)
                y.backward(torch.ones_like(y))
            row[f"{name}_ms"] = 1e3 * median_time(forward_backward, WARMUP, TIMED)
        row["bf16_vs_fp32"] = row["fp32_ms"] / row["bf16_ms"]
        rows.append(row)
    return rows


def main() -> None:
    if not cpu_has_native_bf16():
        print("bench_bf16_finetune: this CPU has no native bf16 (AVX-512 BF16 or AMX); nothing to compare")
        return
    steps, convs = step_rows(), depthwise_rows()
    print(f"training step, Lite2 + show_attend_tell (bahdanau), batch {BATCH} from the cached trunk, vocab {VOCAB}, "
          f"{torch.get_num_threads()} threads, median of {TIMED} after {WARMUP} warm-up")
    print(f"{'stages trained':<16}{'setting':<32}{'step (s)':>9}{'vs fp32':>9}{'vs bf16 every conv':>20}")
    for r in steps:
        print(f"{r['finetune_stages']:<16}{r['setting']:<32}{r['step_s']:>9.3f}{r['vs_fp32']:>8.2f}x"
              f"{r['vs_bf16_every_convolution']:>19.2f}x")
    print(f"depthwise convolution alone, forward and backward, {BATCH} images, channels-last")
    print(f"{'channels':>9}{'kernel':>7}{'stride':>7}{'input':>8}{'fp32 (ms)':>11}{'bf16 (ms)':>11}"
          f"{'bf16 vs fp32':>14}")
    for r in convs:
        print(f"{r['channels']:>9}{r['kernel']:>7}{r['stride']:>7}{r['input'][0]:>5} px{r['fp32_ms']:>11.1f}"
              f"{r['bf16_ms']:>11.1f}{r['bf16_vs_fp32']:>13.2f}x")
    write_results("bench_bf16_finetune", torch.device("cpu"), {"batch": BATCH, "vocab": VOCAB, "model": MODEL,
                                                               "warmup": WARMUP, "timed": TIMED, "steps": steps,
                                                               "depthwise": convs})


if __name__ == "__main__":
    main()
