"""The LSTM decoder of Show, Attend and Tell (Xu et al. 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capkit.models.attention.base import AttentionMemory
from capkit.models.decoders.base import AttentionFactory
from capkit.models.decoders.lstm import LSTMDecoder
from capkit.models.decoders.word_lstm import WordLSTMCell
from capkit.registry import DECODERS
from capkit.types import PAD_ID

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

    Args: those of ``LSTMDecoder``; ``embed_dim`` is also the deep output's size, and
        tie_embeddings: L_o is the word embedding E itself (Press and Wolf 2017; fairseq's
            ``share_decoder_input_output_embed``, Hugging Face's ``tie_word_embeddings``), with a bias of its own:
            V x E fewer weights (1.3 million for 2,538 words at 512). The matrix is then drawn from N(0, 1/E), as
            fairseq draws its embeddings, so that the first logits are O(1), with the pad row zero at initialisation
            (the output then trains it too; beam search never proposes the pad). The state dict holds the matrix
            once, as ``embed.weight``, and the output's bias as ``out_bias``.
    """

    def __init__(
        self,
        attention: AttentionFactory,
        encoder_dim: int,
        vocab_size: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        dropout: float = 0.5,
        feature_dim: int | None = None,
        tie_embeddings: bool = False,
    ):
        self.tie_embeddings = tie_embeddings  # read by build_layers, which the base __init__ calls
        super().__init__(attention, encoder_dim, vocab_size, embed_dim, hidden_dim, dropout, feature_dim)

    def build_layers(self) -> None:
        self.f_beta = nn.Linear(self.hidden_dim, 1)
        self.lstm = WordLSTMCell(self.embed_dim, self.feature_dim, self.hidden_dim)
        self.out_hidden = nn.Linear(self.hidden_dim, self.embed_dim)  # L_h
        self.out_context = nn.Linear(self.feature_dim, self.embed_dim, bias=False)  # L_z
        if self.tie_embeddings:
            nn.init.normal_(self.embed.weight, std=self.embed_dim**-0.5)
            with torch.no_grad():
                self.embed.weight[PAD_ID].zero_()
            self.out_bias = nn.Parameter(torch.zeros(self.vocab_size))
        else:
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
        deep = self.dropout((emb + self.out_hidden(h) + self.out_context(context)).tanh())  # (..., E)
        if self.tie_embeddings:
            return F.linear(deep, self.embed.weight, self.out_bias)  # (..., V)
        return self.out(deep)

    def aux_losses(self, alphas: Tensor, mask: Tensor) -> dict[str, Tensor]:
        coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, N)
        return {"doubly_stochastic": (1.0 - coverage).square().mean()}
