"""The decoder interface: a step function, plus teacher forcing, beam search and sampling built on it."""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from capkit.models.attention.base import Attention, AttentionMemory
from capkit.models.beam_search import StepFn, beam_search
from capkit.models.sampling import sample_captions
from capkit.types import PAD_ID, DecoderOutput, EncoderOutput, Generation, SampledCaptions

__all__ = ["Decoder", "AttentionFactory", "PackedSteps"]

# called by a decoder with its own sizes: attention(query_dim=..., key_dim=...)
AttentionFactory = Callable[..., Attention]


class Decoder(nn.Module):
    """Base class of the registered decoders; the Captioner, trainer, evaluator and beam search use only this.

    The builder constructs a decoder with the derived keyword arguments ``attention`` (an ``AttentionFactory``),
    ``encoder_dim`` (C) and ``vocab_size`` (V), plus the config's options. A subclass implements:

    - ``prepare(enc) -> AttentionMemory``: per-image work, done once;
    - ``init_state(memory) -> dict[str, Tensor]``: the decoding state, every tensor batch-first (B, ...), so that
      beam search can reorder it with ``index_select``;
    - ``step(tokens (B,), state, memory) -> (logits (B, V), alpha (B, N), next state)``;

    and may override ``forward`` (teacher forcing; by default ``step`` runs over the captions still running, as
    ``PackedSteps`` orders them) and ``aux_losses`` (none by default). ``generate`` (batched beam search over
    ``step``) and ``sample`` (drawn captions, for self-critical training) are implemented here.

    Attributes:
        supports_shared_memory: True when ``step`` accepts B * K rows of tokens and state against a memory of
            B rows (row i reading memory row i // K), so that beam search and sampling keep one copy of each
            image's memory for its K hypotheses.
    """

    supports_shared_memory = False

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

    def forward(self, enc: EncoderOutput, captions: Tensor) -> DecoderOutput:
        """Teacher forcing. captions (B, L) = <start> w_1 .. w_n <end> <pad>..; predicts captions[:, 1:].

        Consistent with ``step`` at every target up to each caption's ``<end>``; the logits and alphas after it
        (at the pad targets) are zeros, and losses mask them.
        """
        packed = PackedSteps.of(captions)
        memory = self.prepare(packed.sorted_features(enc))
        logits, alphas = packed.run(self.step, packed.inputs, self.init_state(memory), memory)
        alphas = packed.unpack(alphas)  # (B, T, N)
        return DecoderOutput(packed.unpack(logits), alphas, self.aux_losses(alphas, packed.mask))

    @torch.no_grad()
    def generate(
        self,
        enc: EncoderOutput,
        *,
        beam_size: int = 3,
        max_len: int = 16,
        length_penalty: float = 0.0,
        n_best: int = 1,
        no_repeat_ngram_size: int = 0,
        suppress_unk: bool = False,
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
            share_memory=self.supports_shared_memory,
            no_repeat_ngram_size=no_repeat_ngram_size,
            suppress_unk=suppress_unk,
        )

    def sample(
        self,
        enc: EncoderOutput,
        *,
        num_samples: int,
        max_len: int = 16,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> SampledCaptions:
        """``num_samples`` captions drawn per image, with gradients (see ``capkit.models.sampling``)."""
        memory = self.prepare(enc)
        return sample_captions(
            self.step,
            self.init_state(memory),
            memory,
            num_samples=num_samples,
            max_len=max_len,
            temperature=temperature,
            share_memory=self.supports_shared_memory,
            generator=generator,
        )


class PackedSteps(NamedTuple):
    """The steps of teacher forcing in ``pack_padded_sequence`` order: captions sorted by length, step-major,
    so that step t computes only the captions still running (their ``<end>`` not yet predicted).

    Attributes:
        sizes: captions still running at each step (non-increasing).
        positions: (P,) flat (b, t) position of each computed step, in the packed order.
        inputs: (P,) the input word of each computed step.
        sorted_indices: (B,) the caption of each packed row.
        mask: (B, T) the valid targets.
    """

    sizes: list[int]
    positions: Tensor
    inputs: Tensor
    sorted_indices: Tensor
    mask: Tensor

    @classmethod
    def of(cls, captions: Tensor) -> PackedSteps:
        """captions (B, L) = <start> w_1 .. w_n <end> <pad>.. with targets captions[:, 1:]."""
        mask = captions[:, 1:] != PAD_ID  # (B, T)
        batch, steps = mask.shape
        # (B,) steps up to each caption's last target (at least one, which pack_padded_sequence needs)
        lengths = (mask * torch.arange(1, steps + 1, device=mask.device)).amax(dim=1).clamp(min=1)
        cells = torch.arange(batch * steps, device=mask.device).view(batch, steps)  # flat (b, t) positions
        packed = pack_padded_sequence(cells, lengths.cpu(), batch_first=True, enforce_sorted=False)
        positions = packed.data  # (P,) longest caption first
        inputs = captions[:, :-1].reshape(-1)[positions]
        return cls(packed.batch_sizes.tolist(), positions, inputs, packed.sorted_indices, mask)

    def run(
        self, recurrence: StepFn, inputs: Tensor, state: dict[str, Tensor], memory: AttentionMemory
    ) -> tuple[Tensor, Tensor]:
        """Run ``recurrence(inputs_t, state, memory) -> (out, alpha, state)`` over the steps, each on the captions
        still running: inputs (P, ...) in the packed order, state and memory rows in the packed row order.
        Returns every step's out (P, D) and alpha (P, N)."""
        outs, alphas = [], []
        for rows, inputs_t in zip(self.sizes, inputs.split(self.sizes)):
            state = {name: value[:rows] for name, value in state.items()}  # the captions still running
            out, alpha, state = recurrence(inputs_t, state, memory.head(rows))
            outs.append(out)
            alphas.append(alpha)
        return torch.cat(outs), torch.cat(alphas)

    def sorted_features(self, enc: EncoderOutput) -> EncoderOutput:
        """The features in the packed row order."""
        return enc.with_feats(enc.feats.index_select(0, self.sorted_indices))

    def unpack(self, rows: Tensor) -> Tensor:
        """Rows (P, D) computed at ``positions`` -> (B, T, D), zeros elsewhere: one write, where
        ``pad_packed_sequence`` pads then copies again to restore the batch order."""
        batch, steps = self.mask.shape
        cells = rows.new_zeros(batch * steps, rows.shape[1])
        return cells.index_copy_(0, self.positions, rows).view(batch, steps, -1)
