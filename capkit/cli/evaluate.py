"""``python -m capkit evaluate`` / ``tools/evaluate.py``: score captions with the registered metrics.

Mode: ``--predictions PRED.json --references REFS.json`` scores a COCO results file, no model involved.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import capkit  # noqa: F401  (registers the builtins)
from capkit.config import EvalConfig
from capkit.evaluation import CaptionEvaluator, JavaNotFoundError, MetricResult, load_predictions, load_references
from capkit.evaluation.results import write_per_image
from capkit.registry import METRICS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkit evaluate",
        description="Score generated captions with capkit's metrics (COCO caption metrics, sacrebleu, plugins).",
    )
    files = parser.add_argument_group("score a results file (no model)")
    files.add_argument(
        "--predictions", type=Path, metavar="PRED.json", help='COCO results JSON: [{"image_id": ..., "caption": ...}]'
    )
    files.add_argument(
        "--references",
        type=Path,
        metavar="REFS.json",
        help='COCO captions JSON ({"annotations": [{"image_id", "caption"}]}) or a {image_id: [captions]} mapping',
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=EvalConfig().metrics,
        metavar="NAME",
        help=f"registered metric names (default: %(default)s; known: {', '.join(METRICS.names())})",
    )
    parser.add_argument(
        "--tokenizer",
        choices=("ptb", "none"),
        default="ptb",
        help="ptb: the COCO pipeline's PTB tokenizer (needs Java) before the COCO metrics; none: raw strings",
    )
    parser.add_argument("--out", type=Path, metavar="PATH", help="write the scores to this JSON file")
    parser.add_argument(
        "--per-image", type=Path, metavar="PATH", help="write per-image captions, references and scores (JSON)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.predictions is None or args.references is None:
        parser.error("give --predictions PRED.json and --references REFS.json")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        evaluator = CaptionEvaluator(args.metrics, ptb_tokenize=args.tokenizer == "ptb")
        hyps, refs, result = _score_files(evaluator, args.predictions, args.references)
    except (FileNotFoundError, ValueError, KeyError, JavaNotFoundError) as err:
        print(f"capkit evaluate: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 1
    print(f"{len(hyps)} images: {args.predictions} against {args.references}")
    _print_table(result.scores)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.scores, indent=1) + "\n")
    if args.per_image is not None:
        write_per_image(args.per_image, hyps, refs, result.per_image)
    return 0


def _score_files(
    evaluator: CaptionEvaluator, predictions: Path, references: Path
) -> tuple[dict[str, str], dict[str, list[str]], MetricResult]:
    hyps = load_predictions(predictions)
    refs = load_references(references)
    return hyps, refs, evaluator.score(hyps, refs)


def _print_table(scores: dict[str, float]) -> None:
    width = max((len(k) for k in scores), default=6)
    print(f"{'metric':<{width}}  score")
    for key, value in scores.items():
        print(f"{key:<{width}}  {value:.4f}")
