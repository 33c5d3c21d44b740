"""Training objectives. A criterion maps (model, batch) to the loss and its named parts; the Trainer calls it.

- ``CrossEntropyCriterion``: teacher-forced token cross-entropy plus the decoder's weighted auxiliary losses
  (``caption_loss``), on batches of one caption per row;
- ``SelfCriticalCriterion``: self-critical sequence training (Rennie et al. 2017) on a caption-level reward
  such as CIDEr-D, on batches of one image per row with its references.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capkit.types import PAD_ID, CaptionBatch, DecoderOutput, SampledCaptions

__all__ = ["Criterion", "CrossEntropyCriterion", "SelfCriticalCriterion", "caption_loss", "self_critical_loss"]

# (image ids, sampled captions as word-id lists) -> one reward per caption
Reward = Callable[[Sequence[str], Sequence[Sequence[int]]], Sequence[float]]


class Criterion(Protocol):
    def __call__(self, model: nn.Module, batch: CaptionBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss (a float32 scalar to minimise) and its named parts (logged), for a batch on the device."""
        ...


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


def self_critical_loss(samples: SampledCaptions, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """REINFORCE with the other samples' mean reward as the baseline (Luo 2020, "A Better Variant of SCST").

    Args:
        samples: S >= 2 captions per image, with their token log-probabilities (B * S, T).
        rewards: (B * S,) reward of each caption.

    Returns:
        The loss ``-mean over drawn tokens of (r - b) * log p(token)``, and the advantages r - b (B * S,),
        which sum to 0 over each image's samples.
    """
    s = samples.num_samples
    if s < 2:
        raise ValueError("self-critical training with the mean-of-the-others baseline needs num_samples >= 2")
    per_image = rewards.view(-1, s)  # (B, S)
    baseline = (per_image.sum(dim=1, keepdim=True) - per_image) / (s - 1)
    advantage = (per_image - baseline).view(-1)  # (B * S,)
    mask = samples.mask.float()  # (B * S, T)
    loss = -(advantage.unsqueeze(1) * samples.log_probs * mask).sum() / mask.sum()
    return loss, advantage


class CrossEntropyCriterion:
    """Teacher-forced cross-entropy (``caption_loss``); batches of one caption per row.

    Args:
        aux_loss_weights, label_smoothing: see ``caption_loss``.
    """

    def __init__(self, aux_loss_weights: Mapping[str, float] | None = None, label_smoothing: float = 0.0):
        self.aux_loss_weights = dict(aux_loss_weights or {})
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: CaptionBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.captions is None:
            raise ValueError(
                "cross-entropy training needs batches of captions; got a batch without captions (an evaluation or "
                "per-image batch: build the train loader with per_image=False)"
            )
        out = model(batch.captions, images=batch.images, features=batch.features)
        return caption_loss(
            out, batch.captions, aux_loss_weights=self.aux_loss_weights, label_smoothing=self.label_smoothing
        )


class SelfCriticalCriterion:
    """Self-critical sequence training: ``num_samples`` captions drawn per image (dropout on, as in training),
    rewarded by ``reward`` (e.g. CIDEr-D against the image's references), each sample's baseline being the
    mean reward of the image's other samples (``self_critical_loss``). Batches of one image per row.

    Args:
        reward: (image ids, word-id lists) -> rewards, e.g. ``CiderD`` on decoded captions.
        num_samples: S >= 2 captions drawn per image.
        max_len: most words per drawn caption.
    """

    def __init__(self, reward: Reward, num_samples: int = 5, max_len: int = 16):
        if num_samples < 2:
            raise ValueError(f"self-critical training needs num_samples >= 2 (the baseline), got {num_samples}")
        self.reward = reward
        self.num_samples = num_samples
        self.max_len = max_len

    def __call__(self, model: nn.Module, batch: CaptionBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.references is None:
            raise ValueError(
                "self-critical training needs batches of images with their references; got caption batches "
                "(build the train loader with per_image=True)"
            )
        samples = model(
            images=batch.images, features=batch.features, num_samples=self.num_samples, max_len=self.max_len
        )
        image_ids = [i for i in batch.image_ids for _ in range(self.num_samples)]
        rewards = self.reward(image_ids, samples.words())
        rewards = torch.tensor(rewards, dtype=torch.float32, device=samples.tokens.device)  # (B * S,)
        loss, _ = self_critical_loss(samples, rewards)
        return loss, {"scst": loss.detach(), "reward": rewards.mean()}
