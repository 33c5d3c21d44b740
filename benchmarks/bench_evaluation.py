"""Evaluation time on the 5,000-image COCO Karpathy test fixture: PTB tokenisation and each metric.

Uses ``../shared/data/metric_fixtures/coco_karpathy_test5k`` (5,000 images, 25,010 reference captions and one
generated caption per image); skipped with a message when the fixture or Java is missing. Times, in one pass
each (they run for seconds, one call each is what an evaluation pays): the PTB tokenizer on hypotheses and
references together (one Java call, as ``CaptionEvaluator`` does), then every COCO metric on the tokenized
captions (METEOR includes the start of its Java subprocess), SPICE only when its Stanford CoreNLP jars are
present, and ``sacrebleu`` on the raw strings. The corpus scores are checked against the fixture's published
ones. Prints a table and writes ``benchmarks/results/bench_evaluation.json``.
Run: ``python -m benchmarks`` (or ``make bench``).
"""
from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import write_results
from capkit.evaluation.coco import ptb_tokenize, spice_missing_jars
from capkit.evaluation.metric import as_result, build_metric

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "metric_fixtures" / "coco_karpathy_test5k"
# capkit score key -> the fixture's published key
PUBLISHED = {"bleu1": "Bleu_1", "bleu4": "Bleu_4", "meteor": "METEOR", "rouge_l": "ROUGE_L", "cider": "CIDEr",
             "spice": "SPICE"}


def load() -> tuple[dict[str, str], dict[str, list[str]], dict[str, float]]:
    refs: dict[str, list[str]] = defaultdict(list)
    for a in json.loads((FIXTURE / "image_caption_gt.json").read_text())["annotations"]:
        refs[str(a["image_id"])].append(a["caption"])
    predictions = json.loads((FIXTURE / "image_caption_prediction.json").read_text())
    hyps = {str(p["image_id"]): p["caption"] for p in predictions}
    expected = json.loads((FIXTURE / "expected_scores.json").read_text())["expected"]
    return hyps, dict(refs), expected


def main() -> None:
    if not FIXTURE.is_dir():
        print(f"skipped: the COCO fixture {FIXTURE} is absent")
        return
    if shutil.which("java") is None:
        print("skipped: Java is needed for the PTB tokenizer and METEOR (apt-get install default-jre-headless)")
        return
    hyps, refs, expected = load()
    rows = []
    start = time.perf_counter()
    captions = {("hyp", i): [h] for i, h in hyps.items()} | {("ref", i): r for i, r in refs.items()}
    tokenized = ptb_tokenize(captions)
    rows.append({"step": "ptb_tokenize", "seconds": time.perf_counter() - start, "scores": {}})
    tok_hyps = {i: tokenized[("hyp", i)][0] for i in hyps}
    tok_refs = {i: tokenized[("ref", i)] for i in refs}

    metrics = ["bleu", "meteor", "rouge_l", "cider"] + ([] if spice_missing_jars() else ["spice"])
    for name in metrics + ["sacrebleu"]:
        metric = build_metric(name)
        start = time.perf_counter()
        scores = as_result(name, metric(hyps, refs) if name == "sacrebleu" else metric(tok_hyps, tok_refs)).scores
        seconds = time.perf_counter() - start
        for key, value in scores.items():
            if key in PUBLISHED:
                published = expected[PUBLISHED[key]]
                assert abs(value - published) < 1e-6, f"{key} {value} != published {published}"
        rows.append({"step": name, "seconds": seconds, "scores": dict(scores)})
        del metric  # ends METEOR's Java subprocess
    total = sum(r["seconds"] for r in rows)
    print(f"COCO Karpathy test fixture: {len(hyps)} images, {sum(map(len, refs.values()))} references; one pass each"
          + ("" if "spice" in metrics else "; SPICE skipped (its Stanford CoreNLP jars are missing)"))
    print(f"{'step':<14}{'seconds':>9}  scores")
    for r in rows:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in r["scores"].items())
        print(f"{r['step']:<14}{r['seconds']:>9.2f}  {scores}")
    print(f"{'total':<14}{total:>9.2f}  (published COCO scores reproduced to 1e-6)")
    write_results("bench_evaluation", torch.device("cpu"), {"images": len(hyps), "results": rows, "total_s": total})


if __name__ == "__main__":
    main()
