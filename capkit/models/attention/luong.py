"""Luong et al. 2015 ("Effective Approaches to Attention-based NMT"): global and local-p attention.

The local variant is made two-dimensional for an image grid: the decoder state predicts a centre
(p_y, p_x) on the H x W grid, and only positions inside a square window of half-width D around it
receive weight, scaled by a Gaussian of sigma D / 2.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from capkit.models.attention.base import Attention, AttentionMemory, additive_scores, beam_groups, weighted_context
from capkit.registry import ATTENTIONS

__all__ = ["LuongGlobalAttention", "LuongLocalAttention"]

SCORES = ("dot", "general", "concat")


class LuongScore(nn.Module):
    """The three alignment scores of Luong et al.: query (B, Dq) x features (B, N, C) -> scores (B, N).

    - ``dot``: h^T v (needs C == Dq);
    - ``general``: h^T W_a v (``W_a v`` precomputed per image);
    - ``concat``: w^T tanh(W_a [h; v]) (the feature half of ``W_a`` precomputed per image).
    """

    def __init__(self, score: str, query_dim: int, key_dim: int, attn_dim: int):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"unknown Luong score {score!r}; choose one of {', '.join(SCORES)}")
        if score == "dot" and query_dim != key_dim:
            raise ValueError(
                f"Luong 'dot' score needs feature channels ({key_dim}) == decoder hidden size ({query_dim}); "
                f"set model.decoder.feature_dim: {query_dim} to project the features, or use score 'general'"
            )
        self.kind = score
        if score == "general":
            self.key_proj = nn.Linear(key_dim, query_dim, bias=False)
        elif score == "concat":
            self.key_proj = nn.Linear(key_dim, attn_dim)
            self.query_proj = nn.Linear(query_dim, attn_dim, bias=False)
            self.v = nn.Linear(attn_dim, 1, bias=False)

    def keys(self, feats: Tensor) -> Tensor | None:
        """feats (B, N, C) -> the per-image part of the score: (B, N, Dq), (B, N, A) or None for dot."""
        return None if self.kind == "dot" else self.key_proj(feats)

    def forward(self, query: Tensor, memory: AttentionMemory) -> Tensor:
        """query (B * K, Dq) -> scores (B * K, N); K > 1 when the memory is shared (see ``Attention``)."""
        k = beam_groups(query, memory)
        if self.kind == "concat":
            return additive_scores(memory.keys, self.query_proj(query), self.v)
        keys = memory.values if memory.keys is None else memory.keys  # (B, N, Dq)
        scores = torch.bmm(keys, query.view(keys.shape[0], k, -1).transpose(1, 2))  # (B, N, K)
        return scores.transpose(1, 2).reshape(query.shape[0], keys.shape[1])


@ATTENTIONS.register("luong_global")
class LuongGlobalAttention(Attention):
    """Global attention: softmax of a Luong score over every grid position.

    Args:
        query_dim: decoder hidden size (set by the builder).
        key_dim: feature channels C (set by the builder).
        score: ``dot``, ``general`` or ``concat``.
        attn_dim: hidden size of the ``concat`` score.
    """

    supports_shared_memory = True

    def __init__(self, query_dim: int, key_dim: int, score: str = "general", attn_dim: int = 512):
        super().__init__(query_dim, key_dim)
        self.score = LuongScore(score, query_dim, key_dim, attn_dim)

    def precompute(self, feats: Tensor, grid: tuple[int, int]) -> AttentionMemory:
        return AttentionMemory(values=feats, keys=self.score.keys(feats), grid=grid)

    def forward(self, query: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor]:
        alpha = self.score(query, memory).softmax(dim=1)  # (B, N)
        return weighted_context(alpha, memory.values), alpha


@ATTENTIONS.register("luong_local")
class LuongLocalAttention(LuongGlobalAttention):
    """Predictive local attention (local-p) on the H x W grid.

    The centre is p = (H - 1, W - 1) * sigmoid(V_p tanh(W_p h)); position (y, x) is inside the window when
    |y - p_y| <= D and |x - p_x| <= D. Inside it, alpha is proportional to
    exp(score) * exp(-((y - p_y)^2 + (x - p_x)^2) / (2 sigma^2)) with sigma = D / 2, normalised to sum to 1
    (Luong's product of the windowed softmax and the Gaussian, renormalised); outside it, alpha is exactly 0.

    Args:
        query_dim: decoder hidden size (set by the builder).
        key_dim: feature channels C (set by the builder).
        score: ``dot``, ``general`` or ``concat``.
        window: half-width D of the window, in grid cells (at least 0.5, so it always holds a cell).
        attn_dim: hidden size of the position predictor and of the ``concat`` score.
    """

    def __init__(
        self, query_dim: int, key_dim: int, score: str = "general", window: float = 2.0, attn_dim: int = 512
    ):
        super().__init__(query_dim, key_dim, score=score, attn_dim=attn_dim)
        if window < 0.5:
            raise ValueError(f"luong_local window half-width must be >= 0.5 grid cells, got {window}")
        self.window = float(window)
        self.sigma = self.window / 2
        self.position = nn.Sequential(nn.Linear(query_dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 2))

    def centre(self, query: Tensor, grid: tuple[int, int]) -> Tensor:
        """query (B, Dq) -> predicted centre (B, 2) as (p_y, p_x) in grid-cell coordinates."""
        h, w = grid
        scale = query.new_tensor([h - 1, w - 1])
        return self.position(query).sigmoid() * scale

    def forward(self, query: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor]:
        h, w = memory.grid
        centre = self.centre(query, memory.grid)  # (B, 2)
        ys = torch.arange(h, device=query.device, dtype=query.dtype).repeat_interleave(w)  # (N,)
        xs = torch.arange(w, device=query.device, dtype=query.dtype).repeat(h)  # (N,)
        dy = ys.unsqueeze(0) - centre[:, :1]  # (B, N)
        dx = xs.unsqueeze(0) - centre[:, 1:]  # (B, N)
        inside = (dy.abs() <= self.window) & (dx.abs() <= self.window)
        log_gauss = -(dy.square() + dx.square()) / (2 * self.sigma**2)
        logits = (self.score(query, memory) + log_gauss).masked_fill(~inside, float("-inf"))
        alpha = logits.softmax(dim=1)  # (B, N), exactly 0 outside the window
        return weighted_context(alpha, memory.values), alpha
