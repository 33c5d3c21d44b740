"""Optimizer and learning-rate schedule builders, from typed arguments."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, ReduceLROnPlateau

__all__ = [
    "ENCODER_GROUP",
    "adamw",
    "PER_STEP_SCHEDULERS",
    "SCHEDULERS",
    "build_optimizer",
    "build_scheduler",
    "load_optimizer_moments",
    "param_group",
    "set_requires_grad",
]

ENCODER_GROUP = "encoder"  # name of the optimizer param group that holds the trainable encoder parameters
SCHEDULERS = ("plateau", "cosine", "warmup_cosine", "none")
PER_STEP_SCHEDULERS = ("warmup_cosine",)  # stepped after every optimizer step; the others after every epoch


def build_optimizer(
    model: nn.Module, *, lr: float, encoder_lr: float | None = None, weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """AdamW with two param groups: ``decoder`` (everything outside ``model.encoder``) and ``encoder``.

    The ``encoder`` group holds the encoder parameters that are trainable when this is called (what the
    encoder's ``finetune`` mode selects) and uses ``encoder_lr``; it is left out when there are none.
    ``EncoderFinetuneHook`` can keep it frozen until a given epoch.

    Args:
        model: a ``Captioner`` (any module with an ``encoder`` attribute).
        lr: learning rate of the decoder.
        encoder_lr: learning rate of the encoder group (default: ``lr``).
        weight_decay: AdamW's decoupled weight decay, for both groups.
    """
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    decoder = [p for p in model.parameters() if id(p) not in encoder_ids and p.requires_grad]
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    if not decoder:
        raise ValueError("the model has no trainable parameters outside its encoder")
    groups = [{"name": "decoder", "params": decoder, "lr": lr}]
    if encoder:
        groups.append({"name": ENCODER_GROUP, "params": encoder, "lr": lr if encoder_lr is None else encoder_lr})
    return adamw(groups, lr=lr, weight_decay=weight_decay)


def adamw(params: Iterable, *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's AdamW on ``params`` (tensors or param groups), fused into one kernel over all the parameters where
    they all live on the CPU or a CUDA device: the default (``foreach``) step reads and writes every moment tensor
    once per elementwise operation, the fused one once in all (``benchmarks/bench_decoder_train`` steps with it)."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def param_group(optimizer: Optimizer, name: str) -> dict:
    """The param group called ``name`` (see ``build_optimizer``)."""
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return group
    names = [g.get("name", f"#{i}") for i, g in enumerate(optimizer.param_groups)]
    raise KeyError(f"the optimizer has no param group {name!r}; its groups are {names}")


def build_scheduler(
    optimizer: Optimizer,
    name: str,
    *,
    epochs: int,
    factor: float = 0.8,
    patience: int = 2,
    mode: str = "max",
    steps_per_epoch: int | None = None,
    warmup_steps: int = 0,
) -> LRScheduler | ReduceLROnPlateau | None:
    """The LR schedule ``name``, stepped by ``LRSchedulerHook``.

    Args:
        name: ``plateau`` (multiply the LR by ``factor`` after ``patience`` evaluations without improvement of
            the validation metric), ``cosine`` (cosine decay to 0 over ``epochs``, stepped per epoch),
            ``warmup_cosine`` (linear warm-up from 0 over ``warmup_steps`` optimizer steps, then cosine decay to 0
            at the end of the last epoch, stepped per optimizer step: the Transformer's schedule) or ``none``.
        epochs: length of the run (cosine, warmup_cosine).
        factor, patience: ReduceLROnPlateau's decay factor and patience (in evaluations).
        mode: ``max`` when a larger validation metric is better (CIDEr, BLEU), else ``min``.
        steps_per_epoch: optimizer steps per epoch (warmup_cosine).
        warmup_steps: steps of the linear warm-up (warmup_cosine).

    Returns:
        The scheduler, or None for ``none``.
    """
    if name == "plateau":
        return ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience)
    if name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "warmup_cosine":
        if not steps_per_epoch:
            raise ValueError("the warmup_cosine schedule needs the number of steps per epoch")
        total = max(epochs * steps_per_epoch, warmup_steps + 1)

        def factor_at(step: int) -> float:  # the multiplier of each group's learning rate after ``step`` steps
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / (total - warmup_steps)))

        return LambdaLR(optimizer, factor_at)
    if name == "none":
        return None
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def load_optimizer_moments(optimizer: Optimizer, saved: Mapping[str, Any]) -> bool:
    """Continue the per-parameter state of a saved optimizer (Adam's running moment estimates) in ``optimizer``,
    keeping ``optimizer``'s own hyperparameters (learning rates, betas, ...).

    A second training stage started from a checkpoint (``train.init_from``) continues the optimizer as the
    self-critical codebases do: a fresh Adam's first updates have the full learning rate in every coordinate
    whatever the gradient's scale, which noisy gradients (policy gradients) turn into a random walk.

    Returns:
        False, changing nothing, when the saved parameter groups differ (names, sizes or tensor shapes).
    """
    current = optimizer.state_dict()
    if _group_sizes(current["param_groups"]) != _group_sizes(saved["param_groups"]):
        return False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in saved["state"].items():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                return False
    optimizer.load_state_dict({"state": saved["state"], "param_groups": current["param_groups"]})
    return True


def _group_sizes(groups: Iterable[Mapping[str, Any]]) -> list[tuple[Any, int]]:
    return [(g.get("name"), len(g["params"])) for g in groups]


def set_requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
    """Switch ``requires_grad`` of ``params``: frozen parameters get no gradient, so the optimizer skips them."""
    for p in params:
        p.requires_grad_(flag)
