"""DistributedDataParallel on CPU: torchrun starts 2 gloo processes that train the same tiny run.

Run as a script under torchrun (``torchrun --nproc_per_node 2 tests/test_engine_distributed.py RUN_DIR``), each
rank trains and writes what it saw to RUN_DIR; the test checks the ranks agree.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

import capkit
from capkit.engine import (
    CrossEntropyCriterion,
    DistributedDataParallelHook,
    EncoderFinetuneHook,
    EvalHook,
    Hook,
    LoggingHook,
    PeriodicCheckpointHook,
    Trainer,
    build_optimizer,
    build_train_sampler,
    destroy_distributed,
    init_distributed,
    load_checkpoint,
    seed_everything,
)
from capkit.types import BOS_ID, EOS_ID, CaptionBatch

N_ITEMS, BATCH, EPOCHS = 16, 2, 2  # per rank: 8 items, 4 steps per epoch


class ToyImages(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.captions = torch.randint(4, 20, (n, 5), generator=g)
        self.captions[:, 0], self.captions[:, -1] = BOS_ID, EOS_ID
        self.seen: list[str] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        self.seen.append(str(i))
        return str(i), self.images[i], self.captions[i]


def collate(items) -> CaptionBatch:
    ids, images, captions = zip(*items)
    return CaptionBatch(list(ids), captions=torch.stack(captions), images=torch.stack(images))


class RecordEval(Hook):
    def __init__(self):
        self.metrics: list[dict[str, float]] = []

    def after_eval(self, trainer, metrics):
        self.metrics.append(metrics)


def main(run_dir: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    seed_everything(0)
    model = capkit.build_captioner(
        {
            "encoder": {"name": "timm", "model_name": "test_efficientnet", "finetune": "last"},
            "attention": {"name": "bahdanau", "attn_dim": 16},
            "decoder": {"name": "show_attend_tell", "embed_dim": 16, "hidden_dim": 32},
        },
        vocab_size=20,
    )
    data = ToyImages(N_ITEMS)
    loader = DataLoader(data, batch_size=BATCH, sampler=build_train_sampler(data, seed=0), collate_fn=collate)
    evaluated_on: list[int] = []

    def evaluate(m):
        evaluated_on.append(info.rank)
        return {"score": 0.5}

    recorder = RecordEval()
    hooks = [
        EncoderFinetuneHook(from_epoch=1),  # changes the trainable set: DDP is rebuilt for epoch 1
        DistributedDataParallelHook(),
        EvalHook(evaluate),
        recorder,
        LoggingHook(run_dir, every_steps=1),
        PeriodicCheckpointHook(run_dir, every_steps=2),
    ]
    trainer = Trainer(
        model, build_optimizer(model, lr=1e-2, encoder_lr=1e-2), loader, epochs=EPOCHS, hooks=hooks,
        device=info.device, criterion=CrossEntropyCriterion({"doubly_stochastic": 1.0}),
    )
    trainer.fit()
    # parameters only: DDP copies rank 0's buffers (batch-norm statistics) to the others at the start of each
    # forward, so after the last step each rank still holds the statistics of its own last batch
    params = {k: v.detach().contiguous() for k, v in trainer.module.named_parameters()}
    save_file(params, run_dir / f"rank{info.rank}.safetensors")
    report = {"world": info.world_size, "steps": trainer.global_step, "seen": data.seen,
              "evaluated_on": evaluated_on, "metrics": recorder.metrics}
    (run_dir / f"rank{info.rank}.json").write_text(json.dumps(report))
    destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_train_identical_weights(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == EPOCHS * N_ITEMS // 2 // BATCH
    for epoch in range(EPOCHS):  # each epoch, the ranks read disjoint halves of the data
        half = N_ITEMS // 2
        seen0, seen1 = r0["seen"][epoch * half : (epoch + 1) * half], r1["seen"][epoch * half : (epoch + 1) * half]
        assert sorted(seen0 + seen1, key=int) == [str(i) for i in range(N_ITEMS)]
    assert r0["seen"][: N_ITEMS // 2] != r0["seen"][N_ITEMS // 2 :]  # reshuffled per epoch
    # rank 0 alone evaluates; every rank receives its metrics
    assert r0["evaluated_on"] == [0, 0] and r1["evaluated_on"] == []
    assert r0["metrics"] == r1["metrics"] == [{"score": 0.5}, {"score": 0.5}]
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys() and any(k.startswith("encoder.") for k in w0)
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    # rank 0 alone writes logs and checkpoints; the checkpoint holds the final weights
    last = load_checkpoint(tmp_path / "checkpoints" / "last")
    assert last["global_step"] == r0["steps"] and all(torch.equal(last["model"][k], w0[k]) for k in w0)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == r0["steps"] + EPOCHS
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last"]


if __name__ == "__main__":
    main(Path(sys.argv[1]))
