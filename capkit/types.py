"""Data passed between components: plain dataclasses, no logic beyond moving and selecting rows."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = [
    "PAD",
    "BOS",
    "EOS",
    "UNK",
    "SPECIAL_TOKENS",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "UNK_ID",
    "EncoderOutput",
    "DecoderOutput",
    "Hypothesis",
    "Generation",
    "SampledCaptions",
    "CaptionBatch",
]

PAD, BOS, EOS, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # every vocabulary starts with these, in this order
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


@dataclass
class EncoderOutput:
    """Image features on a spatial grid.

    Attributes:
        feats: (B, N, C) features, the grid's positions flattened row-major, N == H * W.
        grid: (H, W) of the grid, for local attention windows and the visualiser.
        unfinished: the output of the encoder's frozen part only (the feature cache of an encoder whose last
            stages train); ``Encoder.finish`` runs the rest on it. False for an encoder's whole output.
    """

    feats: Tensor
    grid: tuple[int, int]
    unfinished: bool = False

    def __post_init__(self) -> None:
        h, w = self.grid
        if self.feats.dim() != 3 or self.feats.shape[1] != h * w:
            raise ValueError(f"EncoderOutput feats {tuple(self.feats.shape)} do not match grid {self.grid}")

    def to(self, *args, **kwargs) -> EncoderOutput:
        return self.with_feats(self.feats.to(*args, **kwargs))

    def with_feats(self, feats: Tensor) -> EncoderOutput:
        """The same grid (and stage) with other rows of features, e.g. selected or repeated: (B', N, C)."""
        return EncoderOutput(feats, self.grid, self.unfinished)


# A pytree (``feats`` the leaf, ``grid`` and ``unfinished`` static), so that ``torch.export`` traces encoders that
# return it; the serialized name keeps ``torch.export.save`` working (a name is needed there, not at trace time).
pytree.register_pytree_node(
    EncoderOutput,
    lambda out: ([out.feats], (out.grid, out.unfinished)),
    lambda leaves, context: EncoderOutput(leaves[0], *context),
    serialized_type_name="capkit.types.EncoderOutput",
    flatten_with_keys_fn=lambda out: ([(pytree.GetAttrKey("feats"), out.feats)], (out.grid, out.unfinished)),
)


@dataclass
class DecoderOutput:
    """Teacher-forced decoder output for captions of T input steps.

    Attributes:
        logits: (B, T, V) next-token logits.
        alphas: (B, T, N) attention weights over the grid at every step (each row sums to 1 up to the caption's
            ``<end>``; after it, at the pad targets, the values are the decoder's own: zeros for the recurrent
            decoders, which stop each caption there).
        aux_losses: named scalar auxiliary losses (unweighted), e.g. ``doubly_stochastic``.
    """

    logits: Tensor
    alphas: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Hypothesis:
    """One generated caption.

    Attributes:
        tokens: word ids, without ``<start>`` and ``<end>``.
        score: total log-probability, ``<end>`` included.
        norm_score: ``score`` after the length penalty (the value beams are ranked by).
        alphas: (len(tokens) + 1, N) attention weights of every step, the ``<end>`` step last.
    """

    tokens: list[int]
    score: float
    norm_score: float
    alphas: Tensor


@dataclass
class Generation:
    """Beam search result for a batch of B images.

    Attributes:
        hypotheses: for each image, its best ``n_best`` hypotheses, best first.
        grid: (H, W) of the attention maps.
    """

    hypotheses: list[list[Hypothesis]]
    grid: tuple[int, int]

    @property
    def best(self) -> list[Hypothesis]:
        return [hyps[0] for hyps in self.hypotheses]

    @property
    def tokens(self) -> list[list[int]]:
        return [h.tokens for h in self.best]

    @property
    def scores(self) -> Tensor:  # (B,)
        return torch.tensor([h.score for h in self.best])


@dataclass
class SampledCaptions:
    """Captions drawn from the model's word distributions (self-critical training), S per image, with grad.

    Rows are image-major: row ``b * S + s`` is sample s of image b.

    Attributes:
        tokens: (B * S, T) word ids, ``<end>`` included, ``<pad>`` after it.
        log_probs: (B * S, T) log-probability of each drawn token (0 at the padding), differentiable.
        num_samples: S.
    """

    tokens: Tensor
    log_probs: Tensor
    num_samples: int

    @property
    def mask(self) -> Tensor:  # (B * S, T): the drawn tokens, <end> included
        return self.tokens != PAD_ID

    def words(self) -> list[list[int]]:
        """Each sample's word ids, without ``<end>`` and padding."""
        return [[t for t in row if t not in (EOS_ID, PAD_ID)] for row in self.tokens.tolist()]


@dataclass
class CaptionBatch:
    """A collated batch, for training (captions set) or evaluation (references set).

    Attributes:
        image_ids: B image identifiers.
        captions: (B * K, L) token ids ``<start> w_1 .. w_n <end> <pad> ..``, K of each image, image-major; or None
            for evaluation batches.
        images: (B, 3, H, W) preprocessed images, or None when ``features`` is set.
        features: cached encoder features, or None when ``images`` is set.
        references: for evaluation, every reference caption of each image (raw text), else None.
        captions_per_image: K (``data.captions_per_image``): the encoder runs once for an image's K captions.
    """

    image_ids: list[str]
    captions: Tensor | None = None
    images: Tensor | None = None
    features: EncoderOutput | None = None
    references: list[list[str]] | None = None
    captions_per_image: int = 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CaptionBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        features = None
        if self.features is not None:
            features = self.features.to(device, non_blocking=non_blocking)
        return CaptionBatch(
            self.image_ids, move(self.captions), move(self.images), features, self.references, self.captions_per_image
        )
