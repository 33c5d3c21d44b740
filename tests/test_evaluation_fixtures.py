"""Published scores reproduced on real captions (``../shared/data/metric_fixtures``, outside the repository)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from capkit.cli.evaluate import main as evaluate_main
from capkit.evaluation import CaptionEvaluator, spice_missing_jars

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "metric_fixtures"
COCO_5K = FIXTURES / "coco_karpathy_test5k"
NLGEVAL = FIXTURES / "nlgeval_example"

pytestmark = [
    pytest.mark.skipif(
        not FIXTURES.is_dir(), reason=f"metric fixtures not found at {FIXTURES} (shared data, not in the repository)"
    ),
    pytest.mark.skipif(shutil.which("java") is None, reason="needs Java 8+ on PATH (PTB tokenizer, METEOR)"),
]

# pycocoevalcap's COCOEvalCap keys -> capkit's keys
KEYS = {
    "Bleu_1": "bleu1",
    "Bleu_2": "bleu2",
    "Bleu_3": "bleu3",
    "Bleu_4": "bleu4",
    "METEOR": "meteor",
    "ROUGE_L": "rouge_l",
    "CIDEr": "cider",
    "SPICE": "spice",
}
COCO_METRICS = ["bleu", "meteor", "rouge_l", "cider"]


@pytest.fixture(scope="module")
def coco_5k_scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """Every metric once over the 5,000 Karpathy-test captions, through the CLI (about 30 s: METEOR's JVM)."""
    out = tmp_path_factory.mktemp("coco5k") / "scores.json"
    argv = [
        "--predictions", str(COCO_5K / "image_caption_prediction.json"),
        "--references", str(COCO_5K / "image_caption_gt.json"),
        "--metrics", *COCO_METRICS, "spice",
        "--out", str(out),
    ]  # fmt: skip
    assert evaluate_main(argv) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("published", [k for k in KEYS if k != "SPICE"])
def test_coco_karpathy_test5k_reproduces_published_scores(coco_5k_scores, published):
    expected = json.loads((COCO_5K / "expected_scores.json").read_text())["expected"][published]
    assert coco_5k_scores[KEYS[published]] == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_coco_karpathy_test5k_spice_only_with_its_jars(coco_5k_scores):
    if spice_missing_jars():
        assert "spice" not in coco_5k_scores
    else:
        expected = json.loads((COCO_5K / "expected_scores.json").read_text())["expected"]["SPICE"]
        assert coco_5k_scores["spice"] == pytest.approx(expected, abs=1e-9)


def _assert_places5(scores: dict[str, float], expected: dict[str, float]) -> None:
    """nlg-eval's ``assertAlmostEqual(places=5)``."""
    for published, value in expected.items():
        assert round(scores[KEYS[published]] - value, 5) == 0, (published, scores[KEYS[published]], value)


@pytest.fixture(scope="module")
def nlgeval() -> tuple[dict, CaptionEvaluator]:
    """The expected scores, and one evaluator for every case (METEOR's JVM takes 10 s or more to start)."""
    spec = json.loads((NLGEVAL / "expected_scores.json").read_text(encoding="utf-8"))
    return spec, CaptionEvaluator(COCO_METRICS, tokenizer="none")


def test_nlgeval_corpus_without_ptb_tokenization(nlgeval):
    spec, evaluator = nlgeval
    hyp, *refs = [(NLGEVAL / name).read_text(encoding="utf-8").splitlines() for name in spec["corpus_case"]["files"]]
    hyps = {i: h.strip() for i, h in enumerate(hyp)}
    scores = evaluator.score(hyps, {i: [r[i].strip() for r in refs] for i in hyps}).scores
    _assert_places5(scores, spec["corpus_case"]["expected"])


@pytest.mark.parametrize("case", range(3))
def test_nlgeval_single_pairs_without_ptb_tokenization(nlgeval, case):
    spec, evaluator = nlgeval
    pair = spec["individual_cases"][case]
    _assert_places5(evaluator.score({0: pair["hyp"]}, {0: pair["refs"]}).scores, pair["expected"])
