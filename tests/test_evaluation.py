"""Evaluator and metrics on hand-made captions with known answers (the real-data fixtures are in
test_evaluation_fixtures.py)."""
from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import capkit  # noqa: F401  (registers the builtin metrics)
import capkit.evaluation.coco as coco
import capkit.evaluation.metric as metric_module
from capkit.__main__ import main as capkit_main
from capkit.cli.evaluate import main as evaluate_main
from capkit.evaluation import (
    CaptionEvaluator,
    JavaNotFoundError,
    MetricResult,
    load_predictions,
    load_references,
    run_evaluation,
)
from capkit.registry import METRICS, Registry
from capkit.types import CaptionBatch, Generation, Hypothesis

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java 8+ on PATH (PTB tokenizer, METEOR)")

# Two images with no word in common, so CIDEr's IDF is non-zero for every n-gram.
HYPS = {"a": "a dog runs on the grass", "b": "two cats sleep inside today"}
REFS = {"a": ["a dog runs on the grass"], "b": ["two cats sleep inside today", "two cats sleep inside today"]}


def test_builtin_metrics_are_registered():
    assert {"bleu", "meteor", "rouge_l", "cider", "spice", "sacrebleu"} <= set(METRICS.names())


def test_unknown_metric_name_is_a_registry_error():
    with pytest.raises(KeyError, match=r"unknown metric 'blue'.*Did you mean 'bleu'"):
        CaptionEvaluator(["blue"])


def test_identical_captions_score_the_maximum():
    result = CaptionEvaluator(["bleu", "rouge_l", "cider"], tokenizer="none").score(HYPS, REFS)
    assert result.scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert result.scores["rouge_l"] == 1.0
    assert result.scores["cider"] == pytest.approx(10.0)  # CIDEr-D's x10 scale
    assert set(result.per_image) == {"a", "b"}
    assert result.per_image["b"]["cider"] == pytest.approx(10.0)


def test_bleu_precisions_by_hand():
    # 1..4-gram matches 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    result = METRICS.get("bleu")()({"x": "the cat sat on the mat"}, {"x": ["the cat sat on a mat"]})
    precisions = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    for n in range(1, 5):
        expected = math.prod(precisions[:n]) ** (1 / n)
        assert result.scores[f"bleu{n}"] == pytest.approx(expected, abs=1e-8)


