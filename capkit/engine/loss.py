"""Training objectives. A criterion maps (model, batch) to the loss and its named parts; the Trainer calls it.

- ``CrossEntropyCriterion``: teacher-forced token cross-entropy plus the decoder's weighted auxiliary losses
  (``caption_loss``), on batches of captions (K per image: ``CaptionBatch.captions_per_image``);
- ``SelfCriticalCriterion``: self-critical sequence training (Rennie et al. 2017) on a caption-level reward
  such as CIDEr-D, on batches of one image per row with its references.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capkit.types import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    CaptionBatch,
    DecoderOutput,
    Hypothesis,
    SampledCaptions,
)

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


def self_critical_loss(
    samples: SampledCaptions, rewards: Tensor, baseline: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """REINFORCE with a baseline: by default each sample's is the mean reward of the image's other samples
    (Luo 2020, "A Better Variant of SCST"); ``baseline`` gives one per image instead (e.g. the greedy caption's
    reward, Rennie et al. 2017).

    Args:
        samples: S captions per image (S >= 2 without ``baseline``), with their token log-probabilities (B * S, T).
        rewards: (B * S,) reward of each caption.
        baseline: (B,) the baseline of every sample of each image, or None.

    Returns:
        The loss ``-mean over drawn tokens of (r - b) * log p(token)``, and the advantages r - b (B * S,),
        which sum to 0 over each image's samples under the mean baseline.
    """
    s = samples.num_samples
    per_image = rewards.view(-1, s)  # (B, S)
    if baseline is not None:
        baseline = baseline.view(-1, 1)  # (B, 1)
    elif s < 2:
        raise ValueError("self-critical training with the mean-of-the-others baseline needs num_samples >= 2")
    else:
        baseline = (per_image.sum(dim=1, keepdim=True) - per_image) / (s - 1)
    advantage = (per_image - baseline).view(-1)  # (B * S,)
    mask = samples.mask.float()  # (B * S, T)
    loss = -(advantage.unsqueeze(1) * samples.log_probs * mask).sum() / mask.sum()
    return loss, advantage


class CrossEntropyCriterion:
    """Teacher-forced cross-entropy (``caption_loss``) on batches of captions, each image encoded once for its
    ``captions_per_image``.

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
        out = model(batch.captions, images=batch.images, features=batch.features,
                    captions_per_image=batch.captions_per_image)
        return caption_loss(
            out, batch.captions, aux_loss_weights=self.aux_loss_weights, label_smoothing=self.label_smoothing
        )


