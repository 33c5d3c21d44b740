"""Turn a training checkpoint into a shareable model directory, scored on the weights it holds."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capkit.errors import RunDirError
from capkit.evaluation import CaptionEvaluator
from capkit.pretrained.card import render_card
from capkit.pretrained.format import CARD_FILE, FILES, read_config, read_weights
from capkit.pretrained.model import TrainedCaptioner
from capkit.recipes.evaluate import Scored, score_checkpoint

__all__ = ["convert_checkpoint"]


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    encoder_weights: str = "included",
    name: str | None = None,
    command: Sequence[str] = (),
    score_split: str | None = None,
    dataset_overrides: Mapping[str, Any] | None = None,
    metrics: Sequence[str] | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
    plugins: Sequence[str] = (),
) -> tuple[Path, Scored | None]:
    """``save_pretrained`` of ``checkpoint`` into ``out``; with ``score_split``, the written model (its ``dtype``
    weights, as a user loads them) captions that split of its dataset and the scores go into its model card.

    Raises:
        RunDirError: ``out`` holds files other than a model's, or a model and ``overwrite`` is not set.
    """
    out = Path(out)
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and (set(present) - set(FILES) or not overwrite):
        what = "a model" if not set(present) - set(FILES) else f"other files ({', '.join(present[:5])})"
        raise RunDirError(f"{out} already holds {what}: choose another folder"
                          + (", or pass --overwrite to replace the model" if what == "a model" else ""))
    trained = TrainedCaptioner.from_checkpoint(checkpoint, plugins=plugins)
    name = name or out.name
    trained.save_pretrained(out, dtype=dtype, encoder_weights=encoder_weights, name=name, command=command)
    if score_split is None:
        return out, None
    written = TrainedCaptioner.from_pretrained(out, plugins=plugins)
    e = written.config.eval
    evaluator = CaptionEvaluator(list(metrics or e.metrics), tokenizer=tokenizer or e.tokenizer)
    evaluator.check_runtime()
    scored = score_checkpoint(evaluator, written, score_split, dataset_overrides=dataset_overrides, name=str(out))
    card = render_card(name=name, architecture=written.architecture, config=read_config(out),
                       scores={score_split: scored.scores}, command=command,
                       parameters=sum(t.numel() for t in read_weights(out).values()))
    card.save(out / CARD_FILE)
    return out, scored
