"""What self-critical training sees, from a cross-entropy checkpoint: the reward of its drawn captions under each
sampling setting, and how far one Adam step moves each weight (docs/RESULTS.md, "Self-critical training").

On ``--images`` training images (the first per-image batches of 64 of the training loader's seed-0 order), from
the checkpoint's weights:

- **rewards**: the mean CIDEr-D reward (the training corpus's document frequencies, ``<end>`` counted, as
  ``train.objective=scst`` rewards) of the greedy caption without dropout, and of ``train.scst_samples``
  drawn captions with dropout on (as training draws them) or off, at temperatures 1.0, 0.7 and 0.5, and of
  the ``train.scst_samples`` best captions of a beam search as wide (``train.scst_candidates=beam``); with the
  share of distinct drawn captions per image, and the mean spread (standard deviation) of the rewards of one
  image's samples, which is what the mean-of-the-others baseline leaves to learn from;
- **step size**: the root mean square of the self-critical gradient (mean baseline, one batch) against that
  of the cross-entropy gradient, and against the square root of Adam's second moment carried over from the
  checkpoint: the ratio is the size of an Adam step from the carried moments, in learning rates, before
  clipping (a fresh Adam's first steps have ratio 1).

Writes ``benchmarks/results/probe_scst.json``. Run:
``python -m benchmarks.probe_scst runs/<cross-entropy run>/checkpoints/best --data root=<flickr8k>``
"""
from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.common import run_script, write_results
from capkit.config import load_config
from capkit.engine import CrossEntropyCriterion, SelfCriticalCriterion, build_optimizer, load_checkpoint
from capkit.engine.distributed import init_distributed
from capkit.engine.optim import load_optimizer_moments
from capkit.recipes.experiment import build_train_loader_for
from capkit.recipes.train import build_criterion, prepare
from capkit.types import EOS_ID, PAD_ID

SETTINGS = [  # (dropout on, temperature)
    (True, 1.0), (False, 1.0), (True, 0.7), (False, 0.7), (False, 0.5),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    state = load_checkpoint(args.checkpoint)
    cfg = OmegaConf.merge(load_config(), state["config"])
    overrides = [f"data.dataset.{kv}" for kv in args.data] + [
        "data.skip_missing_images=true", "data.num_workers=0", "train.objective=scst",
        f"train.init_from={args.checkpoint}",
    ]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    dist = init_distributed("cpu")
    exp = prepare(cfg, dist, run_dir=Path("runs") / "probe_scst")  # nothing is written there
    model, vocab = exp.model, exp.vocab
    scst = build_criterion(cfg, exp.train_split.records, vocab)  # the reward's corpus: every training image
    assert isinstance(scst, SelfCriticalCriterion)
    loader = build_train_loader_for(cfg, exp.train_split, model.encoder, vocab, dist)
    batches = list(itertools.islice(loader, -(-args.images // cfg.train.batch_size)))

    def words(rows):
        return [[t for t in row if t not in (EOS_ID, PAD_ID)] for row in rows]

    results: dict = {"checkpoint": args.checkpoint, "images": sum(len(b.image_ids) for b in batches)}
    with torch.no_grad():
        model.eval()
        greedy = [r for b in batches for r in scst.reward(
            b.image_ids, words(model.generate(features=b.features, beam_size=1, max_len=scst.max_len).tokens))]
        results["greedy_reward"] = statistics.mean(greedy)
        for dropout, temperature in SETTINGS:
            model.train(dropout)
            rewards, spreads, distinct = [], [], []
            for b in batches:
                drawn = model(features=b.features, num_samples=scst.num_samples, max_len=scst.max_len,
                              temperature=temperature)
                r = scst.reward([i for i in b.image_ids for _ in range(scst.num_samples)], drawn.words())
                rewards += r
                for k in range(0, len(r), scst.num_samples):
                    spreads.append(statistics.pstdev(r[k : k + scst.num_samples]))
                    distinct.append(len({tuple(w) for w in drawn.words()[k : k + scst.num_samples]}))
            name = f"samples_dropout_{'on' if dropout else 'off'}_t{temperature}"
            results[name] = _summary(rewards, spreads, distinct)
        model.eval()
        rewards, spreads, distinct = [], [], []
        for b in batches:
            hypotheses = model.generate(features=b.features, beam_size=scst.num_samples, n_best=scst.num_samples,
                                        max_len=scst.max_len).hypotheses
            for image_id, hyps in zip(b.image_ids, hypotheses):
                r = scst.reward([image_id] * len(hyps), [h.tokens for h in hyps])
                rewards += r
                spreads.append(statistics.pstdev(r))
                distinct.append(len({tuple(h.tokens) for h in hyps}))
        results["beam_candidates"] = _summary(rewards, spreads, distinct)
    model.train()
    optimizer = build_optimizer(model, lr=1.0)
    load_optimizer_moments(optimizer, exp.initial["optimizer"])
    second_moment = {p: s["exp_avg_sq"] for p, s in optimizer.state.items() if "exp_avg_sq" in s}
    for name, criterion, batch in [
        ("scst", scst, batches[0]),
        ("xent", CrossEntropyCriterion(dict(cfg.train.aux_loss_weights)), _caption_batch(cfg, exp, model, dist)),
    ]:
        model.zero_grad()
        loss, _ = criterion(model, batch)
        loss.backward()
        grads = [p.grad for p in second_moment if p.grad is not None]
        rms = torch.cat([g.flatten() for g in grads]).pow(2).mean().sqrt().item()
        ratio = torch.cat([(p.grad.abs() / (v.sqrt() + 1e-8)).flatten() for p, v in second_moment.items()
                           if p.grad is not None])
        results[f"{name}_gradient"] = {"rms": rms, "median_step_in_lr": ratio.median().item(),
                                       "mean_step_in_lr": ratio.mean().item()}
    for key, value in results.items():
        print(f"{key}: {value}")
    write_results("probe_scst", torch.device("cpu"), results)
    return results


def _summary(rewards: list[float], spreads: list[float], distinct: list[int]) -> dict[str, float]:
    return {"reward": statistics.mean(rewards), "spread": statistics.mean(spreads),
            "distinct_per_image": statistics.mean(distinct)}


def _caption_batch(cfg, exp, model, dist):
    """One cross-entropy batch (64 captions) of the same images."""
    xent = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["train.objective=xent"]))
    return next(iter(build_train_loader_for(xent, exp.train_split, model.encoder, exp.vocab, dist)))


if __name__ == "__main__":
    run_script(main)
