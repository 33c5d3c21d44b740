"""Trained models to use and share: load (``from_pretrained``), caption, ``save_pretrained``, ``push_to_hub``."""
from capkit.pretrained.hub import ENTRY_POINT_GROUP, installed_models, resolve_model
from capkit.pretrained.model import CaptionResult, TrainedCaptioner, from_pretrained

__all__ = ["ENTRY_POINT_GROUP", "CaptionResult", "TrainedCaptioner", "from_pretrained", "installed_models",
           "resolve_model"]
