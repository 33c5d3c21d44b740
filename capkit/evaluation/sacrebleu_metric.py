"""Corpus BLEU by sacrebleu, on raw captions with sacrebleu's own tokenizer."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from capkit.errors import MissingDependencyError
from capkit.evaluation.metric import ImageId, MetricResult, check_aligned
from capkit.registry import METRICS

__all__ = ["SacreBleu"]

INSTALL_SACREBLEU = "the sacrebleu metric needs sacrebleu: pip install 'capkit-captioning[train]'"


@METRICS.register("sacrebleu")
class SacreBleu:
    """sacrebleu's corpus BLEU-4 on its 0-100 scale (key ``sacrebleu``), every image's references at once.

    Args:
        tokenize: sacrebleu tokenizer name ("13a" is sacrebleu's default).
        lowercase: compare lower-cased text (default True: capkit's vocabularies are lower-case while COCO
            references are not).
    """

    reports = ("sacrebleu",)

    def __init__(self, tokenize: str = "13a", lowercase: bool = True):
        self.tokenize = tokenize
        self.lowercase = lowercase

    def __call__(self, hyps: Mapping[ImageId, str], refs: Mapping[ImageId, Sequence[str]]) -> MetricResult:
        try:  # imported here: ~0.1 s that `import capkit` need not pay, and the `train` extra brings it
            from sacrebleu.metrics import BLEU
        except ImportError as err:
            raise MissingDependencyError(INSTALL_SACREBLEU) from err

        ids = check_aligned(hyps, refs)
        n_refs = max(len(refs[i]) for i in ids)
        # sacrebleu takes reference "streams"; None pads images that have fewer references.
        streams = [[refs[i][k] if k < len(refs[i]) else None for i in ids] for k in range(n_refs)]
        bleu = BLEU(tokenize=self.tokenize, lowercase=self.lowercase)
        return MetricResult({"sacrebleu": float(bleu.corpus_score([hyps[i] for i in ids], streams).score)})
