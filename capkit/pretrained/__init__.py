"""Trained models to use and share: load (``from_pretrained``), caption, ``save_pretrained``, ``push_to_hub``,
and decode several as one (``ensemble``)."""
from capkit.pretrained.hub import ENTRY_POINT_GROUP, installed_models, resolve_model
from capkit.pretrained.model import CaptionResult, TrainedCaptioner, from_pretrained
from capkit.pretrained.ensemble import EnsembleCaptioner, ensemble

__all__ = ["ENTRY_POINT_GROUP", "CaptionResult", "EnsembleCaptioner", "TrainedCaptioner", "ensemble",
           "from_pretrained", "installed_models", "resolve_model"]
