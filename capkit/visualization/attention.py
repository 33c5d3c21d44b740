"""Per-word attention figures: a pure function of (image, words, alphas, grid).

Works for every registered attention (it only needs ``alphas (T, N)`` and the grid) and never opens a
window: figures are ``matplotlib.figure.Figure`` objects rendered by the Agg canvas.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from capkit.data.transforms import visible_region
from capkit.types import EOS, Hypothesis

__all__ = [
    "upsample_attention",
    "overlay",
    "attention_figure",
    "figure_array",
    "save_attention_figure",
    "caption_figure",
    "caption_figure_array",
    "save_caption_figure",
]


def upsample_attention(alpha: torch.Tensor | np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """alpha (N,) on an (H, W) grid -> (height, width) map, bilinearly upsampled (smooth, not blocky).

    The map is scaled to [0, 1] by its maximum; cells the attention gave exactly 0 (outside a Luong-local
    window) stay near 0.
    """
    h, w = grid
    cells = torch.as_tensor(np.asarray(alpha, dtype=np.float32)).reshape(1, 1, h, w)
    big = F.interpolate(cells, size=size, mode="bilinear", align_corners=False)[0, 0]
    peak = float(big.max())
    return (big / peak).numpy() if peak > 0 else big.numpy()


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """Blend an image (height, width, 3) uint8 with a heat map (height, width) in [0, 1]: where attention is
    low the image is darkened, where it is high it shows through tinted by the colour map."""
    base = image.astype(np.float32) / 255.0
    tint = colormaps["inferno"](heat)[..., :3]
    light = heat[..., None]
    blended = base * (1 - strength + strength * light) * (1 - strength / 2) + tint * light * strength / 2
    return (np.clip(blended, 0, 1) * 255).astype(np.uint8)


def attention_figure(
    image: Image.Image | np.ndarray,
    words: Sequence[str],
    alphas: torch.Tensor | np.ndarray,
    grid: tuple[int, int],
    *,
    columns: int = 5,
    panel_size: float = 2.4,
    title: str | None = None,
    region: tuple[float, float, float, float] | None = None,
) -> Figure:
    """The image, then one panel per word with its attention map overlaid (the word as the panel's title).

    Args:
        image: the original picture (any size).
        words: T words, one per row of ``alphas`` (usually the caption's words plus ``<end>``).
        alphas: (T, N) attention weights, N == H * W.
        grid: (H, W) of the encoder's feature grid.
        columns: panels per row.
        panel_size: inches per panel.
        title: the figure's title (e.g. the full caption).
        region: (x0, y0, x1, y1), the part of the image the encoder saw (its centre crop, see
            ``capkit.data.transforms.visible_region``); the grid is laid over it. Default: the whole image.
    """
    alphas = np.asarray(alphas.detach().cpu() if isinstance(alphas, torch.Tensor) else alphas, dtype=np.float32)
    if alphas.ndim != 2 or alphas.shape[0] != len(words) or alphas.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"alphas {alphas.shape} must be (len(words)={len(words)}, H*W={grid[0] * grid[1]}) for grid {grid}"
        )
    picture = np.asarray((Image.fromarray(image) if isinstance(image, np.ndarray) else image).convert("RGB"))
    size = picture.shape[:2]
    panels = len(words) + 1
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(panel_size * min(columns, panels), panel_size * rows + (0.4 if title else 0)))
    FigureCanvasAgg(fig)
    for i in range(rows * min(columns, panels)):
        ax = fig.add_subplot(rows, min(columns, panels), i + 1)
        ax.set_axis_off()
        if i == 0:
            ax.imshow(picture)
            ax.set_title("image", fontsize=10)
        elif i < panels:
            ax.imshow(overlay(picture, _heat(alphas[i - 1], grid, size, region)))
            ax.set_title(words[i - 1], fontsize=11)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _heat(alpha: np.ndarray, grid: tuple[int, int], size: tuple[int, int], region) -> np.ndarray:
    """The upsampled map over ``region`` of an image of ``size`` (height, width), 0 outside it."""
    if region is None:
        return upsample_attention(alpha, grid, size)
    x0, y0, x1, y1 = (int(round(v)) for v in region)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size[1]), min(y1, size[0])
    heat = np.zeros(size, dtype=np.float32)
    heat[y0:y1, x0:x1] = upsample_attention(alpha, grid, (y1 - y0, x1 - x0))
    return heat


def figure_array(fig: Figure, dpi: int = 100) -> np.ndarray:
    """``fig`` rendered by its Agg canvas at ``dpi``: a (height, width, 3) uint8 array (HWC, e.g. for TensorBoard's
    ``add_image``)."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.array(fig.canvas.buffer_rgba())[..., :3]


def save_attention_figure(path: str | os.PathLike, *args, dpi: int = 100, **kwargs) -> str:
    """``attention_figure(*args, **kwargs)`` written to ``path`` (PNG); returns the path."""
    fig = attention_figure(*args, **kwargs)
    fig.savefig(path, dpi=dpi, format="png")
    return os.fspath(path)


def caption_figure(
    image: Image.Image,
    hypothesis: Hypothesis,
    grid: tuple[int, int],
    *,
    words: Sequence[str],
    data_config: dict,
    **kwargs,
) -> Figure:
    """The per-word attention figure of a generated caption: a panel per word and one for ``<end>``, each map
    laid over the part of ``image`` the encoder saw.

    Args:
        image: the picture as given to the model (any size).
        hypothesis: the caption (``Generation.best[i]``), its ``alphas`` (len(tokens) + 1, N).
        grid: (H, W) of the generation (``Generation.grid``).
        words: the vocabulary's id -> word list (``Vocabulary.itos``).
        data_config: the encoder's preprocessing (``model.encoder.data_config``), which decides what it saw.
        kwargs: ``attention_figure``'s options (``columns``, ``panel_size``, ``title``).
    """
    labels = [words[t] for t in hypothesis.tokens] + [EOS]
    region = visible_region(*image.size, data_config)
    return attention_figure(image, labels, hypothesis.alphas, grid, region=region, **kwargs)


def caption_figure_array(
    image: Image.Image, hypothesis: Hypothesis, grid: tuple[int, int], *, dpi: int = 100, **kwargs
) -> np.ndarray:
    """``caption_figure`` rendered as a (height, width, 3) uint8 array; ``kwargs``: ``caption_figure``'s."""
    return figure_array(caption_figure(image, hypothesis, grid, **kwargs), dpi=dpi)


def save_caption_figure(
    path: str | os.PathLike,
    image: Image.Image,
    hypothesis: Hypothesis,
    grid: tuple[int, int],
    *,
    dpi: int = 100,
    **kwargs,
) -> str:
    """``caption_figure`` written to ``path`` (PNG); returns the path. ``kwargs``: ``caption_figure``'s
    (``words`` and ``data_config`` among them)."""
    caption_figure(image, hypothesis, grid, **kwargs).savefig(path, dpi=dpi, format="png")
    return os.fspath(path)
