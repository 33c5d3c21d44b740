"""capkit-adaptive: a capkit plugin adding

- ``adaptive`` (entry-point group ``capkit.attentions``): adaptive attention with a visual sentinel
  (Lu et al. 2017, "Knowing When to Look"), see ``capkit_adaptive.attention``;
- ``distinct_captions`` and ``vocab_usage`` (group ``capkit.metrics``): caption-diversity metrics, see
  ``capkit_adaptive.metrics``;
- ``sentinel_shares`` / ``save_sentinel_figure``: the sentinel share of every word, for the visualiser
  (``capkit_adaptive.visualize``).

capkit finds the components through the entry points declared in ``setup.cfg``; this module imports
nothing, so loading one entry point does not pay for the others.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AdaptiveAttention": "capkit_adaptive.attention",
    "DistinctCaptions": "capkit_adaptive.metrics",
    "VocabUsage": "capkit_adaptive.metrics",
    "sentinel_shares": "capkit_adaptive.visualize",
    "hypothesis_sentinel_shares": "capkit_adaptive.visualize",
    "save_sentinel_figure": "capkit_adaptive.visualize",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'capkit_adaptive' has no attribute {name!r}")
