"""An HTML gallery of test images: generated caption, references, per-image scores, attention strip."""
from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from capkit.types import Hypothesis
from capkit.visualization.attention import save_caption_figure

__all__ = ["GalleryItem", "write_gallery"]


@dataclass
class GalleryItem:
    image_id: str
    image: Image.Image
    caption: str
    references: Sequence[str]
    scores: Mapping[str, float]  # per-image metric values
    hypothesis: Hypothesis  # the generated caption, with its attention maps
    grid: tuple[int, int]


def write_gallery(
    out_dir: str | os.PathLike,
    items: Sequence[GalleryItem],
    *,
    words: Sequence[str],
    data_config: dict,
    title: str = "capkit gallery",
) -> Path:
    """Write ``out_dir/index.html`` plus one attention strip PNG per item; returns the HTML file's path.
    ``words`` and ``data_config``: see ``save_caption_figure``."""
    out = Path(out_dir)
    (out / "attention").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, item in enumerate(items):
        strip = Path("attention") / f"{i:04d}.png"
        save_caption_figure(out / strip, item.image, item.hypothesis, item.grid, words=words, data_config=data_config,
                            columns=len(item.hypothesis.tokens) + 2, panel_size=1.6)
        scores = ", ".join(f"{k} {v:.3f}" for k, v in item.scores.items())
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in item.references)
        rows.append(
            f"<section><h3>{html.escape(str(item.image_id))}</h3>"
            f"<p class=caption>{html.escape(item.caption)}</p><p class=scores>{html.escape(scores)}</p>"
            f"<details><summary>references</summary><ul>{refs}</ul></details>"
            f"<img src='{strip.as_posix()}' alt='attention for {html.escape(item.caption)}'></section>"
        )
    page = (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}section{border-bottom:1px solid #ccc;"
        "padding:8px 0}.caption{font-size:1.2em;font-weight:bold}.scores{color:#555}img{max-width:100%}</style>"
        f"<h1>{html.escape(title)}</h1>" + "".join(rows)
    )
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
