"""Turn a training checkpoint into a shareable model directory, scored on the weights it holds."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capkit.engine.checkpoint import checkpoint_step
from capkit.engine.run_dir import RunDir
from capkit.errors import RunDirError
from capkit.evaluation import CaptionEvaluator, Diversity
from capkit.pretrained.card import render_card
from capkit.pretrained.format import CARD_FILE, FILES, is_pretrained_dir, read_config, read_weights
from capkit.pretrained.model import TrainedCaptioner
from capkit.recipes.evaluate import Scored, score_checkpoint
from capkit.recipes.inference import load_trained

__all__ = ["convert_checkpoint", "recorded_in_run", "RunRecord"]

log = logging.getLogger(__name__)


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
    notes: Sequence[str] = (),
    decoding: Mapping[str, Any] | None = None,
) -> tuple[Path, Scored | None]:
    """``save_pretrained`` of ``checkpoint`` (a training checkpoint, or a saved model to store again, e.g. in
    another dtype) into ``out``, its card filled from the run (``recorded_in_run``: the
    validation scores and training commands, unless ``command`` names them); with ``score_split``, the written
    model (its ``dtype`` weights, as a user loads them) captions that split of its dataset and these scores go
    into its model card instead, with the share of distinct captions among them. ``decoding`` (``beam_size``,
    ``max_len``, ``length_penalty``, ``no_repeat_ngram_size``, ``suppress_unk``; None keeps the run's) sets the
    written model's own decoding settings, e.g. a length penalty chosen on the validation split; the run's scores,
    measured with its settings, then leave the card unless ``score_split`` scores it again.

    Raises:
        RunDirError: ``out`` holds files other than a model's, or a model and ``overwrite`` is not set.
    """
    out = Path(out)
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and (set(present) - set(FILES) or not overwrite):
        what = "a model" if not set(present) - set(FILES) else f"other files ({', '.join(present[:5])})"
        raise RunDirError(f"{out} already holds {what}: choose another folder"
                          + (", or pass --overwrite to replace the model" if what == "a model" else ""))
    trained = load_trained(checkpoint, plugins=plugins)
    decoding = trained.decoding_with(**(decoding or {}))  # ConfigError for a setting out of range
    redecoded = decoding != trained.decoding
    name = name or out.name
    recorded = RunRecord()
    if not is_pretrained_dir(checkpoint):  # a training checkpoint: its run says how it was trained and scored
        recorded = recorded_in_run(checkpoint)
    command = list(command) or recorded.commands
    notes = list(notes)
    if recorded.train_seconds is not None:
        notes.insert(0, f"Training took {recorded.train_seconds / 60:.1f} minutes in "
                        f"{max(1, len(recorded.commands))} session(s) (the run's train_summary.json).")
    note = "Scored during training, on the float32 weights of the checkpoint, decoding as above."
    if redecoded and recorded.scores and score_split is None:
        log.warning("%s: the run's scores were measured with its decoding settings, not these; the card has no "
                    "scores (pass --score-split to score the written model)", out)
        recorded.scores = {}
    # written and scored in a staging folder beside ``out``, published only when all of it worked: a refused
    # or failed conversion leaves ``out`` as it was (absent, or the model it held)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    scored = None
    try:
        trained.save_pretrained(staging, dtype=dtype, encoder_weights=encoder_weights, name=name, command=command,
                                scores=recorded.scores, scores_note=note, notes=notes, decoding=decoding)
        if score_split is not None:
            scored = _score_written(staging, score_split, name=name, out=out, command=command, notes=notes,
                                    metrics=metrics, tokenizer=tokenizer, dataset_overrides=dataset_overrides,
                                    plugins=plugins)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, scored


def _score_written(
    directory: Path, split: str, *, name: str, out: Path, command: Sequence[str], notes: Sequence[str],
    metrics: Sequence[str] | None, tokenizer: str | None, dataset_overrides: Mapping[str, Any] | None,
    plugins: Sequence[str],
) -> Scored:
    """Score the model written in ``directory`` (as a user loads it) on ``split`` and put the scores, with the
    share of distinct captions, into its card."""
    written = TrainedCaptioner.from_pretrained(directory, plugins=plugins)
    e = written.config.eval
    evaluator = CaptionEvaluator(list(metrics or e.metrics), tokenizer=tokenizer or e.tokenizer)
    evaluator.check_runtime()
    scored = score_checkpoint(evaluator, written, split, dataset_overrides=dataset_overrides, name=str(out))
    distinct = Diversity()(scored.hypotheses, scored.references).scores["distinct_captions"]
    card = render_card(name=name, architecture=written.architecture, config=read_config(directory),
                       scores={split: {"distinct_captions": distinct, **scored.scores}}, command=command,
                       parameters=sum(t.numel() for t in read_weights(directory).values()), notes=notes)
    card.save(directory / CARD_FILE)
    return scored


def _publish(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``; a model ``out`` held (``overwrite``, checked before) is replaced."""
    if out.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, previous / out.name)
        os.replace(staging, out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, out)


@dataclass
class RunRecord:
    """What a training run recorded about one of its checkpoints."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # {"val": {metric: value}}
    commands: list[str] = field(default_factory=list)  # the command of each training session
    train_seconds: float | None = None


def recorded_in_run(checkpoint: str | os.PathLike) -> RunRecord:
    """What the run of a training checkpoint (``RUN_DIR/checkpoints/NAME``) recorded about it: the validation
    scores of the evaluation at its step (``metrics.jsonl``) and, from ``train_summary.json``, the command of
    each training session and the training time; empty where the run kept none."""
    run = RunDir.of_checkpoint(checkpoint)
    step = checkpoint_step(checkpoint)
    record = RunRecord()
    if run.metrics.is_file():
        for line in run.metrics.read_text(encoding="utf-8").splitlines():
            try:
                logged = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            values = {k.split("/", 1)[1]: v for k, v in logged.items() if k.startswith("val/")}
            if values and logged.get("step") == step:
                record.scores = {"val": values}  # the last evaluation at that step (a resumed run may repeat one)
    if run.summary.is_file():
        try:
            summary = json.loads(run.summary.read_text(encoding="utf-8"))
        except ValueError:
            log.warning("%s: not JSON; the model card names no training command or time", run.summary)
        else:
            record.commands = list(summary.get("commands", []))
            record.train_seconds = summary.get("train_seconds")
    return record
