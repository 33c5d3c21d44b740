"""Drawing attention: per-word maps over the image, headless (no display needed)."""
from capkit.visualization.attention import (
    attention_figure,
    caption_figure,
    caption_figure_array,
    figure_array,
    save_attention_figure,
    save_caption_figure,
    upsample_attention,
)

__all__ = [
    "attention_figure",
    "caption_figure",
    "caption_figure_array",
    "figure_array",
    "save_attention_figure",
    "save_caption_figure",
    "upsample_attention",
]
