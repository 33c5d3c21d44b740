"""The no-attention baseline: every grid position gets the same weight (mean pooling)."""
from __future__ import annotations

import torch
from torch import Tensor

from capkit.models.attention.base import Attention, AttentionMemory
from capkit.registry import ATTENTIONS

__all__ = ["UniformAttention"]


@ATTENTIONS.register("none")
class UniformAttention(Attention):
    """alpha = 1/N everywhere, so the context is the mean feature at every step. Has no parameters."""

    def forward(self, query: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor]:
        b, n, _ = memory.values.shape
        alpha = torch.full((b, n), 1.0 / n, dtype=memory.values.dtype, device=memory.values.device)
        return memory.values.mean(dim=1), alpha
