"""Load a trained captioner from a checkpoint and caption images with it."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from capkit.builder import build_captioner
from capkit.config import ExperimentConfig, to_container
from capkit.data.build import LoadedSplit, load_split
from capkit.data.transforms import build_transform
from capkit.data.vocab import Vocabulary
from capkit.engine.checkpoint import load_checkpoint
from capkit.errors import CheckpointError, ComponentNotFoundError
from capkit.models.captioner import Captioner
from capkit.recipes.experiment import build_eval_loader_for, decoding_settings
from capkit.registry import import_plugins
from capkit.types import Generation

__all__ = ["TrainedCaptioner", "load_trained", "load_eval_split", "caption_images", "SAFE_MODEL_KWARGS"]

log = logging.getLogger(__name__)


@dataclass
class TrainedCaptioner:
    model: Captioner  # in eval mode, on ``device``
    vocab: Vocabulary
    config: DictConfig  # the resolved experiment config the model was trained with
    device: torch.device

    @property
    def decoding(self) -> dict[str, Any]:
        """The decoding settings the run evaluated with: ``beam_size``, ``max_len``, ``length_penalty``."""
        return decoding_settings(self.config.eval)


def load_trained(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu", *, plugins: Sequence[str] = ()
) -> TrainedCaptioner:
    """Rebuild the model from the config stored in ``checkpoint`` (a directory such as
    ``RUN_DIR/checkpoints/best``) and load its weights, vocabulary and config.

    A checkpoint is data: this reads safetensors and JSON only, imports no module the checkpoint names (its
    config's ``plugins`` list is not imported) and lets no stored setting enable remote code
    (``trust_remote_code`` is forced off). Components from plugins resolve through installed entry points or
    through the modules the caller names in ``plugins``.
    """
    state = load_checkpoint(checkpoint)
    if not state.get("config") or not state.get("vocab"):
        raise CheckpointError(
            f"{checkpoint}: the checkpoint holds no config or vocabulary; was it written by `capkit train`?"
        )
    config = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), state["config"])
    import_plugins(list(plugins))
    vocab = Vocabulary(state["vocab"])  # the full id -> word list; the special tokens are re-added first
    try:
        model = build_captioner(_without_remote_code(to_container(config.model)), len(vocab))
    except ComponentNotFoundError as err:
        stored = list(config.plugins)
        hint = "" if not stored else (
            f" The checkpoint's config lists the plugin modules {stored}; a checkpoint is only data, so capkit "
            f"imports none of them: install the plugin, or name the module yourself (--plugin MODULE)."
        )
        raise ComponentNotFoundError(f"{checkpoint}: {err}{hint}") from err
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # a checkpoint edited by hand, or written by another model
        raise CheckpointError(f"{checkpoint}: its weights do not fit the model its config describes ({err})") from err
    device = torch.device(device)
    return TrainedCaptioner(model.to(device).eval(), vocab, config, device)


# what a checkpoint's encoder section may pass on to ``from_pretrained``: transformers also takes settings that
# fetch and run code (trust_remote_code, kernels from the hub as attn_implementation, use_kernels, ...)
SAFE_MODEL_KWARGS = {"revision", "dtype", "torch_dtype", "local_files_only"}


def _without_remote_code(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The model config with every ``model_kwargs`` cut down to ``SAFE_MODEL_KWARGS`` and ``trust_remote_code``
    off wherever it stands: what a checkpoint says must not make capkit fetch or run code."""
    def clean(section: Any) -> Any:
        if isinstance(section, Mapping):
            out = {k: False if k == "trust_remote_code" else clean(v) for k, v in section.items()}
            if isinstance(out.get("model_kwargs"), Mapping):
                dropped = sorted(set(out["model_kwargs"]) - SAFE_MODEL_KWARGS)
                if dropped:
                    log.warning("a checkpoint's model_kwargs %s are not passed on (a checkpoint is only data)", dropped)
                out["model_kwargs"] = {k: v for k, v in out["model_kwargs"].items() if k in SAFE_MODEL_KWARGS}
            return out
        return [clean(v) for v in section] if isinstance(section, list) else section

    return clean(model_cfg)


def load_eval_split(
    trained: TrainedCaptioner, split: str, dataset_overrides: Mapping[str, Any] | None = None
) -> tuple[LoadedSplit, DataLoader]:
    """A split of the dataset the model was trained on (``dataset_overrides``, e.g. another ``root``, win) and
    its evaluation batches, prepared as the run's data config says (cached features where it used them)."""
    data = trained.config.data
    dataset = {**to_container(data.dataset), **(dataset_overrides or {})}
    loaded = load_split(dataset, split, skip_missing_images=data.skip_missing_images)
    return loaded, build_eval_loader_for(trained.config, loaded, trained.model.encoder, trained.device)


def caption_images(
    trained: TrainedCaptioner,
    images: Sequence[Image.Image],
    *,
    beam_size: int = 3,
    max_len: int = 16,
    length_penalty: float = 0.0,
) -> tuple[list[str], Generation]:
    """Caption PIL images (preprocessed with the encoder's own transform); returns captions and the generation."""
    transform = build_transform(trained.model.encoder.data_config)
    batch = torch.stack([transform(img.convert("RGB")) for img in images]).to(trained.device)
    generation = trained.model.generate(batch, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty)
    return [trained.vocab.decode(tokens) for tokens in generation.tokens], generation
