"""An exported model (``capkit_onnx.OnnxCaptioner``) behind the interface of ``TrainedCaptioner`` that captioning
files uses (``decoding_with``, ``transform``, ``caption_pictures``, ``caption``), so that ``capkit caption
--runtime onnx`` and a server run onnxruntime with capkit's results, figures and output files."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from capkit.config import ExperimentConfig
from capkit.data.images import open_image
from capkit.data.transforms import visible_region
from capkit.errors import CheckpointError, ConfigError, MissingDependencyError
from capkit.pretrained.format import stored_decoding
from capkit.pretrained.model import CaptionResult
from capkit.types import Hypothesis

__all__ = ["OnnxRuntimeCaptioner", "load_onnx_model"]

INSTALL_RUNTIME = "pip install capkit-onnx (plugins/capkit-onnx in a capkit checkout)"


def load_onnx_model(directory: str | os.PathLike, *, threads: int | None = None) -> OnnxRuntimeCaptioner:
    """The folder ``capkit export --format onnx`` wrote, in onnxruntime on the CPU.

    Raises:
        MissingDependencyError: capkit-onnx (or onnxruntime) is not installed.
        CheckpointError: the folder is no ONNX export of this format, or a graph is missing.
    """
    try:
        import capkit_onnx
    except ImportError as err:
        raise MissingDependencyError(f"the ONNX runtime needs {err.name or 'capkit_onnx'}: {INSTALL_RUNTIME}") from err
    try:
        return OnnxRuntimeCaptioner(capkit_onnx.OnnxCaptioner.from_pretrained(directory, threads=threads))
    except capkit_onnx.OnnxModelError as err:
        raise CheckpointError(str(err)) from err


@dataclass
class OnnxRuntimeCaptioner:
    """``runtime`` (a ``capkit_onnx.OnnxCaptioner``) giving capkit's ``CaptionResult``s (torch tensors for the
    attention maps, so that the figures and output writers work unchanged)."""

    runtime: Any

    @property
    def architecture(self) -> str:
        return f"{self.runtime.config.get('architecture', 'exported model')} (onnxruntime)"

    @property
    def decoding(self) -> dict[str, Any]:
        return self.runtime.decoding

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.runtime.preprocessing

    @functools.cached_property
    def config(self) -> DictConfig:
        """Defaults of the settings captioning reads (``eval.batch_size``, ``data.max_image_pixels``)."""
        return OmegaConf.structured(ExperimentConfig)

    def decoding_with(self, **overrides: Any) -> dict[str, Any]:
        # only the settings given: a runtime older than one of capkit's settings refuses its name even as None
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - set(self.runtime.decoding))
        if unknown:
            raise ConfigError(f"the installed capkit-onnx has no decoding setting {', '.join(unknown)}: upgrade it "
                              f"({INSTALL_RUNTIME})")
        return self.runtime.decoding_with(**given)

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """An RGB picture -> the encoder's uint8 pixels (H, W, 3), as a tensor so that loaders can stack them."""
        return _Transform(self.runtime.preprocessing)

    def caption(self, images: Any, **decoding: Any) -> CaptionResult | list[CaptionResult]:
        """One image (path or PIL image) or several, as ``TrainedCaptioner.caption``."""
        single = isinstance(images, (str, os.PathLike, Image.Image))
        items = [images] if single else list(images)
        n_best = decoding.pop("n_best", 1)
        pictures = [(item.convert("RGB"), None) if isinstance(item, Image.Image)
                    else (open_image(item, max_pixels=self.config.data.max_image_pixels), os.fspath(item))
                    for item in items]
        results = self.caption_pictures(pictures, **self.decoding_with(**decoding), n_best=n_best)
        return results[0] if single else results

    def caption_pictures(
        self, pictures: Sequence[tuple[Image.Image, str | None]], *, beam_size: int, max_len: int,
        length_penalty: float, no_repeat_ngram_size: int = 0, suppress_unk: bool = False,
        inputs: torch.Tensor | None = None, n_best: int = 1,
    ) -> list[CaptionResult]:
        """One beam search over opened RGB pictures; ``inputs``: their ``transform``-ed pixels (B, H, W, 3). The
        settings newer than the first runtime go to it only where they do something: an older runtime refuses
        their names."""
        if inputs is None:
            pixels = np.stack([self.runtime.preprocess(picture) for picture, _ in pictures])
        else:
            pixels = inputs.numpy()
        found = self.runtime.caption_pixels(pixels, [source for _, source in pictures], beam_size=beam_size,
                                            max_len=max_len, length_penalty=length_penalty, n_best=n_best,
                                            **stored_decoding(dict(no_repeat_ngram_size=no_repeat_ngram_size,
                                                                   suppress_unk=suppress_unk)))
        results = []
        for (picture, source), result in zip(pictures, found):
            best = result.hypothesis
            alphas = torch.from_numpy(np.ascontiguousarray(best.alphas))
            results.append(CaptionResult(
                caption=result.caption, score=result.score, words=result.words,
                attention=alphas.view(-1, *self.runtime.grid), image=picture,
                region=visible_region(*picture.size, self.preprocessing),
                hypothesis=Hypothesis(best.tokens, best.score, best.norm_score, alphas), source=source,
                n_best=result.n_best,
            ))
        return results


class _Transform:
    """A picklable transform (loader workers receive it): picture -> uint8 pixels (H, W, 3) as a tensor."""

    def __init__(self, preprocessing: dict[str, Any]):
        self.preprocessing = preprocessing

    def __call__(self, picture: Image.Image) -> torch.Tensor:
        from capkit_onnx import preprocess

        return torch.from_numpy(preprocess(picture, self.preprocessing))
