"""The HTTP endpoint under load: N concurrent clients on localhost post photos to ``POST /caption`` of a ``capkit
demo`` server for a bounded time, with batching on (concurrent requests share one beam search) and off
(``--max-batch 1``), in the same run.

The server is ``capkit demo --model sat-flickr8k --port 0`` (the shipped model: EfficientNet-Lite2 + Bahdanau +
Show, Attend and Tell, beam 3) in a process of its own; the clients are one asyncio process (httpx). Images: the
Flickr8k dev photos of ../shared/data when present, else generated 500 x 375 JPEGs. Reports requests/s, latency
percentiles, errors (anything but 200 counts) and the server's peak resident memory (``VmHWM``), and the batch
sizes the server ran (``/health``). Writes ``benchmarks/results/bench_serve.json``.

    python -m benchmarks serve                     # 16 clients, 30 s per setting after 5 s of warm-up
    CLIENTS=32 DURATION=60 python -m benchmarks serve
"""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.bench_caption_folder import _field_kb, _images
from benchmarks.common import write_results

CLIENTS = int(os.environ.get("CLIENTS", 16))
SECONDS = float(os.environ.get("DURATION", 30))
WARMUP = 5.0
PHOTOS = 64
SETTINGS = {  # name -> capkit demo flags
    "batching on (max batch 16, 10 ms window)": ["--max-batch", "16", "--max-wait-ms", "10"],
    "batching off (max batch 1)": ["--max-batch", "1"],
}


def _start_server(flags: list[str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "capkit", "demo", "--model", "sat-flickr8k", "--device", "cpu", "--port", "0",
               *flags]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()  # "capkit demo: sat-flickr8k at http://127.0.0.1:PORT  (API: ...)"
    if " at http://" not in line:
        server.kill()
        raise RuntimeError(f"capkit demo did not start: {line!r}")
    return server, line.split(" at ", 1)[1].split()[0]


async def _load(url: str, photos: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` loops posting photos (each client its own turn through them) for ``seconds``; the latency of
    each request that ended in that time, and the errors."""
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def client(index: int, deadline: float) -> None:
        turn = index
        async with httpx.AsyncClient(timeout=120) as http:
            while time.perf_counter() < deadline:
                photo = photos[turn % len(photos)]
                turn += clients
                start = time.perf_counter()
                try:
                    reply = await http.post(f"{url}/caption", content=photo)
                    status = str(reply.status_code)
                except httpx.HTTPError as err:
                    status = type(err).__name__
                if status == "200":
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[status] = errors.get(status, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(client(i, start + seconds) for i in range(clients)))
    elapsed = time.perf_counter() - start  # the last requests end after the deadline: count their time too
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "latency_ms": {"p50": round(cuts[49] * 1000, 1), "p95": round(cuts[94] * 1000, 1),
                           "p99": round(cuts[98] * 1000, 1), "max": round(max(latencies) * 1000, 1)},
            "errors": sum(errors.values()), "error_kinds": errors}


def _run(flags: list[str], photos: list[bytes]) -> dict:
    server, url = _start_server(flags)
    try:
        asyncio.run(_load(url, photos, CLIENTS, WARMUP))
        result = asyncio.run(_load(url, photos, CLIENTS, SECONDS))
        result["server_batches"] = httpx.get(f"{url}/health").json()["stats"]["call_sizes"]
        result["server_peak_mb"] = round(_field_kb(f"/proc/{server.pid}/status", "VmHWM:") / 1024, 1)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return result


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths, source = _images(Path(tmp), PHOTOS)
        photos = [p.read_bytes() for p in paths]
    print(f"{CLIENTS} clients, {SECONDS:g} s per setting after {WARMUP:g} s of warm-up; {source}")
    runs = {}
    for name, flags in SETTINGS.items():
        runs[name] = _run(flags, photos)
        r = runs[name]
        print(f"{name:<42} {r['requests_per_s']:6.2f} req/s  p50 {r['latency_ms']['p50']:7.1f} ms  p95 "
              f"{r['latency_ms']['p95']:7.1f} ms  p99 {r['latency_ms']['p99']:7.1f} ms  errors {r['errors']}  "
              f"peak {r['server_peak_mb']:,.0f} MB", flush=True)
    on, off = (runs[name]["requests_per_s"] for name in SETTINGS)
    print(f"batching on / off: {on / off:.2f}x the requests per second")
    write_results("bench_serve", torch.device("cpu"), {
        "model": "sat-flickr8k (beam 3)", "images": source, "clients": CLIENTS, "seconds": SECONDS,
        "warmup_seconds": WARMUP, "runs": runs, "throughput_ratio_on_off": round(on / off, 3),
    })


if __name__ == "__main__":
    main()
