"""Adaptive attention with a visual sentinel (Lu, Xiong, Parikh and Socher 2017, "Knowing When to Look").

In the paper the decoder may attend to a *visual sentinel* s_t instead of the image: words such as "a" or
"of" need no visual evidence, and the sentinel lets the model say so. With region scores
z_i = w^T tanh(W_v v_i + W_g h_t) and the sentinel's score z_s = w^T tanh(W_s s_t + W_g h_t), one softmax over
the N + 1 candidates gives the region weights and the sentinel share beta_t (its last entry), and the adaptive
context is c^_t = beta_t s_t + (1 - beta_t) c_t, where c_t = sum_i alpha_ti v_i.

Adaptation to capkit's attention interface (read this before comparing numbers with the paper):

- **Where the sentinel comes from.** The paper builds s_t inside its LSTM, from the memory cell and an extra
  gate: g_t = sigmoid(W_x x_t + W_h h_{t-1}), s_t = g_t * tanh(m_t). A capkit attention sees only the decoder's
  query (``forward(query, memory)``), not the LSTM's cell or input, so here the sentinel is derived from the
  query: ``sentinel="gated"`` (default) s = sigmoid(W_gate q) * tanh(W_m q), the same gate-times-tanh form with
  the memory cell replaced by a learned projection of the query; ``sentinel="tanh"`` s = tanh(W_m q). Any
  decoder works unchanged, at the price of a sentinel that carries no information the query does not
  already hold (the paper's sentinel can also read the cell state and the current input word).
- **Which query.** The paper attends with the new hidden state h_t (attention after the LSTM step). capkit's
  ``luong`` decoder does the same; ``show_attend_tell`` queries with h_{t-1}, so there the sentinel and the
  scores come from the previous state (as in Xu et al.'s decoder the attention runs before the LSTM step).
- **Space.** The paper projects the image features to the LSTM size d and keeps the sentinel there. capkit's
  context lives in the feature space (C = ``key_dim``, which decoders feed to their LSTM or output layer), so
  the sentinel is mapped into that space (W_m, W_gate: query_dim -> key_dim). Sentinel values lie in (-1, 1);
  features of very different magnitude (un-normalised CNN activations) can be mapped first with the
  decoder's ``feature_dim`` option (Linear + ReLU).
- **Output.** ``forward`` returns the adaptive context c^_t and weights ``alpha (B, N)`` over the image
  regions only, renormalised to sum to 1 (the region part of the N + 1 softmax divided by 1 - beta, computed
  as a softmax over the N region scores, which is the same thing and stays exact when beta -> 1), so beam
  search, the doubly stochastic regulariser and the visualiser work as for any attention. The sentinel share
  beta comes from ``forward_with_sentinel``; ``capkit_adaptive.visualize.sentinel_shares`` collects it per word.
- **Output layer.** The paper predicts from c^_t + h_t; capkit's decoders keep their own output layers
  (Show, Attend and Tell's deep output, Luong's W_c [c; h]) and read c^_t where they read the context.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from capkit.models.attention.base import Attention, AttentionMemory, weighted_context

__all__ = ["AdaptiveAttention", "SENTINELS"]

SENTINELS = ("gated", "tanh")


class AdaptiveAttention(Attention):
    """Additive attention over N grid positions plus a visual sentinel derived from the query.

    Registered (entry point ``capkit.attentions``) as ``adaptive``. In a config::

        attention: {name: adaptive, attn_dim: 256, sentinel: gated}

    Args:
        query_dim: decoder state size (set by the builder through the decoder).
        key_dim: feature channels C (set by the builder through the decoder); the sentinel has this size.
        attn_dim: size A of the hidden layer of the score (shared by the regions and the sentinel).
        sentinel: ``gated`` (s = sigmoid(W_gate q) * tanh(W_m q), the paper's form) or ``tanh``
            (s = tanh(W_m q)).
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int = 512, sentinel: str = "gated"):
        super().__init__(query_dim, key_dim)
        if sentinel not in SENTINELS:
            raise ValueError(f"unknown sentinel {sentinel!r} for attention 'adaptive'; choose one of {', '.join(SENTINELS)}")
        self.sentinel_kind = sentinel
        self.sentinel_value = nn.Linear(query_dim, key_dim)  # W_m: stands in for the paper's memory cell
        self.sentinel_gate = nn.Linear(query_dim, key_dim) if sentinel == "gated" else None  # the paper's g_t
        self.key_proj = nn.Linear(key_dim, attn_dim)  # W_v
        self.sentinel_proj = nn.Linear(key_dim, attn_dim)  # W_s
        self.query_proj = nn.Linear(query_dim, attn_dim, bias=False)  # W_g
        self.score = nn.Linear(attn_dim, 1, bias=False)  # w_h, shared by regions and sentinel

    def precompute(self, feats: Tensor, grid: tuple[int, int]) -> AttentionMemory:
        return AttentionMemory(values=feats, keys=self.key_proj(feats), grid=grid)  # keys (B, N, A)

    def sentinel(self, query: Tensor) -> Tensor:
        """query (B, Dq) -> the visual sentinel s (B, C), in the feature space."""
        s = self.sentinel_value(query).tanh()
        if self.sentinel_gate is not None:
            s = torch.sigmoid(self.sentinel_gate(query)) * s
        return s

    def forward_with_sentinel(self, query: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor, Tensor]:
        """query (B, Dq) -> context (B, C), alpha (B, N) over the regions (sums to 1), beta (B,) in [0, 1].

        beta is the sentinel's share of the N + 1 softmax; context = beta * s + (1 - beta) * sum_i alpha_i v_i.
        A pure function of its inputs (nothing is stored on the module), so it is safe under beam search.
        """
        q = self.query_proj(query)  # (B, A)
        region_scores = self.score((memory.keys + q.unsqueeze(1)).tanh()).squeeze(2)  # (B, N)
        s = self.sentinel(query)  # (B, C)
        sentinel_score = self.score((self.sentinel_proj(s) + q).tanh()).squeeze(1)  # (B,)
        alpha = region_scores.softmax(dim=1)  # == region part of the (N+1)-softmax / (1 - beta)
        # beta = exp(z_s) / (exp(z_s) + sum_i exp(z_i)) = sigmoid(z_s - logsumexp(z)), without overflow
        beta = torch.sigmoid(sentinel_score - region_scores.logsumexp(dim=1))
        b = beta.unsqueeze(1)
        context = b * s + (1 - b) * weighted_context(alpha, memory.values)  # (B, C)
        return context, alpha, beta

    def forward(self, query: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor]:
        context, alpha, _ = self.forward_with_sentinel(query, memory)
        return context, alpha

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, sentinel={self.sentinel_kind!r}"
