"""The training step of a recipe on its real batches, fp32 against bf16 autocast (docs/RESULTS.md, "bf16 kernel
shapes").

``bench_decoder_train`` times one fixed batch, so every matrix shape recurs; real batches differ in their number of
teacher-forcing steps and of captions running at each step, and oneDNN builds a bf16 kernel for every new shape
(milliseconds each). This probe runs ``Trainer.train_step`` of the config's model (cross-entropy, cached features)
on the first ``--warmup + --steps`` batches of the training loader's seed-0 order, the same batches for every
setting, interleaved batch by batch: fp32; bf16 autocast; and bf16 autocast with the rows of the pass-wide
products left as they come (``ROW_BUCKET`` set to 1, so that ``bucket_rows`` adds no row), each from the same
initial weights.
Reports the median step of the timed batches. Needs a native-bf16 CPU and the dataset (its feature cache is
extracted on first use).

Writes ``benchmarks/results/probe_recipe_step.json``. Run:
``python -m benchmarks.probe_recipe_step configs/show_attend_tell_flickr8k_offline.yaml --data root=<flickr8k>``
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

import capkit.models.step_weights as step_weights_module
from benchmarks.common import run_script, write_results
from capkit.config import load_config
from capkit.engine import CrossEntropyCriterion, Trainer, build_optimizer
from capkit.engine.device import cpu_has_native_bf16
from capkit.engine.distributed import init_distributed
from capkit.recipes.experiment import build_train_loader_for
from capkit.recipes.train import prepare


@contextmanager
def rows_as_they_come():
    """``bucket_rows`` adding no row: every row count is a multiple of a bucket of 1."""
    saved = step_weights_module.ROW_BUCKET
    step_weights_module.ROW_BUCKET = 1
    try:
        yield
    finally:
        step_weights_module.ROW_BUCKET = saved


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    if not cpu_has_native_bf16():
        raise SystemExit("probe_recipe_step: this CPU has no native bf16; nothing to compare")
    overrides = [f"data.dataset.{kv}" for kv in args.data] + ["data.skip_missing_images=true", "data.num_workers=0"]
    cfg = OmegaConf.merge(load_config(args.config), OmegaConf.from_dotlist(overrides))
    dist = init_distributed("cpu")
    torch.manual_seed(0)
    exp = prepare(cfg, dist, run_dir=Path("runs") / "probe_recipe_step")  # nothing is written there
    loader = build_train_loader_for(cfg, exp.train_split, exp.model.encoder, exp.vocab, dist)
    batches = list(itertools.islice(loader, args.warmup + args.steps))
    settings = {"fp32": "none", "bf16": "bf16", "bf16, rows as they come": "bf16"}
    trainers = {}
    for name, amp in settings.items():
        model = copy.deepcopy(exp.model)
        trainers[name] = Trainer(
            model, build_optimizer(model, lr=cfg.train.lr), loader, epochs=1, device=dist.device, amp=amp,
            criterion=CrossEntropyCriterion(dict(cfg.train.aux_loss_weights)), grad_clip=cfg.train.grad_clip,
        )
        trainers[name].model.train()
    times: dict[str, list[float]] = {name: [] for name in settings}
    for i, batch in enumerate(batches):
        for name, trainer in trainers.items():
            with rows_as_they_come() if "as they come" in name else nullcontext():
                start = time.perf_counter()
                trainer.train_step(batch)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    rows = [{"setting": name, "step_s": statistics.median(ts), "all_step_s": ts} for name, ts in times.items()]
    fp32 = rows[0]["step_s"]
    print(f"{args.config}: median training step of {args.steps} real batches after {args.warmup}, "
          f"{torch.get_num_threads()} threads")
    for r in rows:
        print(f"{r['setting']:<26}{r['step_s']:>8.3f} s{fp32 / r['step_s']:>8.2f}x fp32's speed")
    result = {"config": args.config, "warmup": args.warmup, "steps": args.steps, "results": rows}
    write_results("probe_recipe_step", torch.device("cpu"), result)
    return result


if __name__ == "__main__":
    run_script(main)
