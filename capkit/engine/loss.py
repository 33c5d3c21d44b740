"""The captioning loss: token cross-entropy plus the decoder's weighted auxiliary losses."""
from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from capkit.types import PAD_ID, DecoderOutput

__all__ = ["caption_loss"]


def caption_loss(
    out: DecoderOutput,
    captions: Tensor,
    *,
    aux_loss_weights: Mapping[str, float],
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy over the non-pad targets plus ``sum_k w_k * aux_k``.

    Args:
        out: teacher-forced output, logits (B, T, V) for targets ``captions[:, 1:]``.
        captions: (B, L = T + 1) ``<start> .. <end> <pad>..``.
        aux_loss_weights: a weight for each auxiliary loss the decoder returns (0 disables one); a returned
            loss without a weight is an error, so a misspelt name never goes unnoticed. Weights for losses this
            decoder does not return are unused, so one config serves several decoders (an ablation).
        label_smoothing: cross-entropy label smoothing in [0, 1).

    Returns:
        The total loss (a float32 scalar) and its parts: ``ce`` and each auxiliary loss, unweighted.
    """
    unweighted = sorted(set(out.aux_losses) - set(aux_loss_weights))
    if unweighted:
        raise ValueError(
            f"the decoder returns the auxiliary losses {sorted(out.aux_losses)} but aux_loss_weights has no weight for "
            f"{unweighted}; set one weight per returned loss (0.0 disables it), "
            f"e.g. train.aux_loss_weights={{{', '.join(f'{k}: 1.0' for k in sorted(out.aux_losses))}}}"
        )
    targets = captions[:, 1:]  # (B, T)
    logits = out.logits.float()  # (B, T, V); fp32 under autocast too
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=PAD_ID,
        label_smoothing=label_smoothing,
    )
    parts = {"ce": ce, **{k: v.float() for k, v in out.aux_losses.items()}}
    total = ce
    for name in out.aux_losses:
        if aux_loss_weights[name]:
            total = total + aux_loss_weights[name] * parts[name]
    return total, parts
