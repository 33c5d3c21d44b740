"""What every benchmark shares: the machine's description, device synchronisation and the results file."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from capkit.engine.device import cpu_has_native_bf16
from capkit.errors import CapkitError

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, the vector instructions torch uses on it and whether it computes bf16 natively, cores,
    threads, torch and Python versions, load average and the CUDA device (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": cpu_has_native_bf16(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_1min": os.getloadavg()[0],
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that host clocks time it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], warmup: int, timed: int) -> float:
    """Median seconds of ``timed`` calls of ``fn`` after ``warmup`` untimed ones (allocator, oneDNN primitives)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(name: str, device: torch.device, payload: dict) -> Path:
    """Write ``results/NAME.json`` (``NAME_cuda.json`` for a CUDA run, so both are kept) with the machine."""
    path = RESULTS_DIR / (f"{name}_cuda.json" if device.type == "cuda" else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    print(f"wrote {path}")
    return path


def run_script(main: Callable[[], object]) -> None:
    """Run a probe's ``main()`` from the command line: a user's mistake (a missing dataset or checkpoint, a bad
    key) ends in capkit's one-line message, not a traceback."""
    try:
        main()
    except CapkitError as err:
        sys.exit(f"{Path(sys.argv[0]).stem}: error: {err}")
