"""Builtin model components; importing this package registers them (the only import side effect)."""
from capkit.models.attention import bahdanau, luong, uniform  # noqa: F401
from capkit.models.captioner import Captioner
from capkit.models.decoders import luong as luong_decoder  # noqa: F401
from capkit.models.decoders import show_attend_tell  # noqa: F401
from capkit.models.decoders import transformer  # noqa: F401
from capkit.models.decoders import updown  # noqa: F401
from capkit.models.encoders import hf_encoder, timm_encoder  # noqa: F401

__all__ = ["Captioner"]
