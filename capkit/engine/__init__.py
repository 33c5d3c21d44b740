"""The training engine: Trainer, hooks, checkpoints, optimizer/schedule builders, distributed helpers.

A run is composed by the caller (``tools/train.py``); the engine never reads configs::

    dist = init_distributed(train.device)          # torchrun env, or a single process
    seed_everything(train.seed)
    model = build_captioner(cfg.model, len(vocab))  # encoder finetune: none | last | all
    loader = DataLoader(..., sampler=build_train_sampler(dataset, seed=train.seed))
    optimizer = build_optimizer(model, lr=train.lr, encoder_lr=train.encoder_lr, weight_decay=train.weight_decay)
    scheduler = build_scheduler(optimizer, train.scheduler, epochs=train.epochs, factor=train.lr_decay,
                                patience=train.lr_patience, mode="max")
    hooks = [EncoderFinetuneHook(train.finetune_encoder_from_epoch),   # only when set
             EvalHook(lambda m: run_evaluation(m, val_loader, evaluator, ...), every_epochs=ev.every_epochs),
             LRSchedulerHook(scheduler, metric=train.early_stop_metric),  # only when a scheduler is built
             EarlyStoppingHook(train.early_stop_metric, train.patience),
             LoggingHook(run_dir),
             CheckpointHook(run_dir, metric=train.early_stop_metric, every_steps=500, config=resolved, vocab=words)]
    trainer = Trainer(model, optimizer, loader, epochs=train.epochs, hooks=hooks, device=dist.device, ...)
    if resume: trainer.resume(run_dir / "checkpoints" / "last")
    trainer.fit()
    destroy_distributed()
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
)
from capkit.engine.hooks import (
    CheckpointHook,
    EarlyStoppingHook,
    EncoderFinetuneHook,
    EvalHook,
    Hook,
    LoggingHook,
    LRSchedulerHook,
)
from capkit.engine.loss import (
    Criterion,
    CrossEntropyCriterion,
    SelfCriticalCriterion,
    caption_loss,
    self_critical_loss,
)
from capkit.engine.optim import build_optimizer, build_scheduler, load_optimizer_moments, set_requires_grad
from capkit.engine.rng import get_rng_state, seed_everything, set_rng_state
from capkit.engine.trainer import Trainer

__all__ = [
    "CheckpointHook",
    "Criterion",
    "CrossEntropyCriterion",
    "DistInfo",
    "EarlyStoppingHook",
    "EncoderFinetuneHook",
    "EvalHook",
    "Hook",
    "LRSchedulerHook",
    "LoggingHook",
    "SelfCriticalCriterion",
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
