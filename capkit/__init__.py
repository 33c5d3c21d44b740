"""capkit: a pluggable image-captioning framework in the Show, Attend and Tell family."""
from capkit import models  # noqa: F401  (registers the builtin components)
from capkit import data  # noqa: F401  (registers the builtin datasets)
from capkit import evaluation  # noqa: F401  (registers the builtin metrics)
from capkit.builder import build_captioner
from capkit.config import load_config, save_config
from capkit.errors import CapkitError
from capkit.models.captioner import Captioner
from capkit.pretrained import CaptionResult, TrainedCaptioner, ensemble, from_pretrained
from capkit.registry import ATTENTIONS, DATASETS, DECODERS, ENCODERS, METRICS, REGISTRIES, Registry
from capkit.types import DecoderOutput, EncoderOutput, Generation, Hypothesis

__version__ = "0.5.0"

__all__ = [
    "ATTENTIONS",
    "DATASETS",
    "DECODERS",
    "ENCODERS",
    "METRICS",
    "REGISTRIES",
    "CapkitError",
    "CaptionResult",
    "Captioner",
    "DecoderOutput",
    "EncoderOutput",
    "Generation",
    "Hypothesis",
    "Registry",
    "TrainedCaptioner",
    "build_captioner",
    "ensemble",
    "from_pretrained",
    "load_config",
    "save_config",
    "__version__",
]
