"""Digests that say whether two vocabularies or two sets of weights are the same: for checkpoints, saved models
and the feature cache."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["json_sha256", "state_sha256"]


def json_sha256(value: Any) -> str:
    """A digest of a JSON-able value (a vocabulary's id -> word list), stored beside the weights trained with it:
    a list that was permuted, edited or taken from another model no longer matches, where the ids would silently
    map to other words."""
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """A digest of a state dict's names, dtypes, shapes and values (in name order): equal digests, equal weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
