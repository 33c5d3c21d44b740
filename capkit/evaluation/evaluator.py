"""``CaptionEvaluator`` (reset / process / evaluate) and ``run_evaluation``, the generate-and-score loop."""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from capkit.engine.device import autocast
from capkit.errors import JavaNotFoundError
from capkit.evaluation.coco import TOKENIZERS
from capkit.evaluation.metric import (
    ImageId,
    Metric,
    MetricResult,
    as_result,
    build_metric,
    check_aligned,
    metric_keys,
)
from capkit.evaluation.results import write_coco_results, write_per_image
from capkit.types import CaptionBatch, Generation

if TYPE_CHECKING:
    from capkit.models.captioner import Captioner

__all__ = ["CaptionEvaluator", "decode_batches", "run_evaluation"]

logger = logging.getLogger(__name__)


class CaptionEvaluator:
    """Collects one generated caption per image with its references, then scores them with registered metrics.

    Args:
        metrics: names in ``capkit.registry.METRICS`` (an unknown name raises ``KeyError`` here, with suggestions).
        tokenizer: ``ptb``: the COCO pipeline's PTB tokenizer (needs Java), run once for every metric that asks for
            it (``ptb_tokenized = True``); ``python``: the same without Java (``python_tokenize``); ``none``: the
            raw strings, as nlg-eval scores them.
        training_captions: the training set's captions, for the metrics that compare with them (``diversity``'s
            ``novel_captions``: a metric takes them through its ``use_training_captions`` method).

    After ``evaluate()``, ``hypotheses``, ``references`` and ``result`` (with per-image scores) stay available
    until ``reset()``.
    """

    def __init__(self, metrics: Sequence[str], *, tokenizer: str = "ptb", training_captions: Iterable[str] | None = None):
        if not metrics:
            raise ValueError("CaptionEvaluator needs at least one metric name")
        if tokenizer not in (*TOKENIZERS, "none"):
            raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join((*TOKENIZERS, 'none'))}")
        self.metrics: dict[str, Metric] = {name: build_metric(name) for name in dict.fromkeys(metrics)}
        self.tokenizer = tokenizer
        if training_captions is not None:
            self.use_training_captions(training_captions)
        self.reset()

    @property
    def wants_training_captions(self) -> bool:
        return any(hasattr(m, "use_training_captions") for m in self.metrics.values())

    def use_training_captions(self, captions: Iterable[str]) -> None:
        """Give the training set's captions to the metrics that compare with them."""
        captions = list(captions)
        for metric in self.metrics.values():
            if hasattr(metric, "use_training_captions"):
                metric.use_training_captions(captions)

    def reports(self, key: str) -> bool:
        """Whether a metric reports ``key`` (``bleu4``, ``cider``, ...), known before anything is scored: from the
        metrics' ``reports`` first, running one that declares none on a two-image corpus only if need be."""
        declared = [set(m.reports) for m in self.metrics.values() if getattr(m, "reports", None) is not None]
        if any(key in keys for keys in declared):
            return True
        return any(key in metric_keys(n, m) for n, m in self.metrics.items() if getattr(m, "reports", None) is None)

    def keys(self) -> set[str]:
        """Every key the metrics report."""
        return set().union(*(metric_keys(name, metric) for name, metric in self.metrics.items()))

    def check_runtime(self) -> None:
        """Raise ``JavaNotFoundError`` now, not at the first evaluation, when a metric or the tokenizer needs
        Java and there is none."""
        needs = [f"metric {name!r}" for name, m in self.metrics.items() if getattr(m, "needs_java", False)]
        if self.tokenizer == "ptb" and any(getattr(m, "ptb_tokenized", False) for m in self.metrics.values()):
            needs.append("the PTB tokenizer (eval.tokenizer=ptb)")
        if needs and shutil.which("java") is None:
            raise JavaNotFoundError(
                f"{' and '.join(needs)} run a Java program, and no `java` is on PATH. Install a Java 8+ runtime "
                f"(e.g. `apt-get install default-jre-headless`), or evaluate without Java: eval.tokenizer=python and "
                f"metrics that need no Java (bleu, rouge_l, cider, sacrebleu)"
            )

    def reset(self) -> None:
        self.hypotheses: dict[ImageId, str] = {}
        self.references: dict[ImageId, list[str]] = {}
        self.result: MetricResult | None = None

    def process(self, batch: CaptionBatch, generation: Generation, decode: Callable[[list[int]], str]) -> None:
        """Store each image's best hypothesis, decoded to text, and its reference captions."""
        if batch.references is None:
            raise ValueError("CaptionEvaluator.process needs an evaluation batch: batch.references is None")
        tokens = generation.tokens
        if len(tokens) != len(batch):
            raise ValueError(f"generation has {len(tokens)} captions for a batch of {len(batch)} images")
        for image_id, ids, refs in zip(batch.image_ids, tokens, batch.references):
            if image_id in self.hypotheses:
                raise ValueError(
                    f"image {image_id!r} was processed twice; an evaluation loader must yield each image once "
                    f"(and reset() must be called between evaluations)"
                )
            self.hypotheses[image_id] = decode(ids)
            self.references[image_id] = list(refs)

    def evaluate(self) -> dict[str, float]:
        """Score everything processed since ``reset()``: flat keys (``bleu4``, ``cider``, ...)."""
        self.result = self.score(self.hypotheses, self.references)
        return dict(self.result.scores)

    def score(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        """Score ``hyps`` against ``refs`` with every metric; images in ``refs`` without a hypothesis are skipped."""
        unused = len(refs) - sum(1 for i in hyps if i in refs)
        if unused > 0:
            logger.warning(
                "%d of %d reference images have no hypothesis; scoring the other %d", unused, len(refs), len(refs) - unused
            )
            refs = {i: refs[i] for i in hyps if i in refs}
        check_aligned(hyps, refs)
        tokenized: tuple[dict[ImageId, str], dict[ImageId, list[str]]] | None = None
        total = MetricResult({}, {i: {} for i in hyps})
        for name, metric in self.metrics.items():
            if self.tokenizer != "none" and getattr(metric, "ptb_tokenized", False):
                if tokenized is None:
                    tokenized = _tokenize_pairs(TOKENIZERS[self.tokenizer], hyps, refs)
                result = as_result(name, metric(*tokenized))
            else:
                result = as_result(name, metric(hyps, refs))
            clash = sorted(set(result.scores) & set(total.scores))
            if clash:
                raise ValueError(f"metric {name!r} reports {clash}, which another selected metric already reported")
            total.scores.update(result.scores)
            for image_id, scores in result.per_image.items():
                total.per_image.setdefault(image_id, {}).update(scores)
        return total

    def coco_results(self) -> list[dict]:
        """The processed captions in COCO results format ``[{"image_id", "caption"}]``."""
        return [{"image_id": i, "caption": c} for i, c in self.hypotheses.items()]

    def save(self, results_path: str | os.PathLike, per_image_path: str | os.PathLike | None = None) -> None:
        """Write the captions as COCO results JSON and, after ``evaluate()``, the per-image scores JSON."""
        write_coco_results(results_path, self.hypotheses)
        if per_image_path is not None:
            if self.result is None:
                raise RuntimeError("per-image scores exist only after evaluate()")
            write_per_image(per_image_path, self.hypotheses, self.references, self.result.per_image)


def _tokenize_pairs(
    tokenize: Callable, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]
) -> tuple[dict[ImageId, str], dict[ImageId, list[str]]]:
    """Tokenize hypotheses and references in one call (one Java process for the PTB tokenizer)."""
    captions = {("hyp", i): [h] for i, h in hyps.items()} | {("ref", i): list(r) for i, r in refs.items()}
    out = tokenize(captions)
    return {i: out[("hyp", i)][0] for i in hyps}, {i: out[("ref", i)] for i in refs}


