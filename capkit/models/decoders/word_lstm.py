"""An LSTM cell whose input starts with the previous word's embedding, and the per-word gate cache of decoding."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["WordLSTMCell", "WordGates"]


class WordLSTMCell(nn.LSTMCell):
    """``nn.LSTMCell`` (same parameters, same state dict) over the input [emb; x]: a word embedding (B, E) then
    other features (B, X), passed apart.

    The embedding's share of the gates, emb W_ih[:, :E]^T + b_ih + b_hh, depends on the word alone. A decoding
    call computes it once per word (``WordGates``) instead of once per hypothesis and step, and passes the rows
    as ``word_gates``; the cell then computes only the shares of x and h (a fifth less of its largest product
    at E = 512, X = 2048).

    Args:
        embed_dim: E.
        input_dim: X.
        hidden_dim: H.
    """

    def __init__(self, embed_dim: int, input_dim: int, hidden_dim: int):
        super().__init__(embed_dim + input_dim, hidden_dim)
        self.embed_dim = embed_dim

    def forward(  # type: ignore[override]
        self, emb: Tensor, x: Tensor, hx: tuple[Tensor, Tensor], word_gates: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """emb (B, E), x (B, X), (h, c) each (B, H), optional ``word_gates`` (B, 4H) -> (h, c)."""
        if word_gates is None:
            return super().forward(torch.cat([emb, x], dim=1), hx)
        h, c = hx
        gates = torch.addmm(word_gates, x, self.weight_ih[:, self.embed_dim :].t())  # out of place: autocast
        gates = torch.addmm(gates, h, self.weight_hh.t())  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)  # PyTorch's gate order
        c = torch.addcmul(f.sigmoid() * c, i.sigmoid(), g.tanh())
        return o.sigmoid_() * c.tanh(), c

    def embedding_gates(self, emb: Tensor) -> Tensor:
        """The embedding's share of the gates, biases included: emb (W, E) -> (W, 4H)."""
        return torch.addmm(self.bias_ih + self.bias_hh, emb, self.weight_ih[:, : self.embed_dim].t())


class WordGates:
    """The embedding's share of a ``WordLSTMCell``'s gates for the words of one decoding call (weights fixed).

    ``gates(tokens)`` returns the rows (B, 4H) of the tokens (B,), computing a word's row the first time it is
    fed. A beam search feeds few distinct words (a 128-image batch at beam 3 feeds 6,272 tokens, of about 200
    distinct words with the benchmark's model), so this costs a small share of the vocabulary's rows.

    Args:
        embed: the decoder's word embedding (V, E).
        cell: the cell the rows are for.
    """

    def __init__(self, embed: nn.Embedding, cell: WordLSTMCell):
        self.embed, self.cell = embed, cell
        weight = embed.weight
        self.rows = weight.new_empty(weight.shape[0], 4 * cell.hidden_size)  # (V, 4H), filled on demand
        self.known = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (B,) -> their rows (B, 4H)."""
        new = tokens[~self.known[tokens]].unique()
        if len(new):
            self.rows[new] = self.cell.embedding_gates(self.embed(new)).to(self.rows.dtype)
            self.known[new] = True
        return self.rows.index_select(0, tokens)
