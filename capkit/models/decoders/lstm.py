"""The base of the recurrent caption decoders: an LSTM with attention, split into a recurrence and an output."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from capkit.models.attention.base import AttentionMemory
from capkit.models.decoders.base import AttentionFactory, Decoder, PackedSteps
from capkit.models.decoders.word_lstm import step_words, word_gate_cache
from capkit.models.step_weights import bucket_rows, step_weights
from capkit.types import PAD_ID, DecoderOutput, EncoderOutput, Generation

__all__ = ["LSTMDecoder"]


class LSTMDecoder(Decoder):
    """Base class of the LSTM decoders (``show_attend_tell``, ``luong``, ``updown``).

    It builds what they share (the optional feature mapping, the attention, the word embedding, the dropout and
    the initial state from the mean feature), then calls ``build_layers()``, where a subclass creates its own
    layers. A subclass implements ``recur`` (one step of attention and LSTM, from the previous word's embedding)
    and ``output`` (what ``recur`` returns -> logits). ``step`` is ``output(recur(..))`` for one token, as beam
    search calls it; teacher forcing (``forward``) embeds every input word at once, runs ``recur`` step by step
    on the captions still running (``PackedSteps``) and ``output`` once over all their steps (one large matrix
    product instead of one per step), and the recurrence's weight gradients once per pass (``step_weights``).
    Both run the same layers on the same values, so they agree up to float rounding (the tests hold them to 1e-5).

    ``recur`` must read the memory only through ``self.attention``: beam search then shares each image's memory
    between its beams when the attention supports it (``supports_shared_memory``). Use a ``WordLSTMCell`` for
    an LSTM whose input starts with the word's embedding (decoding on the CPU computes its gates' word share once
    per word, see ``word_lstm``) and a ``StepLSTMCell`` for any other (its weight gradients once per pass).

    Args:
        attention: factory that builds the attention, called with ``query_dim`` (``hidden_dim``) and ``key_dim``.
        encoder_dim: encoder feature channels C (set by the builder).
        vocab_size: V (set by the builder).
        embed_dim: word embedding size.
        hidden_dim: LSTM hidden size (the attention's query size).
        dropout: dropout before the output layer.
        feature_dim: if set, the features are first mapped to this size (Linear + ReLU) once per image, and
            attention reads the mapped features; needed by Luong's ``dot`` score when C != hidden_dim.
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
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        if feature_dim:
            self.feature_proj: nn.Module = nn.Sequential(nn.Linear(encoder_dim, feature_dim), nn.ReLU())
        else:
            self.feature_proj = nn.Identity()
        self.feature_dim = feature_dim or encoder_dim
        self.attention = attention(query_dim=hidden_dim, key_dim=self.feature_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.init_h = nn.Linear(self.feature_dim, hidden_dim)
        self.init_c = nn.Linear(self.feature_dim, hidden_dim)
        self.build_layers()

    @property
    def supports_shared_memory(self) -> bool:  # type: ignore[override]
        return self.attention.supports_shared_memory

    def build_layers(self) -> None:
        """Create the subclass's layers (called at the end of ``__init__``, every size attribute set)."""
        raise NotImplementedError

    def recur(
        self, emb: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One step of the recurrence: previous word's embedding emb (B, E) -> what ``output`` reads (B, D),
        alpha (B, N), next state."""
        raise NotImplementedError

    def output(self, emb: Tensor, out: Tensor) -> Tensor:
        """Logits (..., V) from the embeddings (..., E) and ``recur``'s outputs (..., D), for any leading dims."""
        raise NotImplementedError

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        """Per-image work done once: feature mapping and the attention's precomputation.

        Under autocast the features are cast to its dtype here, once: the attention reads them at every step,
        and autocast would otherwise cast all of them (B, N, C) again at each step's product."""
        feats = self.feature_proj(enc.feats)
        device = feats.device.type
        if torch.is_autocast_enabled(device):
            feats = feats.to(torch.get_autocast_dtype(device))
        return self.attention.precompute(feats, enc.grid)

    def init_state(self, memory: AttentionMemory) -> dict[str, Tensor]:
        """LSTM state (h, c) from the mean feature, as in Show, Attend and Tell: each (B, hidden_dim)."""
        mean = memory.values.mean(dim=1)  # (B, C)
        return {"h": self.init_h(mean).tanh(), "c": self.init_c(mean).tanh()}

    def step(
        self, tokens: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """tokens (B,) -> logits (B, V), alpha (B, N), next state."""
        emb = self.embed(tokens)  # (B, E)
        with step_words(tokens, emb):
            out, alpha, state = self.recur(emb, state, memory)
        return self.output(emb, out), alpha, state

    @torch.no_grad()
    def generate(self, enc: EncoderOutput, **decoding) -> Generation:
        """Batched beam search (``Decoder.generate``), each word's share of the LSTM gates computed once."""
        with word_gate_cache(self.vocab_size):
            return super().generate(enc, **decoding)

    def forward(self, enc: EncoderOutput, captions: Tensor) -> DecoderOutput:
        """Teacher forcing (see ``Decoder.forward``): ``recur`` on the captions still running, ``output`` once."""
        packed = PackedSteps.of(captions)
        memory = self.prepare(packed.sorted_features(enc))
        inputs = self.embed(packed.inputs)  # (P, E): every input word at once
        with step_weights():  # the recurrence's weight gradients: once per pass, not once per step
            outs, alphas = packed.run(self.recur, inputs, self.init_state(memory), memory)
        # (B, T, V): every step at once, its rows bucketed so that a bf16 kernel of a few shapes serves every batch
        logits = packed.unpack(self.output(bucket_rows(inputs), bucket_rows(outs))[: len(outs)])
        alphas = packed.unpack(alphas)  # (B, T, N)
        return DecoderOutput(logits, alphas, self.aux_losses(alphas, packed.mask))
