"""Optimizer and learning-rate schedule builders, from typed arguments."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, ReduceLROnPlateau

__all__ = [
    "ENCODER_GROUP",
    "SCHEDULERS",
    "build_optimizer",
    "build_scheduler",
    "param_group",
    "set_requires_grad",
]

ENCODER_GROUP = "encoder"  # name of the optimizer param group that holds the trainable encoder parameters
SCHEDULERS = ("plateau", "cosine", "none")


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
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


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
) -> LRScheduler | ReduceLROnPlateau | None:
    """The LR schedule ``name``, stepped by ``LRSchedulerHook``.

    Args:
        name: ``plateau`` (multiply the LR by ``factor`` after ``patience`` evaluations without improvement of
            the validation metric), ``cosine`` (cosine decay to 0 over ``epochs``, stepped per epoch) or ``none``.
        epochs: length of the run (cosine).
        factor, patience: ReduceLROnPlateau's decay factor and patience (in evaluations).
        mode: ``max`` when a larger validation metric is better (CIDEr, BLEU), else ``min``.

    Returns:
        The scheduler, or None for ``none``.
    """
    if name == "plateau":
        return ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience)
    if name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "none":
        return None
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def set_requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
    """Switch ``requires_grad`` of ``params``: frozen parameters get no gradient, so the optimizer skips them."""
    for p in params:
        p.requires_grad_(flag)
