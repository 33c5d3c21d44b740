"""An LSTM cell whose input starts with the previous word's embedding, and its per-word gate cache for decoding.

The embedding's share of the cell's gates, emb W_ih[:, :E]^T + b_ih + b_hh, depends on the word alone. Within a
decoding call (``word_gate_cache``, entered by ``LSTMDecoder.generate``) a ``WordLSTMCell`` on the CPU computes
it once per word of the call instead of once per hypothesis and step, and then computes only the shares of
its other input and of h (a fifth less of its largest product at E = 512, X = 2048). The decoder announces each
step's words and their embedding tensor with ``step_words``; a cell called outside both, with another first
input, or on another device, runs ``nn.LSTMCell`` on the concatenated input. Elsewhere than on the CPU decoding
is bound by kernel launches rather than arithmetic, and ``nn.LSTMCell``'s fused kernel takes fewer of them.

Within teacher forcing's ``step_weights()`` pass the cell computes its weights' gradients once per pass, not once
per step (see ``capkit.models.step_weights``); ``StepLSTMCell`` does only that, for a cell whose input is not led
by the word's embedding.

The call's state lives in a context variable, not on the modules, so that concurrent decoding calls (threads of
a server) never see each other's words.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from capkit.models.step_weights import in_step_weights, step_linear

__all__ = ["StepLSTMCell", "WordLSTMCell", "WordGates", "word_gate_cache", "step_words"]


class StepLSTMCell(nn.LSTMCell):
    """``nn.LSTMCell`` (same parameters, same state dict) whose weight gradients, within teacher forcing's
    ``step_weights()`` pass, are computed once per pass rather than once per step."""

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """x (B, I), (h, c) each (B, H) -> (h, c)."""
        if in_step_weights() and torch.is_grad_enabled() and self.bias and x.dim() == 2:
            h, c = hx
            gates = step_linear(x, self.weight_ih) + step_linear(h, self.weight_hh)
            return _cell_update(gates + (self.bias_ih + self.bias_hh), c)
        return super().forward(x, hx)


class WordLSTMCell(StepLSTMCell):
    """``nn.LSTMCell`` (same parameters, same state dict) over the input [emb; x]: the embedding (B, E) of the
    previous word, then other features (B, X), passed apart. ``emb`` must be a function of the word alone.

    Args:
        embed_dim: E.
        input_dim: X.
        hidden_dim: H.
    """

    def __init__(self, embed_dim: int, input_dim: int, hidden_dim: int):
        super().__init__(embed_dim + input_dim, hidden_dim)
        self.embed_dim = embed_dim

    def forward(  # type: ignore[override]
        self, emb: Tensor, x: Tensor, hx: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """emb (B, E), x (B, X), (h, c) each (B, H) -> (h, c)."""
        h, c = hx
        call = _CALL.get()
        if call is not None and call.fits(emb) and self.weight_ih.device.type == "cpu":
            # out of place: autocast
            gates = torch.addmm(call.gates(self, emb), x, self.weight_ih[:, self.embed_dim :].t())
            return _cell_update(torch.addmm(gates, h, self.weight_hh.t()), c)
        return super().forward(torch.cat([emb, x], dim=1), hx)

    def embedding_gates(self, emb: Tensor) -> Tensor:
        """The embedding's share of the gates, biases included: emb (W, E) -> (W, 4H)."""
        return torch.addmm(self.bias_ih + self.bias_hh, emb, self.weight_ih[:, : self.embed_dim].t())


def _cell_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM's gates (B, 4H), in PyTorch's order i, f, g, o, and cell c (B, H) -> next (h, c)."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.addcmul(f.sigmoid() * c, i.sigmoid(), g.tanh())
    return o.sigmoid() * c.tanh(), c


class WordGates:
    """The embedding's share of one ``WordLSTMCell``'s gates for the words of one decoding call (weights fixed).

    ``gates(tokens, emb)`` returns the rows (B, 4H) of the tokens (B,) whose embeddings are emb (B, E), computing
    a word's row the first time it is fed. A beam search feeds few distinct words (a 128-image batch at beam 3
    feeds 6,272 tokens, of about 200 distinct words with the benchmark's model), so this costs a small share of
    the vocabulary's rows.

    Args:
        cell: the cell the rows are for.
        vocab_size: V, the largest word id plus one.
    """

    def __init__(self, cell: WordLSTMCell, vocab_size: int):
        self.cell = cell
        weight = cell.weight_ih
        self.rows = weight.new_empty(vocab_size, 4 * cell.hidden_size)  # (V, 4H), filled on demand
        self.known = torch.zeros(vocab_size, dtype=torch.bool, device=weight.device)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, emb: Tensor) -> Tensor:
        unknown = (~self.known[tokens]).nonzero().squeeze(1)  # (U,) positions of words without a row yet
        if len(unknown):
            new, inverse = tokens[unknown].unique(return_inverse=True)  # (W,) sorted
            first = unknown.new_zeros(len(new)).scatter_reduce_(0, inverse, unknown, "amin", include_self=False)
            self.rows[new] = self.cell.embedding_gates(emb[first]).to(self.rows.dtype)
            self.known[new] = True
        return self.rows.index_select(0, tokens)


class _DecodingCall:
    """The words of the current step and one ``WordGates`` per cell, for one decoding call."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.tokens: Tensor | None = None  # the current step's words (B,)
        self.emb: Tensor | None = None  # and their embeddings (B, E), the very tensor the cell is given
        self.tables: dict[int, WordGates] = {}

    def fits(self, emb: Tensor) -> bool:
        """Whether emb is the current step's word embeddings, outside autograd."""
        return emb is self.emb and not torch.is_grad_enabled()

    def gates(self, cell: WordLSTMCell, emb: Tensor) -> Tensor:
        table = self.tables.get(id(cell))
        if table is None:
            table = self.tables[id(cell)] = WordGates(cell, self.vocab_size)
        return table(self.tokens, emb)


_CALL: ContextVar[_DecodingCall | None] = ContextVar("capkit_word_gate_cache", default=None)


@contextmanager
def word_gate_cache(vocab_size: int) -> Iterator[None]:
    """Within: one decoding call (no autograd, weights fixed) over a vocabulary of ``vocab_size`` words."""
    token = _CALL.set(_DecodingCall(vocab_size))
    try:
        yield
    finally:
        _CALL.reset(token)


@contextmanager
def step_words(tokens: Tensor, emb: Tensor) -> Iterator[None]:
    """Within: a cell given the tensor ``emb`` (B, E) knows it holds the embeddings of ``tokens`` (B,) (a no-op
    outside a decoding call). Any other first input runs the plain cell."""
    call = _CALL.get()
    if call is None:
        yield
        return
    before = call.tokens, call.emb
    call.tokens, call.emb = tokens, emb
    try:
        yield
    finally:
        call.tokens, call.emb = before
