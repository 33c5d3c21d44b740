"""``eval.tokenizer: python``: the COCO pipeline's scores without Java, on the published 5,000-caption fixture."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from capkit.evaluation import CaptionEvaluator, load_predictions, load_references
from capkit.evaluation.coco import python_tokenize

COCO_5K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "metric_fixtures" / "coco_karpathy_test5k"


def test_the_ptb_rules_on_plain_captions():
    got = python_tokenize({1: ["A dog's ball, on the grass.", "They don't run -- it is a \"T-shirt\"!",
                               "I cannot see St. Luke (at 2:56) in D.C."]})
    assert got == {1: ["a dog 's ball on the grass", "they do n't run it is a t-shirt",
                       "i can not see st. luke -lrb- at 2:56 -rrb- in d.c."]}


@pytest.mark.skipif(not COCO_5K.is_dir(), reason=f"metric fixtures not found at {COCO_5K} (shared data)")
def test_without_java_the_published_scores_come_back():
    expected = json.loads((COCO_5K / "expected_scores.json").read_text())["expected"]
    hyps = load_predictions(COCO_5K / "image_caption_prediction.json")
    refs = load_references(COCO_5K / "image_caption_gt.json")
    scores = CaptionEvaluator(["bleu", "rouge_l", "cider"], tokenizer="python").score(hyps, refs).scores
    for published, key in [("Bleu_1", "bleu1"), ("Bleu_2", "bleu2"), ("Bleu_3", "bleu3"), ("Bleu_4", "bleu4"),
                           ("ROUGE_L", "rouge_l")]:
        assert scores[key] == pytest.approx(expected[published], abs=1e-12), key
    assert scores["cider"] == pytest.approx(expected["CIDEr"], abs=1e-5)  # 3 of 30,010 captions split otherwise
