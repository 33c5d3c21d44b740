"""The training engine: Trainer, hooks, checkpoints, the run directory, optimizer/schedule builders, DDP helpers.

The engine never reads configs; ``capkit.recipes.train`` composes a run from one, roughly::

    run = RunDir(train.output_dir / train.run_name)
    model = build_captioner(cfg.model, len(vocab))
    loader = DataLoader(..., sampler=build_train_sampler(dataset, seed=train.seed))
    optimizer = build_optimizer(model, lr=train.lr, encoder_lr=train.encoder_lr)
    hooks = [ProgressBarHook(), DistributedDataParallelHook(),    # the latter wraps the model under torchrun
             EvalHook(lambda m: run_evaluation(m, val_loader, evaluator, ...)),
             EarlyStoppingHook(train.early_stop_metric, train.patience),
             LoggingHook(run),
             PeriodicCheckpointHook(run, every_steps=200, config=resolved, vocab=words),
             BestCheckpointHook(run, metric=train.early_stop_metric, config=resolved, vocab=words)]
    trainer = Trainer(model, optimizer, loader, epochs=train.epochs, hooks=hooks, device=dist.device, ...)
    if resume: trainer.resume(run.find_checkpoint())
    trainer.fit()
"""
from capkit.engine.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from capkit.engine.device import resolve_amp_dtype, resolve_device
from capkit.engine.distributed import (
    DistInfo,
    broadcast_object,
    build_train_sampler,
    destroy_distributed,
    init_distributed,
    is_main_process,
    mean_over_ranks,
)
from capkit.engine.hooks import (
    BestCheckpointHook,
    DistributedDataParallelHook,
    EarlyStoppingHook,
    EncoderFinetuneHook,
    EvalHook,
    LRSchedulerHook,
    PeriodicCheckpointHook,
)
from capkit.engine.loss import (
    Criterion,
    CrossEntropyCriterion,
    SelfCriticalCriterion,
    caption_loss,
    self_critical_loss,
)
from capkit.engine.monitor import LoggingHook, ProgressBarHook, Throughput
from capkit.engine.optim import build_optimizer, build_scheduler, load_optimizer_moments, set_requires_grad
from capkit.engine.replay import EpochReplay
from capkit.engine.rng import get_rng_state, seed_everything, set_rng_state
from capkit.engine.run_dir import RunDir
from capkit.engine.trainer import Hook, Trainer

__all__ = [
    "BestCheckpointHook",
    "Criterion",
    "CrossEntropyCriterion",
    "DistInfo",
    "DistributedDataParallelHook",
    "EarlyStoppingHook",
    "EncoderFinetuneHook",
    "EpochReplay",
    "EvalHook",
    "Hook",
    "LRSchedulerHook",
    "LoggingHook",
    "PeriodicCheckpointHook",
    "ProgressBarHook",
    "RunDir",
    "SelfCriticalCriterion",
    "Throughput",
    "Trainer",
    "broadcast_object",
    "build_optimizer",
    "build_scheduler",
    "build_train_sampler",
    "caption_loss",
    "destroy_distributed",
    "get_rng_state",
    "init_distributed",
    "is_main_process",
    "load_optimizer_moments",
    "mean_over_ranks",
    "load_checkpoint",
    "resolve_amp_dtype",
    "resolve_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "self_critical_loss",
    "set_rng_state",
    "set_requires_grad",
]
