"""The decoder interface: a step function, plus teacher forcing and beam search built on it."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from capkit.models.attention.base import Attention, AttentionMemory
from capkit.models.beam_search import beam_search
from capkit.models.sampling import sample_captions
from capkit.types import PAD_ID, DecoderOutput, EncoderOutput, Generation, SampledCaptions

__all__ = ["StepDecoder", "CaptionDecoder", "AttentionFactory"]

# called by a decoder with its own sizes: attention(query_dim=..., key_dim=...)
AttentionFactory = Callable[..., Attention]


class StepDecoder(nn.Module):
    """What every registered decoder provides; the Captioner, trainer, evaluator and beam search use only this.

    - ``prepare(enc) -> AttentionMemory``: per-image work, done once;
    - ``init_state(memory) -> dict[str, Tensor]``: the decoding state, every tensor batch-first (B, ...), so that
      beam search can reorder it with ``index_select``;
    - ``step(tokens (B,), state, memory) -> (logits (B, V), alpha (B, N), next state)``;
    - ``forward(enc, captions (B, L)) -> DecoderOutput``: teacher forcing, consistent with ``step``;
    - ``aux_losses(alphas, mask)``: auxiliary training losses (none by default).

    ``generate`` (batched beam search over ``step``) and ``sample`` (drawn captions, for self-critical
    training) are implemented here.
    """

    # True when ``step`` reads the memory only through ``self.attention``, so that beam search may pass one
    # memory row per image for its K beams when the attention supports it (see ``Attention``)
    beams_share_memory = False

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        raise NotImplementedError

    def init_state(self, memory: AttentionMemory) -> dict[str, Tensor]:
        raise NotImplementedError

    def step(
        self, tokens: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def aux_losses(self, alphas: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Auxiliary losses from the attention weights alphas (B, T, N) of the valid steps mask (B, T)."""
        return {}

    @torch.no_grad()
    def generate(
        self,
        enc: EncoderOutput,
        *,
        beam_size: int = 3,
        max_len: int = 16,
        length_penalty: float = 0.0,
        n_best: int = 1,
    ) -> Generation:
        """Batched beam search (see ``capkit.models.beam_search.beam_search``)."""
        memory = self.prepare(enc)
        return beam_search(
            self.step,
            self.init_state(memory),
            memory,
            beam_size=beam_size,
            max_len=max_len,
            length_penalty=length_penalty,
            n_best=n_best,
            share_memory=self._share_memory(),
        )

    def sample(
        self, enc: EncoderOutput, *, num_samples: int, max_len: int = 16, generator: torch.Generator | None = None
    ) -> SampledCaptions:
        """``num_samples`` captions drawn per image, with gradients (see ``capkit.models.sampling``)."""
        memory = self.prepare(enc)
        return sample_captions(
            self.step,
            self.init_state(memory),
            memory,
            num_samples=num_samples,
            max_len=max_len,
            share_memory=self._share_memory(),
            generator=generator,
        )

    def _share_memory(self) -> bool:
        """Whether several hypotheses of an image may read one memory row (see ``Attention``)."""
        return self.beams_share_memory and getattr(self.attention, "supports_shared_memory", False)


class CaptionDecoder(StepDecoder):
    """Base class of the recurrent caption decoders.

    A subclass implements ``init_state``, ``recur`` (the recurrence: attention and LSTM, one step) and
    ``output`` (state -> logits). ``step`` is ``output(recur(..))`` for one token, as beam search (``generate``)
    calls it; teacher forcing (``forward``) embeds every input word at once, runs ``recur`` step by step and
    ``output`` once over all steps (one large matrix product instead of one per step). Both run the same
    layers on the same values, so they agree up to float rounding (the tests hold them to 1e-5). A subclass
    may instead implement ``step`` alone; ``forward`` then loops over it.

    Args:
        attention: factory that builds the attention, called with ``query_dim`` and ``key_dim``.
        encoder_dim: encoder feature channels C (set by the builder).
        vocab_size: V (set by the builder).
        embed_dim: word embedding size.
        hidden_dim: LSTM hidden size.
        dropout: dropout before the output layer.
        feature_dim: if set, the features are first mapped to this size (Linear + ReLU) once per image, and
            attention reads the mapped features; needed by Luong's ``dot`` score when C != hidden_dim.
    """

    def __init__(
        self,
        attention: AttentionFactory,
        encoder_dim: int,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        dropout: float,
        feature_dim: int | None,
        query_dim: int,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        if feature_dim:
            self.feature_proj: nn.Module = nn.Sequential(nn.Linear(encoder_dim, feature_dim), nn.ReLU())
        else:
            self.feature_proj = nn.Identity()
        self.feature_dim = feature_dim or encoder_dim
        self.attention = attention(query_dim=query_dim, key_dim=self.feature_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.init_h = nn.Linear(self.feature_dim, hidden_dim)
        self.init_c = nn.Linear(self.feature_dim, hidden_dim)

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        """Per-image work done once: feature mapping and the attention's precomputation."""
        return self.attention.precompute(self.feature_proj(enc.feats), enc.grid)

    def init_state(self, memory: AttentionMemory) -> dict[str, Tensor]:
        """LSTM state (h, c) from the mean feature, as in Show, Attend and Tell: each (B, hidden_dim)."""
        mean = memory.values.mean(dim=1)  # (B, C)
        return {"h": self.init_h(mean).tanh(), "c": self.init_c(mean).tanh()}

    def recur(
        self, emb: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One step of the recurrence: previous word's embedding emb (B, E) -> what ``output`` reads (B, D),
        alpha (B, N), next state."""
        raise NotImplementedError

    def output(self, emb: Tensor, out: Tensor) -> Tensor:
        """Logits (..., V) from the embeddings (..., E) and ``recur``'s outputs (..., D), for any leading dims."""
        raise NotImplementedError

    def step(
        self, tokens: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """tokens (B,) -> logits (B, V), alpha (B, N), next state."""
        emb = self.embed(tokens)  # (B, E)
        out, alpha, state = self.recur(emb, state, memory)
        return self.output(emb, out), alpha, state

    def forward(self, enc: EncoderOutput, captions: Tensor) -> DecoderOutput:
        """Teacher forcing. captions (B, L) = <start> w_1 .. w_n <end> <pad>..; predicts captions[:, 1:]."""
        memory = self.prepare(enc)
        state = self.init_state(memory)
        inputs = captions[:, :-1]  # (B, T)
        outs, alphas = [], []
        if type(self).recur is CaptionDecoder.recur:  # a subclass that implements step alone
            for t in range(inputs.shape[1]):
                step_logits, alpha, state = self.step(inputs[:, t], state, memory)
                outs.append(step_logits)
                alphas.append(alpha)
            logits = torch.stack(outs, dim=1)
        else:
            emb = self.embed(inputs)  # (B, T, E): every input word at once
            for t in range(inputs.shape[1]):
                out, alpha, state = self.recur(emb[:, t], state, memory)
                outs.append(out)
                alphas.append(alpha)
            logits = self.output(emb, torch.stack(outs, dim=1))  # (B, T, V): every step at once
        alphas_t = torch.stack(alphas, dim=1)  # (B, T, N)
        mask = captions[:, 1:] != PAD_ID  # (B, T)
        return DecoderOutput(logits, alphas_t, self.aux_losses(alphas_t, mask))
