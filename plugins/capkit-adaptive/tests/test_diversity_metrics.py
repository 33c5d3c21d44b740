"""distinct_captions and vocab_usage: exact known answers, loaded by name like any metric."""
from __future__ import annotations

import pytest

pytest.importorskip("capkit_adaptive")

from capkit.evaluation import CaptionEvaluator  # noqa: E402
from capkit.evaluation.metric import MetricResult, build_metric  # noqa: E402
from capkit.registry import METRICS  # noqa: E402
from capkit_adaptive.metrics import DistinctCaptions, VocabUsage, words  # noqa: E402

HYPS = {"a": "a red circle", "b": "A red circle.", "c": "a blue square", "d": "a red  circle"}
REFS = {
    "a": ["a red circle", "one small red circle"],
    "b": ["a red circle on the left"],
    "c": ["a blue square"],
    "d": ["a green triangle"],
}
# reference words: a red circle one small on the left blue square green triangle -> 12
# hypothesis words: a red circle blue square -> 5, all of them in the references


def test_words_normalise_case_and_punctuation():
    assert words("A dog's ball, on grass.") == ["a", "dog's", "ball", "on", "grass"]


def test_distinct_captions_known_answer():
    result = DistinctCaptions()(HYPS, REFS)
    assert isinstance(result, MetricResult)
    assert result.scores == {"distinct_captions": pytest.approx(2 / 4)}  # "a red circle" x3, "a blue square"


def test_distinct_captions_extremes():
    refs = {i: ["x"] for i in range(5)}
    assert DistinctCaptions()({i: "same words" for i in range(5)}, refs).scores["distinct_captions"] == 0.2
    assert DistinctCaptions()({i: f"caption {i}" for i in range(5)}, refs).scores["distinct_captions"] == 1.0


def test_vocab_usage_known_answer():
    result = VocabUsage()(HYPS, REFS)
    assert result.scores == {"vocab_usage": 5.0, "vocab_coverage": pytest.approx(5 / 12)}


def test_vocab_coverage_ignores_words_no_reference_has():
    result = VocabUsage()({1: "a purple unicorn"}, {1: ["a horse", "one horse"]})
    assert result.scores == {"vocab_usage": 3.0, "vocab_coverage": pytest.approx(1 / 3)}  # only "a"


def test_metrics_check_that_ids_align():
    with pytest.raises(ValueError, match="same image ids"):
        VocabUsage()({"a": "x"}, {"b": ["x"]})


def test_loaded_by_name_from_the_entry_points():
    assert METRICS.origin("distinct_captions") == "capkit-adaptive"
    assert METRICS.origin("vocab_usage") == "capkit-adaptive"
    assert isinstance(build_metric("distinct_captions"), DistinctCaptions)
    assert isinstance(build_metric("vocab_usage"), VocabUsage)


def test_in_the_evaluator_next_to_a_builtin_metric():
    evaluator = CaptionEvaluator(["distinct_captions", "vocab_usage", "sacrebleu"], tokenizer="none")
    scores = evaluator.score(HYPS, REFS).scores
    assert scores["distinct_captions"] == pytest.approx(0.5)
    assert scores["vocab_usage"] == 5.0
    assert scores["vocab_coverage"] == pytest.approx(5 / 12)
    assert "sacrebleu" in scores