def decode_batches(
    model: Captioner, loader: Iterable[CaptionBatch], *, beam_size: int, max_len: int, length_penalty: float,
    no_repeat_ngram_size: int = 0, suppress_unk: bool = False, precision: torch.dtype | None = None,
) -> Iterator[tuple[CaptionBatch, Generation]]:
    """Each batch (moved to the model's device) with its beam search result, in eval mode and without gradients,
    under autocast to ``precision`` when given (``resolve_amp_dtype(cfg.eval.amp, ...)``); the model's mode is
    restored when the iteration ends."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = batch.to(device)
            with torch.no_grad(), autocast(precision, device):
                generation = model.generate(
                    batch.images, batch.features, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                    no_repeat_ngram_size=no_repeat_ngram_size, suppress_unk=suppress_unk,
                )
            yield batch, generation
    finally:
        model.train(was_training)


def run_evaluation(
    model: Captioner,
    loader: Iterable[CaptionBatch],
    evaluator: CaptionEvaluator,
    *,
    beam_size: int,
    max_len: int,
    length_penalty: float,
    decode: Callable[[list[int]], str],
    no_repeat_ngram_size: int = 0,
    suppress_unk: bool = False,
    precision: torch.dtype | None = None,
) -> dict[str, float]:
    """Caption every batch with beam search in eval mode (``decode_batches``), then score."""
    evaluator.reset()
    for batch, generation in decode_batches(
        model, loader, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, suppress_unk=suppress_unk, precision=precision,
    ):
        evaluator.process(batch, generation, decode)
    return evaluator.evaluate()
