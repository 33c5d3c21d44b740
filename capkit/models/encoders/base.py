"""The encoder contract: what the builder, the data pipeline and the feature cache read from an encoder."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from capkit.types import EncoderOutput

__all__ = ["Encoder"]


class Encoder(nn.Module, ABC):
    """Base class of the registered encoders: images (B, 3, H, W) -> ``EncoderOutput(feats (B, N, C), grid)``.

    A subclass provides:

    - ``out_channels``: C, the feature size the builder passes on to the decoder;
    - ``data_config``: a timm-style data config (``input_size``, ``mean``, ``std``, ``interpolation``,
      ``crop_pct``, ``crop_mode``) from which capkit builds the image transform (``build_transform``);
    - ``cache_key()``: a JSON-able dict that identifies the features (model, weights), for the feature cache;
    - ``forward(images)``.

    The base class gives every encoder the same training behaviour: ``frozen`` is true when no parameter
    requires grad, and a frozen encoder stays in eval mode (batch-norm statistics and dropout stay fixed) and
    runs without autograd (``no_grad_if_frozen``). A subclass sets ``requires_grad`` on its parameters in its
    constructor, then calls ``self.train()`` so that a frozen encoder starts in eval mode.

    The feature cache stores ``forward_frozen(images)``, the output of the part of the encoder that never trains,
    and the ``Captioner`` runs ``finish`` on what it reads. By default that part is the whole encoder when it is
    frozen, and nothing otherwise (``cacheable`` false: it trains on images). An encoder that trains only its
    last stages can split itself (``TimmEncoder``): its frozen trunk's output is cached (``unfinished``) and
    ``finish`` runs the stages that train on it, so fine-tuning them costs their own forward and backward only.
    """

    @property
    @abstractmethod
    def out_channels(self) -> int:
        """C, the size of each feature vector."""

    @property
    @abstractmethod
    def data_config(self) -> dict[str, Any]:
        """The timm-style preprocessing of this encoder's images."""

    @abstractmethod
    def cache_key(self) -> dict[str, Any]:
        """What identifies this encoder's features (JSON-able), for the feature cache."""

    @abstractmethod
    def forward(self, images: Tensor) -> EncoderOutput:
        """images (B, 3, H, W), preprocessed as ``data_config`` says -> features (B, N, C) on an (h, w) grid."""

    @property
    def cacheable(self) -> bool:
        """Whether a part of this encoder never trains, so that ``forward_frozen``'s output can be cached."""
        return self.frozen

    def forward_frozen(self, images: Tensor) -> EncoderOutput:
        """images (B, 3, H, W) -> the output of the part that never trains: what the feature cache stores."""
        if not self.cacheable:
            raise RuntimeError(f"{type(self).__name__} has no frozen part whose output can be cached (it trains, "
                               f"and does not split itself)")
        return self(images)

    def frozen_state(self) -> dict[str, Tensor]:
        """The weights (parameters and buffers, named as in ``state_dict``) on which ``forward_frozen``'s output
        depends: those of the part that never trains (all of them by default). The feature cache keys its entries
        by their digest, so that weights loaded from a checkpoint (``train.init_from``) get their own; a saved
        model may leave them to their source (``encoder_weights='source'``)."""
        return self.state_dict()

    def finish(self, features: EncoderOutput) -> EncoderOutput:
        """The encoder's output from ``forward_frozen``'s: a whole output is returned as it is; an ``unfinished``
        one needs the subclass that made it."""
        if features.unfinished:
            raise NotImplementedError(f"{type(self).__name__} does not split itself: it cannot finish unfinished "
                                      "features")
        return features

    @classmethod
    def architecture_config(cls, section: dict[str, Any]) -> dict[str, Any]:
        """The config ``section`` of this encoder that builds its architecture without fetching or loading
        pretrained weights, for a model whose file holds them (``save_pretrained``). Subclasses with weight
        options override it; the base returns the section as it is (the weights are then loaded and replaced)."""
        return dict(section)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> Encoder:
        """A frozen encoder stays in eval mode."""
        super().train(mode and not self.frozen)
        return self

    def no_grad_if_frozen(self) -> torch.autograd.grad_mode.set_grad_enabled:
        """The context ``forward`` runs its model in: autograd as the caller has it, off for a frozen encoder."""
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen)
