"""Diversity of the generated captions, reported beside the n-gram metrics: a model can raise BLEU by giving many
images one safe caption, which these figures show.

- ``distinct_captions``: distinct captions over images (1: no two images got the same caption);
- ``vocab_used``: the number of distinct words in all the captions;
- ``novel_captions``: the share of captions found nowhere among the training captions (verbatim, after
  tokenisation), reported when the evaluator was given the training captions;
- ``mean_length``: the mean number of words per caption.

Captions are compared as ``capkit.data.vocab.tokenize`` splits them (lower-case words, punctuation dropped), so
``"A dog."`` and ``"a dog"`` are one caption.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from capkit.data.vocab import tokenize
from capkit.evaluation.metric import ImageId, MetricResult, check_aligned
from capkit.registry import METRICS

__all__ = ["Diversity"]


@METRICS.register("diversity")
class Diversity:
    """The diversity figures of a set of captions (the references are not used).

    Args:
        training_captions: the captions the model was trained on; without them ``novel_captions`` is not
            reported. ``CaptionEvaluator(..., training_captions=...)`` passes them on (``use_training_captions``).
    """

    def __init__(self, training_captions: Iterable[str] | None = None):
        self._training: set[tuple[str, ...]] | None = None
        if training_captions is not None:
            self.use_training_captions(training_captions)

    def use_training_captions(self, captions: Iterable[str]) -> None:
        self._training = {tuple(tokenize(c)) for c in captions}

    @property
    def reports(self) -> tuple[str, ...]:
        novel = ("novel_captions",) if self._training is not None else ()
        return ("distinct_captions", "vocab_used", *novel, "mean_length")

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        captions = [tuple(tokenize(hyps[i])) for i in check_aligned(hyps, refs)]
        scores = {
            "distinct_captions": len(set(captions)) / len(captions),
            "vocab_used": float(len({word for caption in captions for word in caption})),
            "mean_length": sum(map(len, captions)) / len(captions),
        }
        if self._training is not None:
            scores["novel_captions"] = sum(c not in self._training for c in captions) / len(captions)
        return MetricResult({key: scores[key] for key in self.reports})
