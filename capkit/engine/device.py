"""Device and mixed-precision choice."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from capkit.errors import ConfigError, DeviceUnavailableError

__all__ = ["resolve_device", "resolve_amp_dtype", "autocast", "cpu_has_native_bf16", "cpu_name", "AMP_MODES"]

AMP_MODES = ("auto", "bf16", "fp16", "none")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; otherwise the named device (``cpu``, ``cuda:1``).

    Raises:
        DeviceUnavailableError: a device capkit does not run on (``tpu``, ``meta``), or one this machine lacks
            (CUDA or MPS); the message lists the choices.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = "auto, cpu, cuda, cuda:N" + (", mps" if torch.backends.mps.is_built() else "")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceUnavailableError(f"device {str(device)!r} is no device; choose one of {choices}") from err
    if dev.type not in ("cpu", "cuda", "mps"):  # torch names more (meta, xla, ...), which capkit does not run on
        raise DeviceUnavailableError(f"device {str(device)!r} is not one capkit runs on; choose one of {choices}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {str(device)!r} was asked for but CUDA is not available; use device=auto or cpu"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(f"device {str(device)!r} was asked for but MPS is not available; use "
                                     f"device=auto or cpu")
    return dev


def resolve_amp_dtype(amp: str, device: torch.device, *, key: str = "amp") -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for full precision.

    ``auto`` is bf16 on CUDA devices that support it, fp16 on older CUDA devices (trained with a GradScaler)
    and none on CPU. ``bf16`` works on a CPU with native bf16 arithmetic (``cpu_has_native_bf16``); elsewhere
    torch emulates it, slower than fp32, so it is refused. ``fp16`` needs CUDA. ``key`` names the setting in
    the messages (``train.amp``, ``eval.amp``).

    Raises:
        ConfigError: an unknown mode, or fp16 without CUDA (a ValueError too).
        DeviceUnavailableError: bf16 on a device without it.
    """
    if amp not in AMP_MODES:
        raise ConfigError(f"{key} must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    cuda = device.type == "cuda"
    if amp == "none" or (amp == "auto" and not cuda):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and not cuda:
        raise ConfigError(f"{key}=fp16 needs a CUDA device, this runs on {device}; use {key}=bf16 or none")
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailableError(f"{torch.cuda.get_device_name(device)} does not support bf16; use {key}=fp16 "
                                     f"or auto")
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise DeviceUnavailableError(
            f"{key}=bf16: this CPU ({cpu_name()}) has no native bf16 arithmetic (AVX-512 BF16 or AMX), where torch "
            f"emulates it more slowly than fp32; use {key}=none"
        )
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing for None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX tiles), where a bf16 matrix product is about
    twice as fast as fp32's; read from torch's CPU feature checks, else from /proc/cpuinfo."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's word for it."""
    import platform

    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        return next(set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
