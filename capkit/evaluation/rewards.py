"""Caption-level rewards of self-critical training (Rennie et al. 2017): CIDEr-D against a fixed corpus and
per-caption BLEU-4, and their weighted sum (``build_reward``)."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from capkit.errors import MissingDependencyError

__all__ = ["CiderD", "SentenceBleu", "REWARDS", "build_reward"]

# (image ids, tokenized candidate captions) -> one reward per caption
CaptionReward = Callable[[Sequence[str], Sequence[str]], list[float]]

_NgramVectors = tuple[list[dict[tuple[str, ...], float]], list[float], int]  # tf-idf per order, norms, length


def _precook(caption: str, n: int) -> dict[tuple[str, ...], int]:
    """pycocoevalcap's n-gram counts of a caption (imported now: pycocoevalcap comes with the ``train`` extra)."""
    try:
        from pycocoevalcap.cider.cider_scorer import precook
    except ImportError as err:
        raise MissingDependencyError(_INSTALL) from err
    return precook(caption, n)


def _bleu_scorer(n: int) -> Any:
    """pycocoevalcap's ``BleuScorer(n=n)``, imported now."""
    try:
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    except ImportError as err:
        raise MissingDependencyError(_INSTALL) from err
    return BleuScorer(n=n)


_INSTALL = "self-critical training rewards need pycocoevalcap: pip install 'capkit-captioning[train]'"


class CiderD:
    """CIDEr-D of candidate captions, with the document frequencies of a fixed reference corpus.

    The arithmetic is pycocoevalcap's ``CiderScorer`` (n-grams up to 4, clipped tf-idf, the Gaussian length
    penalty with sigma 6, x10). pycocoevalcap takes the document frequencies from the references of the
    captions it scores, which for a training batch of 64 images would be meaningless; here they come from the
    whole corpus given once (the training references), as the self-critical literature does. Scoring a set of
    images against themselves as the corpus gives pycocoevalcap's per-image scores.

    Args:
        references: image id -> its reference captions, tokenized, words separated by single spaces.
        n: longest n-gram.
        sigma: width of the length penalty.
    """

    def __init__(self, references: Mapping[str, Sequence[str]], n: int = 4, sigma: float = 6.0):
        if not references:
            raise ValueError("CiderD needs a reference corpus; got no images")
        self.n, self.sigma = n, sigma
        cooked = {image_id: [_precook(r, n) for r in refs] for image_id, refs in references.items()}
        document_frequency: Counter = Counter()
        for refs in cooked.values():
            document_frequency.update({ngram for ref in refs for ngram in ref})
        self.log_df = {ngram: math.log(count) for ngram, count in document_frequency.items()}
        self.log_corpus_size = math.log(len(cooked))
        self.references = {image_id: [self._vectors(r) for r in refs] for image_id, refs in cooked.items()}

    def __call__(self, image_ids: Sequence[str], candidates: Sequence[str]) -> list[float]:
        """CIDEr-D of ``candidates[i]`` (tokenized, space-separated) against the references of ``image_ids[i]``."""
        _check_candidates(self, image_ids, candidates)
        scores = []
        for image_id, candidate in zip(image_ids, candidates):
            vec, norm, length = self._vectors(_precook(candidate, self.n))
            refs = self.references[image_id]
            total = sum(self._similarity(vec, norm, length, *ref) for ref in refs)
            scores.append(total / len(refs) * 10.0)
        return scores

    def _vectors(self, counts: Mapping[tuple[str, ...], int]) -> _NgramVectors:
        """tf-idf vector and norm per n-gram order, and the length (pycocoevalcap counts the bigrams)."""
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, term_freq in counts.items():
            order = len(ngram) - 1
            weight = float(term_freq) * (self.log_corpus_size - self.log_df.get(ngram, 0.0))
            vec[order][ngram] = weight
            norm[order] += weight**2
            if order == 1:
                length += term_freq
        return vec, [math.sqrt(x) for x in norm], length

    def _similarity(self, vec, norm, length, ref_vec, ref_norm, ref_length) -> float:
        """Mean over n-gram orders of the clipped cosine similarity, times the length penalty."""
        penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for order in range(self.n):
            ref = ref_vec[order]
            value = sum(min(weight, ref.get(ngram, 0.0)) * ref.get(ngram, 0.0) for ngram, weight in vec[order].items())
            if norm[order] != 0 and ref_norm[order] != 0:
                value /= norm[order] * ref_norm[order]
            total += value * penalty
        return total / self.n


class SentenceBleu:
    """BLEU-n of each candidate caption on its own: pycocoevalcap's per-sentence scores (the reference length
    closest to the candidate's; its smoothing counts an order without any n-gram as precision 1e-6).

    Args:
        references: image id -> its reference captions, tokenized, words separated by single spaces.
        n: the BLEU order reported.
    """

    def __init__(self, references: Mapping[str, Sequence[str]], n: int = 4):
        self.references = {image_id: list(refs) for image_id, refs in references.items()}
        self.n = n

    def __call__(self, image_ids: Sequence[str], candidates: Sequence[str]) -> list[float]:
        _check_candidates(self, image_ids, candidates)
        scorer = _bleu_scorer(self.n)
        for image_id, candidate in zip(image_ids, candidates):
            scorer += (candidate, self.references[image_id])
        _, per_caption = scorer.compute_score(option="closest")
        return list(per_caption[self.n - 1])


def _check_candidates(reward: CiderD | SentenceBleu, image_ids: Sequence[str], candidates: Sequence[str]) -> None:
    """One candidate per image id, and references for every image."""
    if len(image_ids) != len(candidates):
        raise ValueError(f"{len(image_ids)} image ids for {len(candidates)} candidates")
    unknown = [i for i in dict.fromkeys(image_ids) if i not in reward.references]
    if unknown:
        raise KeyError(f"{type(reward).__name__} has no references for the images {unknown[:5]} (of {len(unknown)})")


REWARDS: dict[str, Callable[[Mapping[str, Sequence[str]]], CaptionReward]] = {"cider": CiderD, "bleu4": SentenceBleu}


def build_reward(weights: Mapping[str, float], references: Mapping[str, Sequence[str]]) -> CaptionReward:
    """The weighted sum of the rewards named in ``weights`` (names from ``REWARDS``), each built on
    ``references`` (image id -> tokenized reference captions)."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown or not any(weights.values()):
        raise ValueError(
            f"reward weights {dict(weights)}: names come from {', '.join(REWARDS)} and at least one weight is "
            f"non-zero" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    parts = [(weight, REWARDS[name](references)) for name, weight in weights.items() if weight]

    def reward(image_ids: Sequence[str], candidates: Sequence[str]) -> list[float]:
        total = [0.0] * len(candidates)
        for weight, score in parts:
            total = [t + weight * s for t, s in zip(total, score(image_ids, candidates))]
        return total

    return reward
