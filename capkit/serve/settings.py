"""The server's limits and batching, importable without FastAPI (``capkit demo --help`` shows the defaults)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits and batching (``capkit demo`` flags of the same names)."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000  # a 40-megapixel photo decodes to 120 MB of RGB; larger is refused
    timeout: float = 30.0  # seconds a request may wait for its caption
    max_batch: int = 16  # 1: no batching
    max_wait: float = 0.01  # seconds a request waits for others to share its beam search
    max_beam: int = 10  # the largest beam_size (and n_best) a request may ask for
    max_len: int = 50  # the largest max_len a request may ask for
    model_name: str = "model"  # shown by the page and /health
