"""Luong-style LSTM decoder (Luong et al. 2015) with input feeding."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from capkit.models.attention.base import AttentionMemory
from capkit.models.decoders.lstm import LSTMDecoder
from capkit.models.decoders.word_lstm import WordLSTMCell
from capkit.registry import DECODERS

__all__ = ["LuongDecoder"]


@DECODERS.register("luong")
class LuongDecoder(LSTMDecoder):
    """The LSTM step first, then attention on the new hidden state.

    At step t: h_t = LSTM([E y_{t-1}; h~_{t-1}]); c_t, alpha_t = attend(h_t); the attentional state
    h~_t = tanh(W_c [c_t; h_t]) gives logits = W_s dropout(h~_t) and is fed back as input at the next step
    (input feeding; h~_0 = 0).

    Args: those of ``LSTMDecoder``; ``hidden_dim`` is also the size of h~.
    """

    def build_layers(self) -> None:
        self.lstm = WordLSTMCell(self.embed_dim, self.hidden_dim, self.hidden_dim)
        self.combine = nn.Linear(self.feature_dim + self.hidden_dim, self.hidden_dim, bias=False)  # W_c
        self.out = nn.Linear(self.hidden_dim, self.vocab_size)  # W_s

    def init_state(self, memory: AttentionMemory) -> dict[str, Tensor]:
        state = super().init_state(memory)
        state["h_tilde"] = torch.zeros_like(state["h"])
        return state

    def recur(
        self, emb: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h, c = self.lstm(emb, state["h_tilde"], (state["h"], state["c"]))
        context, alpha = self.attention(h, memory)  # (B, C), (B, N)
        h_tilde = self.combine(torch.cat([context, h], dim=1)).tanh()  # (B, H)
        return h_tilde, alpha, {"h": h, "c": c, "h_tilde": h_tilde}

    def output(self, emb: Tensor, out: Tensor) -> Tensor:
        return self.out(self.dropout(out))  # out = h~
