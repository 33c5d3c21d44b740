"""The no-attention baseline: every grid position gets the same weight (mean pooling)."""
from __future__ import annotations

import torch
from torch import Tensor

from capkit.models.attention.base import Attention, AttentionMemory, beam_groups
from capkit.registry import ATTENTIONS

__all__ = ["UniformAttention"]


@ATTENTIONS.register("none")
class UniformAttention(Attention):
    """alpha = 1/N everywhere, so the context is the mean feature at every step. Has no parameters."""

    supports_shared_memory = True

    def forward(self, query: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor]:
        n = memory.values.shape[1]
        alpha = torch.full((query.shape[0], n), 1.0 / n, dtype=memory.values.dtype, device=memory.values.device)
        return memory.values.mean(dim=1).repeat_interleave(beam_groups(query, memory), dim=0), alpha
