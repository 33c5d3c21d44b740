"""The decoder interface: a step function, plus teacher forcing and beam search built on it."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from capkit.models.attention.base import Attention, AttentionMemory
from capkit.models.beam_search import StepFn, beam_search
from capkit.models.decoders.word_lstm import WordGates, WordLSTMCell
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
    - ``forward(enc, captions (B, L)) -> DecoderOutput``: teacher forcing, consistent with ``step`` at every target
      up to each caption's ``<end>`` (what it returns at the pad targets after it is its own; losses mask them);
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
            self.decoding_step(),
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

    def decoding_step(self) -> StepFn:
        """The step function of one decoding call (no autograd, weights fixed): ``step`` itself here; a decoder
        may bind it to caches that live for the call."""
        return self.step

    def _share_memory(self) -> bool:
        """Whether several hypotheses of an image may read one memory row (see ``Attention``)."""
        return self.beams_share_memory and getattr(self.attention, "supports_shared_memory", False)


class CaptionDecoder(StepDecoder):
    """Base class of the recurrent caption decoders.

    A subclass implements ``init_state``, ``recur`` (the recurrence: attention and LSTM, one step) and
    ``output`` (state -> logits). ``step`` is ``output(recur(..))`` for one token, as beam search (``generate``)
    calls it; teacher forcing (``forward``) embeds every input word at once, runs ``recur`` step by step on the
    captions still running (sorted by length, as ``pack_padded_sequence`` orders them, so padding costs no
    recurrent work) and ``output`` once over all their steps (one large matrix product instead of one per
    step). Both run the same layers on the same values, so they agree up to float rounding (the tests hold
    them to 1e-5). A subclass may instead implement ``step`` alone; ``forward`` then loops over it the same way.

    A subclass whose LSTM is a ``WordLSTMCell`` named ``lstm`` decodes on the CPU with ``WordGates``: the
    embedding's share of the gates computed once per word and call; ``recur`` then receives the rows as
    ``word_gates`` (B, 4H), to pass to the cell (see ``decoding_step``).

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
        self, emb: Tensor, state: dict[str, Tensor], memory: AttentionMemory, word_gates: Tensor | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One step of the recurrence: previous word's embedding emb (B, E) -> what ``output`` reads (B, D),
        alpha (B, N), next state. ``word_gates`` (B, 4H): the embedding's share of a ``WordLSTMCell``'s gates,
        given while decoding (see the class)."""
        raise NotImplementedError

    def output(self, emb: Tensor, out: Tensor) -> Tensor:
        """Logits (..., V) from the embeddings (..., E) and ``recur``'s outputs (..., D), for any leading dims."""
        raise NotImplementedError

    def step(
        self, tokens: Tensor, state: dict[str, Tensor], memory: AttentionMemory, word_gates: WordGates | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """tokens (B,) -> logits (B, V), alpha (B, N), next state; ``word_gates``: see the class."""
        emb = self.embed(tokens)  # (B, E)
        if word_gates is None:
            out, alpha, state = self.recur(emb, state, memory)
        else:
            out, alpha, state = self.recur(emb, state, memory, word_gates=word_gates(tokens))
        return self.output(emb, out), alpha, state

    def decoding_step(self) -> StepFn:
        """``step`` bound to a ``WordGates`` for the call on the CPU, when the LSTM is a ``WordLSTMCell`` named
        ``lstm`` and ``recur`` takes ``word_gates``; ``step`` otherwise. Elsewhere decoding is bound by kernel
        launches rather than arithmetic, and ``nn.LSTMCell``'s fused kernel takes fewer of them."""
        cell = getattr(self, "lstm", None)
        if (
            not isinstance(cell, WordLSTMCell)
            or cell.weight_ih.device.type != "cpu"
            or type(self).step is not CaptionDecoder.step
            or "word_gates" not in inspect.signature(self.recur).parameters
        ):
            return self.step
        return partial(self.step, word_gates=WordGates(self.embed, cell))

    def forward(self, enc: EncoderOutput, captions: Tensor) -> DecoderOutput:
        """Teacher forcing. captions (B, L) = <start> w_1 .. w_n <end> <pad>..; predicts captions[:, 1:].

        The recurrence runs on the captions sorted by length, as ``pack_padded_sequence`` orders them: step t
        computes only the captions still running (their <end> not yet predicted), not the whole batch. Logits and
        alphas after a caption's <end> (at its pad targets) are zeros; losses mask them.
        """
        targets = captions[:, 1:]  # (B, T)
        mask = targets != PAD_ID
        batch, steps = mask.shape
        # (B,) steps up to each caption's last target (at least one, which pack_padded_sequence needs)
        lengths = (mask * torch.arange(1, steps + 1, device=mask.device)).amax(dim=1).clamp(min=1)
        cells = torch.arange(batch * steps, device=mask.device).view(batch, steps)  # flat (b, t) positions
        packed = pack_padded_sequence(cells, lengths.cpu(), batch_first=True, enforce_sorted=False)
        sizes = packed.batch_sizes.tolist()  # captions still running at each step
        positions = packed.data  # (P,) flat (b, t) of each computed step, step-major, longest caption first
        memory = self.prepare(EncoderOutput(enc.feats.index_select(0, packed.sorted_indices), enc.grid))
        state = self.init_state(memory)  # rows in the packed order
        step_alone = type(self).recur is CaptionDecoder.recur  # a subclass that implements step alone
        tokens = captions[:, :-1].reshape(-1)[positions]  # (P,)
        inputs = tokens if step_alone else self.embed(tokens)  # (P,) or (P, E): every input word at once
        outs, alphas = [], []
        for rows, inputs_t in zip(sizes, inputs.split(sizes)):
            state = {name: value[:rows] for name, value in state.items()}  # the captions still running
            if step_alone:
                out, alpha, state = self.step(inputs_t, state, memory.head(rows))
            else:
                out, alpha, state = self.recur(inputs_t, state, memory.head(rows))
            outs.append(out)
            alphas.append(alpha)
        outs_p = torch.cat(outs)  # (P, V) logits, or (P, D) for ``output``
        logits_p = outs_p if step_alone else self.output(inputs, outs_p)  # every step at once
        logits = self._unpack(logits_p, positions, batch, steps)  # (B, T, V)
        alphas_t = self._unpack(torch.cat(alphas), positions, batch, steps)  # (B, T, N)
        return DecoderOutput(logits, alphas_t, self.aux_losses(alphas_t, mask))

    @staticmethod
    def _unpack(rows: Tensor, positions: Tensor, batch: int, steps: int) -> Tensor:
        """Rows (P, D) computed at the flat (b, t) ``positions`` -> (B, T, D), zeros elsewhere: one write, where
        ``pad_packed_sequence`` pads then copies again to restore the batch order."""
        cells = rows.new_zeros(batch * steps, rows.shape[1])
        return cells.index_copy_(0, positions, rows).view(batch, steps, -1)