def _independent_bleu(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 (0-100) on whitespace tokens: clipped n-gram counts, closest reference length (shorter on ties)."""
    correct, total, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hyp, rs in zip(hyps, refs):
        h, rs = hyp.lower().split(), [r.lower().split() for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            grams = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            best: Counter = Counter()
            for r in rs:
                best |= Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum(min(c, best[g]) for g, c in grams.items())
            total[n - 1] += sum(grams.values())
    brevity = min(1.0, math.exp(1 - ref_len / hyp_len))
    return 100 * brevity * math.exp(sum(math.log(c / t) for c, t in zip(correct, total)) / 4)


def test_sacrebleu_matches_an_independent_computation():
    hyps = {"a": "the cat sat on the mat", "b": "a dog is running in the park today"}
    refs = {"a": ["The cat sat on a mat"], "b": ["a dog runs in the park", "a dog is running in a park"]}
    result = METRICS.get("sacrebleu")()(hyps, refs)  # "b" has two references, "a" one: None-padded streams
    expected = _independent_bleu(list(hyps.values()), list(refs.values()))
    assert result.scores == {"sacrebleu": pytest.approx(expected, rel=1e-12)}
    assert 0 < expected < 100


@needs_java
def test_ptb_tokenization_lowercases_and_drops_punctuation():
    hyps, refs = {"a": "A Dog, running."}, {"a": ["a dog running"]}
    assert CaptionEvaluator(["bleu"]).score(hyps, refs).scores["bleu1"] == pytest.approx(1.0)
    assert CaptionEvaluator(["bleu"], tokenizer="none").score(hyps, refs).scores["bleu1"] < 0.5
    assert CaptionEvaluator(["sacrebleu"]).score(hyps, refs).scores["sacrebleu"] < 100  # raw text, not PTB


@needs_java
def test_ptb_tokenizer_keeps_empty_captions():
    out = coco.ptb_tokenize({"a": ["A dog."], "b": [""], "c": ["", ""]})
    assert out == {"a": ["a dog"], "b": [""], "c": ["", ""]}


def test_missing_java_is_a_clear_error_before_pycocoevalcap_runs(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(coco, "PTBTokenizer", None)  # calling it would raise TypeError, not our error
    monkeypatch.setattr(coco, "_CocoMeteor", None)
    with pytest.raises(JavaNotFoundError, match=r"apt-get install default-jre-headless.*Java 8\+|Java 8\+.*apt-get"):
        CaptionEvaluator(["bleu"]).score(HYPS, REFS)
    with pytest.raises(JavaNotFoundError, match="METEOR"):
        METRICS.get("meteor")()(HYPS, REFS)


def test_spice_without_its_jars_logs_one_line_and_reports_nothing(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(coco._spice_models, "SPICEDIR", str(tmp_path))  # no lib/*.jar there

    def no_download(*args, **kwargs):
        raise AssertionError("SPICE must not download its models")

    monkeypatch.setattr(coco._spice_models, "urlretrieve", no_download)
    with caplog.at_level(logging.WARNING):
        evaluator = CaptionEvaluator(["spice", "bleu"], tokenizer="none")
        scores = evaluator.score(HYPS, REFS).scores
    [record] = caplog.records  # one warning, one line
    assert record.getMessage().startswith("SPICE unavailable") and "\n" not in record.getMessage()
    assert "spice" not in scores and "bleu4" in scores
    # so selecting checkpoints on it is refused before training, not after the first evaluation
    assert not evaluator.reports("spice") and evaluator.reports("bleu4")


@needs_java
def test_meteor_reports_a_failed_java_process(monkeypatch):
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.METEOR_JAR", "no-such.jar")
    with pytest.raises(RuntimeError, match="METEOR's Java process failed"):
        METRICS.get("meteor")()(HYPS, REFS)


def test_hypotheses_need_references():
    with pytest.raises(ValueError, match="1 hypotheses lack references"):
        CaptionEvaluator(["bleu"], tokenizer="none").score({"a": "x", "z": "y"}, {"a": ["x"]})
    with pytest.raises(ValueError, match="no reference captions"):
        CaptionEvaluator(["bleu"], tokenizer="none").score({"a": "x"}, {"a": []})


def test_references_without_hypotheses_are_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        result = CaptionEvaluator(["bleu"], tokenizer="none").score({"a": HYPS["a"]}, REFS)
    assert "1 of 2 reference images have no hypothesis" in caplog.text
    assert set(result.per_image) == {"a"}


def test_plugin_metrics_may_return_a_float_a_dict_or_a_result(monkeypatch):
    plugins = Registry("metric", "capkit.test_no_such_group")
    plugins.register("length")(lambda hyps, refs: sum(len(h.split()) for h in hyps.values()) / len(hyps))
    plugins.register("counts")(lambda hyps, refs: {"n_images": len(hyps), "n_refs": sum(map(len, refs.values()))})

    @plugins.register("upper")
    class Upper:
        def __call__(self, hyps, refs):
            return MetricResult({"upper": 0.0}, {i: {"upper": float(h.isupper())} for i, h in hyps.items()})

    plugins.register("clash")(lambda hyps, refs: {"length": 1.0})
    monkeypatch.setattr(metric_module, "METRICS", plugins)
    result = CaptionEvaluator(["length", "counts", "upper"]).score(HYPS, REFS)  # raw text: no ptb_tokenized
    assert result.scores == {"length": 5.5, "n_images": 2.0, "n_refs": 3.0, "upper": 0.0}
    assert result.per_image == {"a": {"upper": 0.0}, "b": {"upper": 0.0}}
    with pytest.raises(ValueError, match=r"metric 'clash' reports \['length'\]"):
        CaptionEvaluator(["length", "clash"]).score(HYPS, REFS)


WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "the", "grass", "two", "cats"]


def decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def generation(sentences: list[str]) -> Generation:
    hyps = [[Hypothesis([WORDS.index(w) for w in s.split()], -1.0, -1.0, torch.zeros(1, 4))] for s in sentences]
    return Generation(hyps, (2, 2))


def test_caption_evaluator_process_evaluate_reset_and_save(tmp_path):
    evaluator = CaptionEvaluator(["bleu", "rouge_l"], tokenizer="none")
    batch = CaptionBatch(["a", "b"], references=[["a dog runs on the grass"], ["two cats"]])
    evaluator.process(batch, generation(["a dog runs on the grass", "two cats"]), decode)
    with pytest.raises(ValueError, match="processed twice"):
        evaluator.process(batch, generation(["a dog", "two cats"]), decode)
    scores = evaluator.evaluate()
    assert scores["rouge_l"] == 1.0 and set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"}
    assert evaluator.coco_results() == [
        {"image_id": "a", "caption": "a dog runs on the grass"},
        {"image_id": "b", "caption": "two cats"},
    ]
    evaluator.save(tmp_path / "captions.json", tmp_path / "per_image.json")
    assert load_predictions(tmp_path / "captions.json") == evaluator.hypotheses
    per_image = json.loads((tmp_path / "per_image.json").read_text())
    expected = {"image_id": "b", "caption": "two cats", "references": ["two cats"], **evaluator.result.per_image["b"]}
    assert per_image[1] == expected
    evaluator.reset()
    assert evaluator.hypotheses == {} and evaluator.result is None
    with pytest.raises(ValueError, match="batch.references is None"):
        evaluator.process(CaptionBatch(["a"]), generation(["a dog"]), decode)


class FakeCaptioner(nn.Module):
    """Generates fixed captions and records whether it was in training mode when asked."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.fail = fail
        self.modes: list[bool] = []

    def generate(self, images, features, *, beam_size, max_len, length_penalty, no_repeat_ngram_size, suppress_unk):
        self.modes.append(self.training)
        if self.fail:
            raise RuntimeError("boom")
        return generation(["a dog runs"] * len(images))


def test_run_evaluation_generates_in_eval_mode_and_restores_the_mode():
    loader = [
        CaptionBatch(["a", "b"], images=torch.zeros(2, 3, 8, 8), references=[["a dog runs"], ["two cats"]]),
        CaptionBatch(["c"], images=torch.zeros(1, 3, 8, 8), references=[["a dog runs on the grass"]]),
    ]
    model, evaluator = FakeCaptioner().train(), CaptionEvaluator(["bleu"], tokenizer="none")
    scores = run_evaluation(model, loader, evaluator, beam_size=2, max_len=5, length_penalty=0.0, decode=decode)
    assert model.modes == [False, False] and model.training
    assert set(evaluator.hypotheses) == {"a", "b", "c"} and 0 < scores["bleu1"] < 1
    failing = FakeCaptioner(fail=True).train()
    with pytest.raises(RuntimeError, match="boom"):
        run_evaluation(failing, loader, evaluator, beam_size=2, max_len=5, length_penalty=0.0, decode=decode)
    assert failing.training


def test_load_references_detects_coco_and_plain_layouts(tmp_path):
    coco_file, plain, bad = tmp_path / "coco.json", tmp_path / "plain.json", tmp_path / "bad.json"
    annotations = [{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}]
    coco_file.write_text(json.dumps({"annotations": annotations}))
    plain.write_text(json.dumps({"1": ["x", "y"]}))
    bad.write_text(json.dumps({"1": "x"}))
    assert load_references(coco_file) == load_references(plain) == {"1": ["x", "y"]}
    with pytest.raises(ValueError, match="expected COCO captions"):
        load_references(bad)


def test_load_predictions_rejects_two_captions_for_one_image(tmp_path):
    path = tmp_path / "pred.json"
    path.write_text(json.dumps([{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}]))
    with pytest.raises(ValueError, match="more than one caption"):
        load_predictions(path)


def _write_files(tmp_path: Path) -> tuple[Path, Path]:
    pred, refs = tmp_path / "pred.json", tmp_path / "refs.json"
    pred.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in HYPS.items()]))
    refs.write_text(json.dumps(REFS))
    return pred, refs


