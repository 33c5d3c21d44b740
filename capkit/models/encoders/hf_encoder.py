"""The ``hf`` encoder: any Hugging Face ``transformers`` vision model as a grid of image features.

``transformers`` is imported when an ``hf`` encoder is built, not when capkit is imported (it is slow to
import and only this encoder needs it).
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capkit.errors import MissingDependencyError, WeightsUnavailableError
from capkit.models.encoders.base import Encoder
from capkit.registry import ENCODERS
from capkit.types import EncoderOutput

__all__ = ["HFEncoder", "FINETUNE_MODES", "IMAGENET_MEAN", "IMAGENET_STD"]

FINETUNE_MODES = ("none", "last", "all")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# where the transformer blocks (or the stages of hierarchical models) live, first match wins
_LAYER_LISTS = ("encoder.layer", "encoder.layers", "encoder.stages", "layers", "stages", "blocks")
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
INSTALL_HF = "the hf encoder needs transformers: pip install 'capkit-captioning[hf]'"


@ENCODERS.register("hf")
class HFEncoder(Encoder):
    """Wraps a ``transformers`` vision model: images (B, 3, H, W) -> EncoderOutput(feats (B, N, C), grid (h, w)).

    The features are the model's ``last_hidden_state``. Token outputs (ViT, DeiT, BEiT, DINOv2 with or
    without registers, CLIP/SigLIP vision towers, Swin) lose their class, distillation and register tokens:
    the grid (h, w) follows from the image size and the model's patch size (times 2 per extra stage for
    hierarchical models such as Swin), and the tokens before the h * w patch tokens are dropped. Feature-map
    outputs (B, C, h, w) (ConvNeXt, ResNet) are flattened. For a dual image-text checkpoint (CLIP, SigLIP)
    only the vision tower is loaded.

    Preprocessing comes from the checkpoint's own image processor (``AutoImageProcessor``), mapped to a
    timm-style ``data_config`` (input_size, mean, std, interpolation, crop_pct, crop_mode) so capkit's
    transforms and feature cache work unchanged; without a processor (a randomly initialised ``config``, or
    a directory saved without one) it is ImageNet mean/std at the config's ``image_size``.

    Args:
        model_name: a hub id (``google/vit-base-patch16-224``, ``facebook/dinov2-small``, ...) or a local
            directory written by ``save_pretrained``. With ``HF_HUB_OFFLINE=1`` only the local cache is read.
        config: instead of ``model_name``, a config dict for a randomly initialised model, e.g.
            ``{model_type: vit, hidden_size: 384, image_size: 224, patch_size: 16}`` (``AutoConfig.for_model``).
        pretrained: with ``model_name``, load its weights (default); false builds the architecture of
            ``model_name`` with random weights.
        finetune: ``none`` (frozen, kept in eval mode), ``last`` (train the last ``finetune_layers``
            transformer layers, or stages for hierarchical models, plus the final normalisation) or ``all``.
        finetune_layers: how many of the last layers train when ``finetune`` is ``last``.
        model_kwargs: extra keyword arguments for ``from_pretrained`` (``revision``, ``local_files_only``,
            ``trust_remote_code``, ``dtype`` ...).

    Trainable parameters that do not reach ``last_hidden_state`` (poolers, a CLIP tower's post-layernorm,
    DINOv2's mask token) are frozen, found by one probe forward/backward at build time, so that every
    trainable parameter gets a gradient (DDP requires it).
    """

    def __init__(
        self,
        model_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        pretrained: bool = True,
        finetune: str = "none",
        finetune_layers: int = 1,
        model_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"encoder finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
        if (model_name is None) == (config is None):
            raise ValueError(
                "hf encoder: set exactly one of model_name (a hub id or a save_pretrained directory) "
                "or config (a dict with model_type, for a randomly initialised model)"
            )
        _require_transformers()
        kwargs = dict(model_kwargs or {})
        self.model_name = model_name if model_name is not None else f"random-{dict(config).get('model_type')}"
        self.config_dict = None if config is None else _plain(config)
        self.revision = kwargs.get("revision")
        if config is not None:
            self.weights = "random"
            self.model, processor = _random_model(self.config_dict), None
        else:
            self.weights = "pretrained" if pretrained else "random"
            self.model, processor = _load(model_name, pretrained, kwargs)
        self.config = self.model.config
        self._out_channels = _channels(self.config)
        self._data_config = _data_config(processor, self.config)
        self.finetune = finetune
        self._patch_stride = _patch_stride(self.config)
        self._interpolates = True  # until the model refuses interpolate_pos_encoding
        self.model.eval()  # the probes below must not update batch-norm statistics or draw dropout masks
        self._set_trainable(finetune, finetune_layers)
        if self._out_channels is None:  # neither hidden_size nor hidden_sizes: ask the model
            with torch.no_grad():
                self._out_channels = int(self(self._probe_images()).feats.shape[-1])  # (B, N, C)
        self.train()  # a frozen encoder starts in eval mode too, not only after the first train()

    # ------------------------------------------------------------------------------------------ training
    def _set_trainable(self, finetune: str, layers: int) -> None:
        self.model.requires_grad_(finetune == "all")
        if finetune == "last":
            path, blocks = _layer_list(self.model)
            if not 1 <= layers <= len(blocks):
                raise ValueError(f"finetune_layers must be in 1..{len(blocks)} for {self.model_name}, got {layers}")
            names = [n for n, _ in self.model.named_parameters()]
            last_block = max(i for i, n in enumerate(names) if n.startswith(f"{path}."))
            trainable = {f"{path}.{len(blocks) - k}." for k in range(1, layers + 1)}
            for i, (name, param) in enumerate(self.model.named_parameters()):
                # the chosen blocks, and what comes after the block list (the final normalisation)
                param.requires_grad_(any(name.startswith(t) for t in trainable) or i > last_block)
        if finetune != "none":
            self._freeze_unused()

    def _freeze_unused(self) -> None:
        """Freeze trainable parameters that get no gradient from the features (poolers, unused tokens)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                self._features(self._probe_images()).float().sum().backward()
            for param in self.model.parameters():
                if param.requires_grad and param.grad is None:
                    param.requires_grad_(False)
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)

    def _probe_images(self) -> Tensor:
        _, h, w = self.data_config["input_size"]
        param = next(self.model.parameters())
        return torch.zeros(1, 3, h, w, dtype=param.dtype, device=param.device)

    @classmethod
    def architecture_config(cls, section: dict[str, Any]) -> dict[str, Any]:
        return {**section, "pretrained": False}  # the model's config and processor are still read by name

    @property
    def out_channels(self) -> int:
        return self._out_channels

    @property
    def data_config(self) -> dict[str, Any]:
        return self._data_config

    def cache_key(self) -> dict[str, Any]:
        """What identifies this encoder's features, for the feature cache."""
        key: dict[str, Any] = {"encoder": "hf", "model_name": self.model_name, "weights": self.weights}
        if self.revision:
            key["revision"] = self.revision
        if self.config_dict is not None:
            key["config"] = self.config_dict
        elif self.model_name and Path(self.model_name).expanduser().is_dir():
            key["files"] = _directory_fingerprint(Path(self.model_name).expanduser())
        return key

    # ------------------------------------------------------------------------------------------ forward
    def _features(self, images: Tensor) -> Tensor:
        """The model's last hidden state; position embeddings interpolated to another size than the config's,
        where the model takes ``interpolate_pos_encoding`` (the others size their embeddings themselves)."""
        if self._interpolates and tuple(images.shape[-2:]) != _pair(getattr(self.config, "image_size", 0)):
            try:
                return self.model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
            except TypeError as err:
                if "interpolate_pos_encoding" not in str(err):
                    raise
                self._interpolates = False
        return self.model(pixel_values=images).last_hidden_state

    def forward(self, images: Tensor) -> EncoderOutput:
        with self.no_grad_if_frozen():
            x = self._features(images)
        if x.dim() == 4:  # (B, C, h, w) feature map
            b, c, h, w = x.shape
            return EncoderOutput(x.flatten(2).transpose(1, 2), (h, w))
        h, w = _token_grid(x.shape[1], tuple(images.shape[-2:]), self._patch_stride)
        return EncoderOutput(x[:, x.shape[1] - h * w :], (h, w))  # prefix tokens (CLS, registers) dropped


