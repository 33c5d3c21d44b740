"""The top-down attention decoder of Anderson et al. 2018 ("Bottom-Up and Top-Down Attention"), over any features."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from capkit.models.attention.base import AttentionMemory
from capkit.models.decoders.lstm import LSTMDecoder
from capkit.models.decoders.word_lstm import StepLSTMCell, WordLSTMCell
from capkit.registry import DECODERS

__all__ = ["UpDownDecoder"]


@DECODERS.register("updown")
class UpDownDecoder(LSTMDecoder):
    """Two LSTMs: an attention LSTM that decides where to look, a language LSTM that says the next word.

    At step t: h1_t = LSTM_1([E y_{t-1}; h2_{t-1}; v_mean]); z_t, alpha_t = attend(h1_t); h2_t = LSTM_2([h1_t; z_t]);
    logits = W_o dropout(h2_t). v_mean is the mean of the (mapped) features. The language LSTM's state starts
    from the mean feature as in Show, Attend and Tell (``init_h``, ``init_c``), the attention LSTM's at zero.
    With grid features instead of detected regions this is the "top-down" model of ruotianluo's
    ImageCaptioning.pytorch (``feature_dim`` maps the features first, as its ``att_embed`` does).

    Args: those of ``LSTMDecoder``; ``hidden_dim`` is the size of both LSTMs.
    """

    def build_layers(self) -> None:
        self.attention_lstm = WordLSTMCell(self.embed_dim, self.hidden_dim + self.feature_dim, self.hidden_dim)
        self.language_lstm = StepLSTMCell(self.hidden_dim + self.feature_dim, self.hidden_dim)
        self.out = nn.Linear(self.hidden_dim, self.vocab_size)  # W_o

    def init_state(self, memory: AttentionMemory) -> dict[str, Tensor]:
        state = super().init_state(memory)  # the language LSTM's (h, c), each (B, H)
        zeros = torch.zeros_like(state["h"])
        return {**state, "h_att": zeros, "c_att": zeros, "mean": memory.values.mean(dim=1)}  # mean: (B, C)

    def recur(
        self, emb: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        mean = state["mean"]
        h_att, c_att = self.attention_lstm(emb, torch.cat([state["h"], mean], dim=1), (state["h_att"], state["c_att"]))
        context, alpha = self.attention(h_att, memory)  # (B, C), (B, N)
        h, c = self.language_lstm(torch.cat([h_att, context], dim=1), (state["h"], state["c"]))
        return h, alpha, {"h": h, "c": c, "h_att": h_att, "c_att": c_att, "mean": mean}

    def output(self, emb: Tensor, out: Tensor) -> Tensor:
        return self.out(self.dropout(out))  # out = h2