class SelfCriticalCriterion:
    """Self-critical sequence training: ``num_samples`` captions drawn per image (dropout on, as in training),
    rewarded by ``reward`` (e.g. CIDEr-D against the image's references) against a baseline
    (``self_critical_loss``). Batches of one image per row.

    Args:
        reward: (image ids, word-id lists) -> rewards, e.g. ``CiderD`` on decoded captions.
        num_samples: S captions drawn per image (S >= 2 with the mean baseline).
        max_len: most words per drawn caption.
        baseline: ``"mean"``, the mean reward of the image's other samples (Luo 2020), or ``"greedy"``, the
            reward of the image's greedy caption decoded without dropout (Rennie et al. 2017).
        temperature: sampled candidates are drawn from softmax(logits / temperature).
        candidates: ``"beam"``, the ``num_samples`` best captions of a beam search as wide, without dropout,
            then scored with gradients by teacher forcing in training mode (the meshed-memory Transformer's
            self-critical stage, Cornia et al. 2020): the policy gradient moves probability between the captions
            a beam search returns; or ``"sample"``, captions drawn word by word.
    """

    BASELINES = ("mean", "greedy")
    CANDIDATES = ("sample", "beam")

    def __init__(
        self,
        reward: Reward,
        num_samples: int = 5,
        max_len: int = 16,
        baseline: str = "mean",
        temperature: float = 1.0,
        candidates: str = "beam",
    ):
        if baseline not in self.BASELINES:
            raise ValueError(f"self-critical baseline {baseline!r}: choose one of {', '.join(self.BASELINES)}")
        if candidates not in self.CANDIDATES:
            raise ValueError(f"self-critical candidates {candidates!r}: choose one of {', '.join(self.CANDIDATES)}")
        least = 2 if baseline == "mean" else 1
        if num_samples < least:
            raise ValueError(
                f"self-critical training with the {baseline} baseline needs num_samples >= {least}, got {num_samples}"
            )
        if not temperature > 0:
            raise ValueError(f"the sampling temperature must be > 0, got {temperature}")
        self.reward = reward
        self.num_samples = num_samples
        self.max_len = max_len
        self.baseline = baseline
        self.temperature = temperature
        self.candidates = candidates

    def __call__(self, model: nn.Module, batch: CaptionBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.references is None:
            raise ValueError(
                "self-critical training needs batches of images with their references; got caption batches "
                "(build the train loader with per_image=True)"
            )
        if self.candidates == "beam":
            samples = self._beam_captions(model, batch)
        else:
            samples = model(
                images=batch.images,
                features=batch.features,
                num_samples=self.num_samples,
                max_len=self.max_len,
                temperature=self.temperature,
            )
        image_ids = [i for i in batch.image_ids for _ in range(self.num_samples)]
        device = samples.tokens.device
        rewards = torch.tensor(self.reward(image_ids, samples.words()), dtype=torch.float32, device=device)  # (B*S,)
        baseline = None
        if self.baseline == "greedy":
            greedy = self._greedy_words(model, batch)
            baseline = torch.tensor(self.reward(batch.image_ids, greedy), dtype=torch.float32, device=device)  # (B,)
        loss, _ = self_critical_loss(samples, rewards, baseline)
        return loss, {"scst": loss.detach(), "reward": rewards.mean()}

    def _greedy_words(self, model: nn.Module, batch: CaptionBatch) -> list[list[int]]:
        """Each image's greedy caption (word ids, no ``<end>``), decoded in eval mode (no dropout)."""
        return [hyps[0].tokens for hyps in _search(model, batch, beam_size=1, max_len=self.max_len)]

    def _beam_captions(self, model: nn.Module, batch: CaptionBatch) -> SampledCaptions:
        """The S best captions of a width-S beam search per image, with their token log-probabilities under
        teacher forcing in the model's mode (training: dropout on), with gradients."""
        s = self.num_samples
        hypotheses = _search(model, batch, beam_size=s, max_len=self.max_len)
        rows = [hyps[min(k, len(hyps) - 1)].tokens + [EOS_ID] for hyps in hypotheses for k in range(s)]
        device = (batch.features.feats if batch.features is not None else batch.images).device
        tokens = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long, device=device)  # (B*S, T)
        for row, words in zip(tokens, rows):
            row[: len(words)] = torch.tensor(words)
        captions = torch.cat([torch.full_like(tokens[:, :1], BOS_ID), tokens], dim=1)  # (B * S, T + 1)
        # The encoder (or the trainable rest of one over a cached trunk) runs once per image, not once per candidate.
        out = model(captions, images=batch.images, features=batch.features, captions_per_image=s)
        log_probs = out.logits.float().log_softmax(dim=-1).gather(2, tokens.unsqueeze(2)).squeeze(2)
        return SampledCaptions(tokens, log_probs.masked_fill(tokens == PAD_ID, 0.0), s)


def _search(model: nn.Module, batch: CaptionBatch, *, beam_size: int, max_len: int) -> list[list[Hypothesis]]:
    """Each image's ``beam_size`` best hypotheses, decoded in eval mode (no dropout, no gradient)."""
    captioner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    training = captioner.training
    captioner.eval()
    try:
        generation = captioner.generate(
            images=batch.images, features=batch.features, beam_size=beam_size, n_best=beam_size, max_len=max_len
        )
    finally:
        captioner.train(training)
    return generation.hypotheses