# ---------------------------------------------------------------------------------------------- loading
def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_ENV)


def _require_transformers() -> None:
    """Import transformers (the ``hf`` extra); ``MissingDependencyError`` without it."""
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(INSTALL_HF) from err


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config from omegaconf (DictConfig) or YAML as plain dicts and lists."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return {k: (_plain(v) if isinstance(v, Mapping) else v) for k, v in config.items()}


def _random_model(config: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise ValueError("hf encoder config needs a model_type, e.g. {model_type: vit, hidden_size: 384, ...}")
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
    except ValueError as err:
        raise ValueError(f"hf encoder config: {err}") from err
    return _vision_model(hf_config, None, {})


def _vision_model(config: Any, source: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """The vision model for ``config`` (the vision tower of a dual config), from ``source`` or random."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None and type(vision_config) in MODEL_MAPPING:  # CLIP, SigLIP, ...: vision tower only
        config = vision_config
    if type(config) not in MODEL_MAPPING:
        raise ValueError(f"hf encoder: transformers has no AutoModel for model_type {config.model_type!r}")
    cls = MODEL_MAPPING[type(config)]
    try:  # no pooler where the class has one to leave out (ViT, DeiT, BEiT): the features are the hidden states
        return _instantiate(cls, config, source, {**kwargs, "add_pooling_layer": False})
    except TypeError as err:
        if "add_pooling_layer" not in str(err):
            raise
        return _instantiate(cls, config, source, kwargs)


# ``from_pretrained``'s own keyword arguments: where to find the weights and in which dtype to load them
LOADING_KWARGS = ("revision", "local_files_only", "trust_remote_code", "token", "dtype", "torch_dtype")


def _instantiate(cls: type, config: Any, source: str | None, kwargs: dict[str, Any]) -> nn.Module:
    if source is not None:
        return cls.from_pretrained(source, config=config, **kwargs)
    # a random model (its weights come from a saved capkit model) takes no loading arguments
    model = cls(config, **{k: v for k, v in kwargs.items() if k not in LOADING_KWARGS})
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    return model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype) if dtype not in (None, "auto") else model


def _load(name: str, pretrained: bool, kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoImageProcessor

    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name  # hub ids: org/name
    if path.is_dir():
        source, kwargs = str(path), {**kwargs, "local_files_only": True}
    elif looks_local or path.exists():
        raise FileNotFoundError(
            f"hf encoder: {name!r} is not a directory. Give a directory written by save_pretrained "
            f"(config.json + weights), or a hub id such as 'google/vit-base-patch16-224'"
        )
    else:
        source = name
        if _offline():
            kwargs = {**kwargs, "local_files_only": True}
    hub_kwargs = {k: kwargs[k] for k in ("revision", "local_files_only", "trust_remote_code", "token") if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
        model = _vision_model(config, source if pretrained else None, kwargs)
    except (OSError, ValueError) as err:
        if path.is_dir():
            raise WeightsUnavailableError(f"hf encoder: could not load the model in {path} ({err})") from err
        offline = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if _offline() else ""
        raise WeightsUnavailableError(
            f"hf encoder: could not load {name!r} from the Hugging Face hub{offline}: {err}\n"
            f"Check the name (hub ids look like 'google/vit-base-patch16-224'). Without internet, download it on "
            f"a connected machine (model.save_pretrained(DIR); AutoImageProcessor...save_pretrained(DIR)) and "
            f"give model_name: DIR, or fill the hub cache there and set HF_HUB_OFFLINE=1 here."
        ) from err
    try:
        processor = AutoImageProcessor.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError, KeyError):  # no preprocessor_config.json: defaults from the config
        processor = None
    return model, processor


# ---------------------------------------------------------------------------------------------- sizes
def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def _channels(config: Any) -> int | None:
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    sizes = getattr(config, "hidden_sizes", None)
    return int(sizes[-1]) if sizes else None


def _patch_stride(config: Any) -> tuple[int, int] | None:
    """Pixels per output token: the patch size, times 2 per stage after the first (Swin-like models)."""
    patch = getattr(config, "patch_size", None)
    if not patch:
        return None
    ph, pw = _pair(patch)
    depths = getattr(config, "depths", None)
    factor = 2 ** (len(depths) - 1) if depths else 1
    return ph * factor, pw * factor


def _token_grid(num_tokens: int, image_hw: tuple[int, int], stride: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of the patch tokens among ``num_tokens``; the rest are prefix tokens (class, registers)."""
    candidates: list[tuple[int, int]] = []
    if stride is not None:
        (h, w), (sh, sw) = image_hw, stride
        candidates = [(h // sh, w // sw), (math.ceil(h / sh), math.ceil(w / sw))]  # conv patching / padding
    else:
        side = math.isqrt(num_tokens)
        candidates = [(s, s) for s in range(side, max(side - 2, 0), -1)]
    fits = [(gh, gw) for gh, gw in candidates if 0 < gh * gw <= num_tokens and num_tokens - gh * gw < 64]
    if not fits:
        raise ValueError(
            f"hf encoder: cannot arrange {num_tokens} output tokens of a {image_hw[0]}x{image_hw[1]} image into "
            f"a patch grid (stride {stride}); is this a vision model with patch tokens?"
        )
    return min(fits, key=lambda g: num_tokens - g[0] * g[1])


# ---------------------------------------------------------------------------------------------- preprocessing
def _data_config(processor: Any, config: Any) -> dict[str, Any]:
    """A timm-style data config from the model's image processor (or defaults from its config)."""
    size = _pair(getattr(config, "image_size", None) or DEFAULT_IMAGE_SIZE)
    default = {
        "input_size": (3, *size),
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    if processor is None or getattr(processor, "image_mean", None) is None:
        return default
    mean, std = tuple(float(m) for m in processor.image_mean), tuple(float(s) for s in processor.image_std)
    if getattr(processor, "do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resize = _size(getattr(processor, "size", None))
    crop = _size(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    out = {**default, "mean": mean, "std": std, "interpolation": _interpolation(getattr(processor, "resample", None))}
    if crop is not None and "height" in crop:  # resize (shortest edge), then centre crop
        out["input_size"] = (3, crop["height"], crop["width"])
        edge = resize.get("shortest_edge") if resize else None
        if edge is None and resize and "height" in resize:
            edge = min(resize["height"], resize["width"])
        pct = getattr(processor, "crop_pct", None)  # ConvNeXt's processor states it
        out["crop_pct"] = float(pct) if pct else (min(crop["height"], crop["width"]) / edge if edge else 1.0)
    elif resize and "height" in resize:  # resize to exactly (height, width), aspect ignored
        out.update(input_size=(3, resize["height"], resize["width"]), crop_mode="squash", crop_pct=1.0)
    elif resize and resize.get("shortest_edge"):
        edge = resize["shortest_edge"]
        pct = getattr(processor, "crop_pct", None)
        out.update(input_size=(3, edge, edge), crop_pct=float(pct) if pct else 1.0)
    return out


def _size(size: Any) -> dict[str, int] | None:
    """A processor's size (dict or SizeDict) as {height, width} or {shortest_edge}, keeping the set keys."""
    if size is None:
        return None
    if isinstance(size, (int, float)):
        return {"height": int(size), "width": int(size)}
    get = size.get if isinstance(size, Mapping) else lambda k: getattr(size, k, None)
    out = {k: int(get(k)) for k in ("height", "width", "shortest_edge") if get(k)}
    if "height" in out and "width" not in out:
        out["width"] = out["height"]
    return out or None


def _interpolation(resample: Any) -> str:
    if resample is None:
        return "bicubic"
    if isinstance(resample, int) and not hasattr(resample, "name"):
        return _RESAMPLE_NAMES.get(resample, "bicubic")
    value = getattr(resample, "value", None)  # PIL Resampling or torchvision InterpolationMode
    if isinstance(value, str):
        return value if value in _RESAMPLE_NAMES.values() else "bicubic"
    name = str(getattr(resample, "name", resample)).lower()
    return name if name in _RESAMPLE_NAMES.values() else _RESAMPLE_NAMES.get(value, "bicubic")


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for path in _LAYER_LISTS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module):
            return path, module
    raise ValueError(
        f"hf encoder: finetune 'last' needs the model's layer list (one of {', '.join(_LAYER_LISTS)}); "
        f"{type(model).__name__} has none, use finetune: all"
    )


def _directory_fingerprint(path: Path) -> str:
    """Names, sizes and modification times of a model directory's files (changes when they are rewritten)."""
    items = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in path.iterdir() if p.is_file())
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