def test_cli_scores_a_results_file(tmp_path, capsys):
    pred, refs = _write_files(tmp_path)
    out, per_image = tmp_path / "out" / "scores.json", tmp_path / "per_image.json"
    argv = ["--predictions", str(pred), "--references", str(refs), "--metrics", "bleu", "cider", "sacrebleu",
            "--tokenizer", "none", "--out", str(out), "--per-image", str(per_image)]  # fmt: skip
    assert evaluate_main(argv) == 0
    scores = json.loads(out.read_text())
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6) and scores["sacrebleu"] == pytest.approx(100.0)
    assert "cider      10.0000" in capsys.readouterr().out
    assert [r["image_id"] for r in json.loads(per_image.read_text())] == ["a", "b"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    pred, refs = _write_files(tmp_path)
    assert evaluate_main(["--predictions", str(pred), "--references", str(refs), "--metrics", "blue"]) == 2
    assert "capkit evaluate: error: unknown metric 'blue'" in capsys.readouterr().err
    assert evaluate_main(["--predictions", str(tmp_path / "nope.json"), "--references", str(refs)]) == 2
    assert "nope.json' not found" in capsys.readouterr().err


def test_cli_help_and_mode_check(capsys):
    with pytest.raises(SystemExit) as exit_info:
        capkit_main(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "--predictions PRED" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([])
    assert exit_info.value.code == 2 and "give either --checkpoint DIR (or --model NAME|DIR), or --predictions PRED" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", "runs/x", "--predictions", "p.json", "--references", "r.json"])
    assert exit_info.value.code == 2 and "give either" in capsys.readouterr().err
