"""Caption-diversity metrics, registered through the ``capkit.metrics`` entry-point group.

Captioners trained with cross-entropy tend to repeat a few safe captions; BLEU and CIDEr do not show it.
These metrics do. Both follow capkit's metric interface (``capkit.evaluation.metric``): a class built
with no arguments, called as ``metric(hyps, refs)`` with ``hyps = {image_id: caption}`` and
``refs = {image_id: [reference, ...]}`` (the same ids), returning a ``MetricResult``.

Captions are compared after a light normalisation of their own (lower case, words = runs of letters and
digits, apostrophes inside words kept, punctuation dropped), so they need no Java and read the same with
or without the evaluator's PTB tokenizer: "A red circle." and "a red circle" are the same caption.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from capkit.evaluation.metric import ImageId, MetricResult, check_aligned

__all__ = ["DistinctCaptions", "VocabUsage", "words"]

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def words(caption: str) -> list[str]:
    """The normalised words of a caption: ``"A dog's ball."`` -> ``["a", "dog's", "ball"]``."""
    return _WORD.findall(caption.lower())


class DistinctCaptions:
    """Share of distinct generated captions: ``#distinct hypotheses / #images`` (key ``distinct_captions``).

    1.0 means every image got its own caption; 1 / #images means one caption for everything. References
    are only checked for alignment (they do not enter the score).
    """

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        ids = check_aligned(hyps, refs)
        distinct = {tuple(words(hyps[i])) for i in ids}
        return MetricResult({"distinct_captions": len(distinct) / len(ids)})


class VocabUsage:
    """How much vocabulary the generated captions use.

    Keys:
        ``vocab_usage``: the number of distinct words in all hypotheses together.
        ``vocab_coverage``: the share of the references' distinct words that some hypothesis uses,
        ``|V_hyp & V_ref| / |V_ref|`` (words that appear in no reference do not count).
    """

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        ids = check_aligned(hyps, refs)
        used = {w for i in ids for w in words(hyps[i])}
        reference_vocab = {w for i in ids for r in refs[i] for w in words(r)}
        coverage = len(used & reference_vocab) / len(reference_vocab) if reference_vocab else 0.0
        return MetricResult({"vocab_usage": float(len(used)), "vocab_coverage": coverage})
