"""Which layers bf16 autocast on the CPU differentiates in fp32.

oneDNN's bf16 depthwise convolution with a kernel larger than 3 x 3 is slow to differentiate: on an AVX-512 BF16
CPU (no AMX), forward and backward of EfficientNet-Lite2's 5 x 5 depthwise convolutions take 3-6x as long in bf16 as
in fp32 (its 3 x 3 ones are faster in bf16), while they hold a small share of the network's arithmetic. So while
autograd records such a convolution (one that trains, or one that an earlier trained layer feeds), ``Trainer``
under ``train.amp=bf16`` on the CPU computes it in fp32 and hands its output on in bf16; without autograd
(evaluation, a frozen trunk) it stays in bf16 as autocast has it. ``python -m benchmarks bf16_finetune`` measures
both.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["keep_depthwise_fp32", "is_depthwise", "is_slow_in_bf16", "DepthwiseFp32OnCpu"]

_FP32_CLASSES: dict[type, type] = {}  # a convolution class -> its subclass with DepthwiseFp32OnCpu


class DepthwiseFp32OnCpu:
    """Mixin of a depthwise convolution that computes in fp32 under CPU autocast while autograd records it."""

    def forward(self, x: Tensor) -> Tensor:
        records = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not (records and torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            y = super().forward(x.float())
        return y.to(torch.get_autocast_dtype("cpu"))  # what follows runs as it would without this

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        """Pickled as its base class's object, swapped again on loading (the subclass is made at run time); the
        object exists before its state is set, as pickle's default has it, so that a state referring to it works."""
        return _new_swapped, (type(self).__bases__[1],), self.__getstate__()


def _new_swapped(base: type) -> nn.Module:
    module = base.__new__(base)
    _swap(module)
    return module


def _swap(module: nn.Module) -> None:
    cls = type(module)
    if cls not in _FP32_CLASSES:
        _FP32_CLASSES[cls] = type(f"{cls.__name__}Fp32OnCpu", (DepthwiseFp32OnCpu, cls), {})
    module.__class__ = _FP32_CLASSES[cls]


def is_depthwise(module: nn.Module) -> bool:
    """A 2-D convolution with one filter group per input channel (timm's ``Conv2dSame`` included)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def is_slow_in_bf16(module: nn.Module) -> bool:
    """A depthwise convolution with a kernel larger than 3 x 3 (see the module's docstring)."""
    return is_depthwise(module) and max(module.kernel_size) > 3


def keep_depthwise_fp32(model: nn.Module) -> int:
    """Give every depthwise convolution of ``model`` with a kernel larger than 3 x 3 the ``DepthwiseFp32OnCpu``
    behaviour, in place; returns how many.

    Each keeps its class's behaviour (a subclass of it is swapped in), its weights and its ``state_dict`` keys, and
    copies and pickles as before; outside CPU autocast or autograd it computes exactly as before. Calling it twice
    changes nothing more.
    """
    swapped = [m for m in model.modules() if is_slow_in_bf16(m) and not isinstance(m, DepthwiseFp32OnCpu)]
    for module in swapped:
        _swap(module)
    return len(swapped)
