"""Device and mixed-precision choice."""
from __future__ import annotations

import torch

from capkit.errors import DeviceUnavailableError

__all__ = ["resolve_device", "resolve_amp_dtype", "AMP_MODES"]

AMP_MODES = ("auto", "bf16", "fp16", "none")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; otherwise the named device (``cpu``, ``cuda:1``).

    Raises:
        RuntimeError: a CUDA device is asked for on a machine without one.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {str(device)!r} was asked for but CUDA is not available; use device=auto or cpu"
        )
    return dev


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for full precision.

    ``auto`` is bf16 on CUDA devices that support it, fp16 on older CUDA devices (trained with a GradScaler)
    and none on CPU. ``bf16`` also works on CPU; ``fp16`` needs CUDA.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    cuda = device.type == "cuda"
    if amp == "none" or (amp == "auto" and not cuda):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and not cuda:
        raise ValueError(f"amp=fp16 needs a CUDA device, the trainer runs on {device}; use amp=bf16 or none")
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} does not support bf16; use amp=fp16 or auto")
    return torch.bfloat16 if amp == "bf16" else torch.float16
