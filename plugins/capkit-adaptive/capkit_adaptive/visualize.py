"""The sentinel share of every word, and an attention figure that shows it.

``AdaptiveAttention`` stores nothing on itself (a value kept from the last call would belong to whichever
beam row ran last). The shares are recomputed instead: ``sentinel_shares`` steps the decoder through given
captions (its ``step`` function, every row at every step, as beam search calls it) with a forward hook on the
attention that calls ``forward_with_sentinel`` on the same inputs. For a generated caption this reproduces the
step inputs of beam search exactly, so the shares line up with ``Hypothesis.alphas``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from capkit.models.captioner import Captioner
from capkit.types import BOS_ID, EOS_ID, EncoderOutput, Hypothesis
from capkit.visualization import save_attention_figure

__all__ = ["sentinel_shares", "hypothesis_sentinel_shares", "save_sentinel_figure"]


@torch.no_grad()
def sentinel_shares(
    model: Captioner, captions: Tensor, *, images: Tensor | None = None, features: EncoderOutput | None = None
) -> Tensor:
    """captions (B, L) = <start> w_1 .. <end> <pad>.. -> beta (B, L - 1): the sentinel share at every step.

    Steps after ``<end>`` (padding) get values too; mask them with ``captions[:, 1:] != PAD_ID``.

    Raises:
        TypeError: the model's attention has no ``forward_with_sentinel`` (it is not ``adaptive``).
    """
    attention = model.decoder.attention
    if not hasattr(attention, "forward_with_sentinel"):
        raise TypeError(
            f"the model's attention ({type(attention).__name__}) has no visual sentinel; "
            f"sentinel shares need model.attention.name=adaptive"
        )
    betas: list[Tensor] = []

    def record(module, args, output):  # args = (query, memory), as the decoder called it
        betas.append(module.forward_with_sentinel(*args)[2])

    memory = model.decoder.prepare(model.image_features(images, features))
    state = model.decoder.init_state(memory)
    handle = attention.register_forward_hook(record)
    try:
        for t in range(captions.shape[1] - 1):
            _, _, state = model.decoder.step(captions[:, t], state, memory)
    finally:
        handle.remove()
    return torch.stack(betas, dim=1)


def hypothesis_sentinel_shares(
    model: Captioner, hypothesis: Hypothesis, *, images: Tensor | None = None, features: EncoderOutput | None = None
) -> Tensor:
    """The sentinel shares (len(tokens) + 1,) of one generated caption, aligned with ``hypothesis.alphas``
    (the ``<end>`` step last). ``images`` / ``features`` hold the one image it was generated for."""
    captions = torch.tensor([[BOS_ID, *hypothesis.tokens, EOS_ID]])
    device = (images if images is not None else features.feats).device
    return sentinel_shares(model, captions.to(device), images=images, features=features)[0]


def save_sentinel_figure(
    path: str | os.PathLike,
    image,
    words: Sequence[str],
    alphas: Tensor,
    betas: Tensor | Sequence[float],
    grid: tuple[int, int],
    **kwargs,
) -> str:
    """``capkit.visualization.save_attention_figure`` with each panel titled ``word`` and its sentinel share
    (``beta=0.83``: 83 % of the context came from the sentinel, not the image)."""
    betas = [float(b) for b in betas]
    if len(betas) != len(words):
        raise ValueError(f"{len(betas)} sentinel shares for {len(words)} words")
    labelled = [f"{w}\nbeta={b:.2f}" for w, b in zip(words, betas)]
    return save_attention_figure(path, image, labelled, alphas, grid, **kwargs)
