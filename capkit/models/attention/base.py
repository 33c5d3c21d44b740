"""The attention interface every registered attention implements."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from capkit.models.step_weights import step_rows

__all__ = ["Attention", "AttentionMemory", "additive_scores", "beam_groups", "weighted_context"]

# Elements of the (rows, K, N, A) hidden layer of an additive score computed at a time on the CPU: 4 MiB in fp32,
# split between the threads (on the 2-core benchmark VM, each core's half fits its 2 MiB L2 cache).
ADDITIVE_CHUNK_ELEMENTS = 1 << 20


@dataclass
class AttentionMemory:
    """What an attention computes once per image and reuses at every decoding step.

    Attributes:
        values: (B, N, C) encoder features that the context vector averages.
        keys: (B, N, A) per-image precomputation of the score (e.g. the projected features), or None.
        grid: (H, W) of the feature grid, N == H * W.
    """

    values: Tensor
    keys: Tensor | None
    grid: tuple[int, int]

    def index_select(self, index: Tensor) -> AttentionMemory:
        """Rows ``index`` of the batch (beam search expands and reorders with this)."""
        keys = None if self.keys is None else self.keys.index_select(0, index)
        return AttentionMemory(self.values.index_select(0, index), keys, self.grid)

    def head(self, rows: int) -> AttentionMemory:
        """The first ``rows`` images (views, no copy; within teacher forcing's pass, their gradients are summed
        once per pass: ``step_rows``)."""
        keys = None if self.keys is None else step_rows(self.keys, rows)
        return AttentionMemory(step_rows(self.values, rows), keys, self.grid)


# A pytree (``values`` and ``keys`` the leaves, ``grid`` static), so that ``torch.export`` traces a decoder step
# that takes it (see ``capkit.types.EncoderOutput``).
pytree.register_pytree_node(
    AttentionMemory,
    lambda memory: ([memory.values, memory.keys], memory.grid),
    lambda leaves, grid: AttentionMemory(leaves[0], leaves[1], grid),
    serialized_type_name="capkit.models.attention.base.AttentionMemory",
    flatten_with_keys_fn=lambda memory: (
        [(pytree.GetAttrKey("values"), memory.values), (pytree.GetAttrKey("keys"), memory.keys)], memory.grid
    ),
)


class Attention(nn.Module):
    """Base class: scores a decoder query against every grid position.

    Subclasses take ``query_dim`` (decoder state size) and ``key_dim`` (feature channels C), both set by
    the builder, plus their own keyword options. They implement ``precompute`` (once per image) and
    ``forward`` (once per step), and return weights ``alpha (B, N)`` that sum to 1.

    Shared memory: an attention whose ``supports_shared_memory`` is True also accepts B * K queries against
    a memory of B rows, query row i reading memory row i // K; beam search then keeps one copy of each image's
    memory for its K beams instead of K copies (see ``beam_search``'s ``share_memory``). ``beam_groups`` and
    ``weighted_context`` below do the bookkeeping.
    """

    supports_shared_memory = False

    def __init__(self, query_dim: int, key_dim: int):
        super().__init__()
        self.query_dim = query_dim
        self.key_dim = key_dim

    def precompute(self, feats: Tensor, grid: tuple[int, int]) -> AttentionMemory:
        """feats (B, N, C) -> memory; the default keeps the features as they are."""
        return AttentionMemory(values=feats, keys=None, grid=grid)

    def forward(self, query: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor]:
        """query (B, Dq) -> context (B, C), alpha (B, N)."""
        raise NotImplementedError


def beam_groups(query: Tensor, memory: AttentionMemory) -> int:
    """K, the number of consecutive queries that share each memory row (1 outside beam search)."""
    rows = memory.values.shape[0]
    if query.shape[0] % rows:
        raise ValueError(f"{query.shape[0]} queries do not divide into the {rows} rows of the attention memory")
    return query.shape[0] // rows


def weighted_context(alpha: Tensor, values: Tensor) -> Tensor:
    """alpha (B * K, N), values (B, N, C) -> context (B * K, C); K = 1 unless the memory is shared."""
    b, _, c = values.shape
    return torch.bmm(alpha.view(b, -1, alpha.shape[1]), values).view(alpha.shape[0], c)


def additive_scores(keys: Tensor, query: Tensor, score: nn.Linear) -> Tensor:
    """score(tanh(keys + query)): keys (B, N, A), projected queries (B * K, A) -> scores (B * K, N).

    Each group of K queries meets its image's keys by broadcasting, without copying them. Without autograd on
    the CPU (decoding), the (B, K, N, A) hidden layer is computed a few images at a time in one reused buffer
    that stays in cache: a fresh (B, K, N, A) tensor at every step (25 MB at 64 images and beam 3) costs more
    in first-touch page faults than the tanh itself. An exported graph (``torch.export``) takes the plain broadcast:
    its batch size is symbolic, which a loop over chunks cannot be.
    """
    b, n, a = keys.shape
    k = query.shape[0] // b
    query = query.view(b, k, 1, a)  # (B, K, 1, A)
    if keys.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_exporting():
        return score((keys.unsqueeze(1) + query).tanh_()).view(-1, n)
    rows = max(1, ADDITIVE_CHUNK_ELEMENTS // (k * n * a))
    hidden = torch.empty(min(rows, b), k, n, a, dtype=torch.promote_types(keys.dtype, query.dtype))
    scores = [
        score(torch.add(key.unsqueeze(1), q, out=hidden[: len(key)]).tanh_())
        for key, q in zip(keys.split(rows), query.split(rows))
    ]
    return torch.cat(scores).view(-1, n)  # (B * K, N)
