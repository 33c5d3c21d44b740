"""Ensembles: one beam search over several captioners that share an encoder and a vocabulary.

At each step every member's decoder advances its own state on the same hypotheses, and the search ranks words
by the average of the members' log-probabilities (renormalised by the search: the normalised geometric mean of
their distributions). The image is encoded once, by the first member's encoder, which every member must share.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from capkit.models.attention.base import AttentionMemory
from capkit.models.beam_search import beam_search
from capkit.models.captioner import Captioner
from capkit.types import EncoderOutput, Generation

__all__ = ["CaptionerEnsemble", "EnsembleMemory"]


@dataclass
class EnsembleMemory(AttentionMemory):
    """Each member's attention memory; ``values`` and ``grid`` are the first member's, for the search's
    bookkeeping (batch size, grid)."""

    members: tuple[AttentionMemory, ...] = ()

    @classmethod
    def of(cls, members: Sequence[AttentionMemory]) -> EnsembleMemory:
        return cls(members[0].values, None, members[0].grid, tuple(members))

    def index_select(self, index: Tensor) -> EnsembleMemory:
        return EnsembleMemory.of([m.index_select(index) for m in self.members])

    def head(self, rows: int) -> EnsembleMemory:
        return EnsembleMemory.of([m.head(rows) for m in self.members])


class CaptionerEnsemble(nn.Module):
    """Captioners decoded together (``generate``); they must share the encoder (checked by
    ``capkit.pretrained.ensemble``, which also checks the vocabularies).

    Args:
        members: two or more captioners.
    """

    def __init__(self, members: Sequence[Captioner]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two models, got {len(members)}")
        self.members = nn.ModuleList(members)

    @property
    def encoder(self) -> nn.Module:
        return self.members[0].encoder

    def encode(self, images: Tensor) -> EncoderOutput:
        return self.members[0].encode(images)

    def image_features(self, images: Tensor | None = None, features: EncoderOutput | None = None) -> EncoderOutput:
        return self.members[0].image_features(images, features)

    @torch.no_grad()
    def generate(
        self, images: Tensor | None = None, features: EncoderOutput | None = None, *, beam_size: int = 3,
        max_len: int = 16, length_penalty: float = 0.0, n_best: int = 1, no_repeat_ngram_size: int = 0,
        suppress_unk: bool = False,
    ) -> Generation:
        """Batched beam search over the members' averaged log-probabilities; the attention maps of the result are
        the members' average."""
        enc = self.image_features(images, features)
        decoders = [m.decoder for m in self.members]
        memories = [d.prepare(enc) for d in decoders]
        prefixes = [f"{i}." for i in range(len(decoders))]  # member i's state tensors are "i.<name>"
        state = {prefix + name: value for prefix, d, memory in zip(prefixes, decoders, memories)
                 for name, value in d.init_state(memory).items()}

        def step(tokens: Tensor, state: dict[str, Tensor], memory: EnsembleMemory):
            log_probs, alphas, next_state = [], [], {}
            for prefix, decoder, own_memory in zip(prefixes, decoders, memory.members):
                own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
                logits, alpha, own = decoder.step(tokens, own, own_memory)
                log_probs.append(logits.float().log_softmax(dim=-1))  # (B, V)
                alphas.append(alpha.float())  # (B, N)
                next_state.update({prefix + name: value for name, value in own.items()})
            return torch.stack(log_probs).mean(dim=0), torch.stack(alphas).mean(dim=0), next_state

        return beam_search(step, state, EnsembleMemory.of(memories), beam_size=beam_size, max_len=max_len,
                           length_penalty=length_penalty, n_best=n_best, no_repeat_ngram_size=no_repeat_ngram_size,
                           suppress_unk=suppress_unk)
