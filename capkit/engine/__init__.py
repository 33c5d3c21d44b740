"""The training engine: Trainer, hooks, checkpoints, optimizer/schedule builders, distributed helpers."""
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
from capkit.engine.loss import caption_loss
from capkit.engine.optim import build_optimizer, build_scheduler, set_requires_grad
from capkit.engine.rng import get_rng_state, seed_everything, set_rng_state
from capkit.engine.trainer import Trainer

__all__ = [
    "CheckpointHook",
    "DistInfo",
    "EarlyStoppingHook",
    "EncoderFinetuneHook",
    "EvalHook",
    "Hook",
    "LRSchedulerHook",
    "LoggingHook",
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
    "load_checkpoint",
    "resolve_amp_dtype",
    "resolve_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "set_requires_grad",
]
