"""build_captioner: the one place that wires encoder -> attention -> decoder."""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from capkit.errors import ConfigError, ConfigKeyError
from capkit.models.captioner import Captioner
from capkit.registry import ATTENTIONS, DECODERS, ENCODERS

__all__ = ["build_captioner", "MODEL_SECTIONS"]

MODEL_SECTIONS = ("encoder", "attention", "decoder")


def build_captioner(model_cfg: Mapping[str, Any], vocab_size: int) -> Captioner:
    """Build a Captioner from ``{"encoder": {...}, "attention": {...}, "decoder": {...}}``.

    Each section is ``{"name": <registered name>, **constructor kwargs}``. The builder derives the sizes
    that connect them: the decoder gets ``encoder_dim`` (the encoder's ``out_channels``), ``vocab_size`` and
    an ``attention`` factory, which it calls with its own ``query_dim`` and ``key_dim``.
    """
    missing = [s for s in MODEL_SECTIONS if s not in model_cfg]
    extra = [s for s in model_cfg if s not in MODEL_SECTIONS]
    if missing or extra:
        raise ConfigKeyError(
            f"model config needs exactly the sections {', '.join(MODEL_SECTIONS)}; "
            f"missing: {missing or 'none'}, unknown: {extra or 'none'}"
        )
    _check_supported_attention(model_cfg)
    encoder = ENCODERS.build(model_cfg["encoder"])
    attention = partial(ATTENTIONS.build, dict(model_cfg["attention"]))
    decoder = DECODERS.build(
        model_cfg["decoder"], attention=attention, encoder_dim=encoder.out_channels, vocab_size=vocab_size
    )
    return Captioner(encoder, decoder)


def _check_supported_attention(model_cfg: Mapping[str, Any]) -> None:
    """A decoder whose class sets ``supported_attentions`` (e.g. the transformer, which has its own
    cross-attention) accepts only those attention names."""
    decoder_name, attention_name = model_cfg["decoder"].get("name"), model_cfg["attention"].get("name")
    if decoder_name is None or attention_name is None:
        return  # the registries report the missing name
    supported = getattr(DECODERS.get(decoder_name), "supported_attentions", None)
    if supported is not None and attention_name not in supported:
        raise ConfigError(
            f"decoder {decoder_name!r} does not take attention {attention_name!r}: it supports only "
            f"{', '.join(repr(s) for s in supported)} (set model.attention: {{name: {supported[0]}}})"
        )
