"""Several trained captioners decoded as one (``ensemble``): one beam search over their averaged
log-probabilities, for models of one run or of different architectures over the same encoder.

    model = capkit.ensemble([capkit.from_pretrained("a"), capkit.from_pretrained("b")])
    print(model.caption("photo.jpg").caption)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from capkit.errors import CapkitError, ConfigError
from capkit.models.ensemble import CaptionerEnsemble
from capkit.pretrained.format import state_sha256
from capkit.pretrained.model import TrainedCaptioner

__all__ = ["EnsembleCaptioner", "ensemble"]


@dataclass
class EnsembleCaptioner(TrainedCaptioner):
    """A ``TrainedCaptioner`` whose model is a ``CaptionerEnsemble``: it captions, evaluates and serves like one
    model; its decoding settings and preprocessing are the first member's."""

    members: list[TrainedCaptioner] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return f"ensemble of {len(self.members)}: " + "; ".join(m.architecture for m in self.members)

    def save_pretrained(self, directory: Any, **kwargs: Any) -> Any:
        raise CapkitError("an ensemble is saved as its members: save each model, and ensemble them when loaded")


def ensemble(models: Sequence[TrainedCaptioner]) -> EnsembleCaptioner:
    """One captioner decoding with every model of ``models`` (two or more) at once.

    Raises:
        ConfigError: fewer than two models, or models whose vocabularies, encoders (architecture and weights)
            or preprocessing differ: an ensemble averages word probabilities by word id over one encoding of
            each image.
    """
    models = list(models)
    if len(models) < 2:
        raise ConfigError(f"an ensemble needs at least two models, got {len(models)}")
    first = models[0]
    for number, other in enumerate(models[1:], 2):
        where = f"models 1 ({first.architecture}) and {number} ({other.architecture})"
        if other.vocab.itos != first.vocab.itos:
            raise ConfigError(f"{where} have different vocabularies ({_first_difference(first, other)}): an "
                              f"ensemble averages word probabilities by word id, so its models must share one "
                              f"vocabulary (train them on the same captions with the same vocabulary settings)")
        if other.preprocessing != first.preprocessing or \
                state_sha256(other.model.encoder.state_dict()) != state_sha256(first.model.encoder.state_dict()):
            raise ConfigError(f"{where} have different encoders (architecture, weights or preprocessing): an "
                              f"ensemble encodes each image once for every decoder, so its models must share the "
                              f"encoder (train their decoders on the same frozen encoder; a fine-tuned encoder "
                              f"stage makes a model's encoder its own)")
        if other.device != first.device:
            raise ConfigError(f"{where} are on different devices ({first.device}, {other.device}); load them on one")
    model = CaptionerEnsemble([m.model for m in models]).eval()
    return EnsembleCaptioner(model, first.vocab, first.config, first.device, first.preprocessing, members=models)


def _first_difference(a: TrainedCaptioner, b: TrainedCaptioner) -> str:
    if len(a.vocab) != len(b.vocab):
        return f"{len(a.vocab)} and {len(b.vocab)} words"
    index = next(i for i, (x, y) in enumerate(zip(a.vocab.itos, b.vocab.itos)) if x != y)
    return f"word {index} is {a.vocab.itos[index]!r} in one and {b.vocab.itos[index]!r} in the other"
