"""The diversity figures on a hand-made corpus with known answers, and where they are reported."""
from __future__ import annotations

import pytest

from capkit.evaluation import CaptionEvaluator, Diversity

HYPS = {"1": "a dog runs.", "2": "A dog runs", "3": "a cat sits on a mat", "4": "two birds"}
REFS = {i: ["any reference"] for i in HYPS}
TRAINING = ["a dog runs", "A bird flies!"]


def test_known_answers_on_a_hand_made_corpus():
    scores = Diversity(TRAINING)(HYPS, REFS).scores
    assert scores == {
        "distinct_captions": 3 / 4,  # "a dog runs." and "A dog runs" are one caption once tokenised
        "vocab_used": 9.0,  # a dog runs cat sits on mat two birds
        "novel_captions": 2 / 4,  # "a dog runs" is a training caption
        "mean_length": (3 + 3 + 6 + 2) / 4,
    }


def test_without_training_captions_novelty_is_not_reported_and_the_keys_say_so():
    metric = Diversity()
    assert metric.reports == ("distinct_captions", "vocab_used", "mean_length")
    assert set(metric(HYPS, REFS).scores) == set(metric.reports)
    metric.use_training_captions(TRAINING)
    assert "novel_captions" in metric.reports


def test_the_evaluator_passes_the_training_captions_and_reports_beside_the_ngram_metrics():
    evaluator = CaptionEvaluator(["bleu", "diversity"], tokenizer="python", training_captions=TRAINING)
    assert evaluator.wants_training_captions and evaluator.reports("novel_captions")
    scores = evaluator.score(HYPS, REFS).scores
    assert scores["novel_captions"] == 0.5 and scores["distinct_captions"] == 0.75 and "bleu4" in scores
    assert not CaptionEvaluator(["bleu"], tokenizer="python").wants_training_captions


def test_one_caption_for_every_image_is_one_distinct_caption():
    same = {str(i): "a man is standing" for i in range(10)}
    scores = Diversity()(same, {i: ["x"] for i in same}).scores
    assert scores["distinct_captions"] == pytest.approx(0.1) and scores["vocab_used"] == 4
