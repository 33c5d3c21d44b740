"""Additive soft attention (Bahdanau et al. 2015), as used by Show, Attend and Tell (Xu et al. 2015)."""
from __future__ import annotations

from torch import Tensor, nn

from capkit.models.attention.base import Attention, AttentionMemory, additive_scores, weighted_context
from capkit.registry import ATTENTIONS

__all__ = ["BahdanauAttention"]


@ATTENTIONS.register("bahdanau")
class BahdanauAttention(Attention):
    """score(h, v_i) = w^T tanh(W_k v_i + W_q h + b); alpha = softmax over the N grid positions.

    ``W_k v`` does not depend on the decoding step, so it is computed once per image in ``precompute``.
    Supports shared memory (see ``Attention``).

    Args:
        query_dim: decoder state size (set by the builder).
        key_dim: encoder feature channels C (set by the builder).
        attn_dim: size A of the hidden layer of the score.
    """

    supports_shared_memory = True

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int = 512):
        super().__init__(query_dim, key_dim)
        self.key_proj = nn.Linear(key_dim, attn_dim)
        self.query_proj = nn.Linear(query_dim, attn_dim, bias=False)
        self.score = nn.Linear(attn_dim, 1, bias=False)

    def precompute(self, feats: Tensor, grid: tuple[int, int]) -> AttentionMemory:
        return AttentionMemory(values=feats, keys=self.key_proj(feats), grid=grid)  # keys (B, N, A)

    def forward(self, query: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor]:
        alpha = additive_scores(memory.keys, self.query_proj(query), self.score).softmax(dim=1)  # (B * K, N)
        return weighted_context(alpha, memory.values), alpha

