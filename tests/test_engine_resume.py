"""Exact resume: a run SIGKILLed mid-epoch and resumed ends with the weights of an uninterrupted run.

Run as a script (``python tests/test_engine_resume.py RUN_DIR [--kill-at STEP] [--resume]``) it trains the tiny
run below; the test runs the killed run in a subprocess and the others in-process.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import capkit
from capkit.engine import (
    BestCheckpointHook,
    CrossEntropyCriterion,
    EarlyStoppingHook,
    EncoderFinetuneHook,
    EvalHook,
    Hook,
    LoggingHook,
    LRSchedulerHook,
    PeriodicCheckpointHook,
    Trainer,
    build_optimizer,
    build_scheduler,
    build_train_sampler,
    load_checkpoint,
    seed_everything,
)
from capkit.types import BOS_ID, EOS_ID, PAD_ID, CaptionBatch
from toys import AUX, tiny_model  # on sys.path: pytest's pythonpath, or this file's folder when run as a script

SEED, EPOCHS, BATCH, N_ITEMS, EVERY_STEPS = 7, 3, 4, 24, 4  # 6 batches per epoch, 18 steps


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyCaptions(Dataset):
    """N random 32 x 32 images with random captions ``<start> w.. <end> <pad>..`` of 2..6 words."""

    def __init__(self, n: int, vocab_size: int = 20, max_words: int = 6):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.captions = torch.full((n, max_words + 2), PAD_ID)
        for i in range(n):
            k = int(torch.randint(2, max_words + 1, (1,), generator=g))
            self.captions[i, 0], self.captions[i, k + 1] = BOS_ID, EOS_ID
            self.captions[i, 1 : k + 1] = torch.randint(4, vocab_size, (k,), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        return str(i), self.images[i], self.captions[i]


def collate(items: list[tuple[str, torch.Tensor, torch.Tensor]]) -> CaptionBatch:
    ids, images, captions = zip(*items)
    return CaptionBatch(list(ids), captions=torch.stack(captions), images=torch.stack(images))


class KillAt(Hook):
    """Test only: SIGKILL this process right after global step ``step`` (before that step's checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train(run_dir: Path, kill_at: int | None = None, resume: bool = False) -> Trainer:
    """Everything the resumed state must carry: dropout, AdamW moments, grad clipping, a plateau schedule,
    early stopping, encoder fine-tuning (BN statistics) from epoch 1, a per-(seed, epoch) shuffle, a moving
    average of the weights."""
    torch.set_num_threads(1)
    seed_everything(SEED)
    model = tiny_model(finetune="last")
    data = ToyCaptions(N_ITEMS)
    loader = DataLoader(
        data, batch_size=BATCH, sampler=build_train_sampler(data, seed=SEED), collate_fn=collate, num_workers=0
    )
    optimizer = build_optimizer(model, lr=3e-3, encoder_lr=1e-3, weight_decay=0.01)
    val = collate([data[i] for i in range(8)])

    def evaluate(m: capkit.Captioner) -> dict[str, float]:
        return {"logp": m.log_prob(val.captions, images=val.images).mean().item()}

    hooks: list[Hook] = [
        EncoderFinetuneHook(from_epoch=1),
        EvalHook(evaluate, every_epochs=1),
        # mode="min" on a rising log-prob: the LR decays after every evaluation, so the schedule state matters
        LRSchedulerHook(build_scheduler(optimizer, "plateau", epochs=EPOCHS, factor=0.5, patience=0, mode="min"), "logp"),
        EarlyStoppingHook("logp", patience=10),
        LoggingHook(run_dir, every_steps=1),
    ]
    if kill_at is not None:
        hooks.append(KillAt(kill_at))
    contents = dict(config={"seed": SEED}, vocab=["w"])
    hooks += [PeriodicCheckpointHook(run_dir, every_steps=EVERY_STEPS, **contents),
              BestCheckpointHook(run_dir, metric="logp", **contents)]
    trainer = Trainer(
        model, optimizer, loader, epochs=EPOCHS, hooks=hooks, device="cpu", grad_clip=1.0,
        criterion=CrossEntropyCriterion(AUX, label_smoothing=0.1), ema_decay=0.9,
    )
    if resume:
        trainer.resume(run_dir / "checkpoints" / "last")
    trainer.fit()
    return trainer


def _run_killed(run_dir: Path, kill_at: int) -> None:
    proc = subprocess.run(
        [sys.executable, __file__, str(run_dir), "--kill-at", str(kill_at)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return train(run_dir), run_dir


@pytest.mark.parametrize(
    "kill_at, saved_position",
    [(10, (1, 2, 8)), (7, (1, 0, 6))],  # (epoch, batch_in_epoch, global_step) of the last checkpoint
    ids=["mid_epoch_step_checkpoint", "epoch_end_checkpoint"],
)
def test_sigkilled_run_resumes_exactly(tmp_path, reference, kill_at, saved_position):
    ref, ref_dir = reference
    assert (ref.epoch, ref.global_step) == (EPOCHS, EPOCHS * N_ITEMS // BATCH)
    run_dir = tmp_path / "run"
    _run_killed(run_dir, kill_at)
    saved = load_checkpoint(run_dir / "checkpoints" / "last")
    assert (saved["epoch"], saved["batch_in_epoch"], saved["global_step"]) == saved_position

    trainer = train(run_dir, resume=True)

    assert (trainer.epoch, trainer.global_step) == (ref.epoch, ref.global_step)
    for weights in ("module", "eval_module"):  # the trained weights and their moving average
        ref_state, state = getattr(ref, weights).state_dict(), getattr(trainer, weights).state_dict()
        assert ref_state.keys() == state.keys()
        worst = max((ref_state[k].double() - state[k].double()).abs().max().item() for k in ref_state)
        assert worst <= 1e-6, f"resumed {weights} weights differ from the uninterrupted run by {worst}"
    # the plateau schedule decayed both groups' LRs identically (it did decay: the run is not trivial)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in ref.optimizer.param_groups]
    assert trainer.optimizer.param_groups[0]["lr"] < 3e-3
    # the metrics log holds every step once, with the uninterrupted run's values
    def logged(path):  # every logged value but the wall-clock throughput
        return [{k: v for k, v in json.loads(x).items() if k != "captions_s"} for x in path.read_text().splitlines()]

    assert logged(run_dir / "metrics.jsonl") == [pytest.approx(x, rel=1e-6) for x in logged(ref_dir / "metrics.jsonl")]


class NoisyToyCaptions(ToyCaptions):
    """Random augmentation drawn in the loader's worker processes (seeded from the loader's base seed)."""

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        image_id, image, caption = super().__getitem__(i)
        return image_id, image + 0.5 * torch.randn_like(image), caption


def _train_with_workers(run_dir: Path, generator: bool, max_steps: int | None = None, resume: bool = False) -> Trainer:
    seed_everything(SEED)
    model = tiny_model()
    data = NoisyToyCaptions(16)
    loader = DataLoader(
        data, batch_size=BATCH, sampler=build_train_sampler(data, seed=SEED), collate_fn=collate, num_workers=2,
        generator=torch.Generator().manual_seed(SEED) if generator else None,  # else: from the global RNG
    )
    trainer = Trainer(
        model, build_optimizer(model, lr=3e-3), loader, epochs=2, hooks=[PeriodicCheckpointHook(run_dir)], device="cpu",
        criterion=CrossEntropyCriterion(AUX), max_steps=max_steps,
    )
    if resume:
        trainer.resume(run_dir / "checkpoints" / "last")
    trainer.fit()
    return trainer


@pytest.mark.parametrize("generator", [False, True], ids=["global_rng", "loader_generator"])
def test_resume_replays_worker_augmentation(tmp_path, generator):
    """A run stopped mid-epoch (max_steps, which saves ``last``) and resumed sees the same augmented batches."""
    ref = _train_with_workers(tmp_path / "ref", generator)
    cut = _train_with_workers(tmp_path / "cut", generator, max_steps=6)  # epoch 1, 2 of its 4 batches done
    assert (cut.epoch, cut.batch_in_epoch) == (1, 2)
    resumed = _train_with_workers(tmp_path / "cut", generator, resume=True)
    assert resumed.global_step == ref.global_step == 8
    for key, value in ref.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key


def test_checkpoint_position_and_content(reference):
    ref, ref_dir = reference
    last = load_checkpoint(ref_dir / "checkpoints" / "last")
    assert (last["epoch"], last["batch_in_epoch"], last["global_step"]) == (EPOCHS, 0, 18)
    assert last["config"] == {"seed": SEED} and last["vocab"] == ["w"]
    assert set(last["hooks"]) == {
        "EncoderFinetuneHook", "EvalHook", "LRSchedulerHook", "EarlyStoppingHook", "LoggingHook", "PeriodicCheckpointHook",
        "BestCheckpointHook",
    }
    for key, value in ref.eval_module.state_dict().items():  # what captions: the moving average
        assert torch.equal(last["model"][key], value), key
    for key, value in ref.module.state_dict().items():
        assert torch.equal(last["training_model"][key], value), key
    best = load_checkpoint(ref_dir / "checkpoints" / "best")
    assert best["hooks"]["BestCheckpointHook"]["best"] == best["hooks"]["EarlyStoppingHook"]["best"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    train(args.run_dir, args.kill_at, args.resume)
