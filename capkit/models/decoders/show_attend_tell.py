"""The LSTM decoder of Show, Attend and Tell (Xu et al. 2015)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from capkit.models.attention.base import AttentionMemory
from capkit.models.decoders.lstm import LSTMDecoder
from capkit.models.decoders.word_lstm import WordLSTMCell
from capkit.registry import DECODERS

__all__ = ["ShowAttendTellDecoder"]


@DECODERS.register("show_attend_tell")
class ShowAttendTellDecoder(LSTMDecoder):
    """Attention on the previous hidden state, then the LSTM step.

    At step t: z = beta * attend(h_{t-1}) with the gate beta = sigmoid(f_beta(h_{t-1})); the LSTM reads
    [E y_{t-1}; z]; the deep output is logits = L_o(dropout(tanh(E y_{t-1} + L_h h_t + L_z z))).
    ``aux_losses`` returns the doubly stochastic regulariser (1 - sum_t alpha_ti)^2 averaged over the N grid
    positions i and the batch (unweighted; the trainer weights it). Xu et al. sum over the positions; the
    mean keeps the term on the cross-entropy's scale whatever the grid size (as the widely used PyTorch
    implementation does), so a weight of 1 is a sensible default.

    Args: those of ``LSTMDecoder``; ``embed_dim`` is also the deep output's size.
    """

    def build_layers(self) -> None:
        self.f_beta = nn.Linear(self.hidden_dim, 1)
        self.lstm = WordLSTMCell(self.embed_dim, self.feature_dim, self.hidden_dim)
        self.out_hidden = nn.Linear(self.hidden_dim, self.embed_dim)  # L_h
        self.out_context = nn.Linear(self.feature_dim, self.embed_dim, bias=False)  # L_z
        self.out = nn.Linear(self.embed_dim, self.vocab_size)  # L_o

    def recur(
        self, emb: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h, c = state["h"], state["c"]  # (B, H)
        context, alpha = self.attention(h, memory)  # (B, C), (B, N)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.lstm(emb, context, (h, c))
        return torch.cat([h, context], dim=1), alpha, {"h": h, "c": c}  # (B, H + C) for the deep output

    def output(self, emb: Tensor, out: Tensor) -> Tensor:
        h, context = out.split([self.hidden_dim, self.feature_dim], dim=-1)
        deep = (emb + self.out_hidden(h) + self.out_context(context)).tanh()  # (..., E)
        return self.out(self.dropout(deep))

    def aux_losses(self, alphas: Tensor, mask: Tensor) -> dict[str, Tensor]:
        coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, N)
        return {"doubly_stochastic": (1.0 - coverage).square().mean()}
