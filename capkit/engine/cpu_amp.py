"""Which layers stay in fp32 under bf16 autocast on the CPU.

oneDNN's bf16 depthwise convolution is slow to differentiate: on an AVX-512 BF16 CPU (no AMX) the backward pass of
EfficientNet-Lite2's 5 x 5 depthwise convolutions takes 2-5x as long in bf16 as in fp32, while they hold a small
share of the network's arithmetic. Training the encoder's last stages under ``train.amp=bf16`` therefore runs them
in fp32 and everything else in bf16 (``python -m benchmarks finetune_step`` measures both).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["keep_depthwise_fp32", "is_depthwise"]

_FP32_CLASSES: dict[type, type] = {}  # a convolution class -> its fp32-under-CPU-autocast subclass


class _Fp32UnderCpuAutocast:
    """Mixin: the convolution's forward computes in fp32 when CPU autocast is on, and is unchanged otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float())


def is_depthwise(module: nn.Module) -> bool:
    """A 2-D convolution with one filter group per input channel (timm's ``Conv2dSame`` included)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def keep_depthwise_fp32(model: nn.Module) -> int:
    """Make every depthwise convolution of ``model`` compute in fp32 under CPU autocast, in place; returns how many.

    Each keeps its class's behaviour (a subclass of it is swapped in), its weights and its ``state_dict`` keys;
    outside CPU autocast it computes exactly as before. Calling it twice changes nothing more.
    """
    count = 0
    for module in model.modules():
        if is_depthwise(module) and not isinstance(module, _Fp32UnderCpuAutocast):
            cls = type(module)
            if cls not in _FP32_CLASSES:
                _FP32_CLASSES[cls] = type(f"{cls.__name__}Fp32OnCpu", (_Fp32UnderCpuAutocast, cls), {})
            module.__class__ = _FP32_CLASSES[cls]
            count += 1
    return count
