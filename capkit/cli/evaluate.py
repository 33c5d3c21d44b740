"""``python -m capkit evaluate`` / ``tools/evaluate.py``: score captions with the registered metrics.

Two modes:

- ``--checkpoint RUN_DIR/checkpoints/best --split test --beam 3``: caption a split with a trained model
  (batched beam search), then score it;
- ``--predictions PRED.json --references REFS.json``: score a COCO results file, no model involved.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

import capkit  # noqa: F401  (registers the builtins)
from capkit.cli.common import add_debug_flag, add_plugin_flag, command, configure_logging
from capkit.config import EvalConfig, to_container
from capkit.engine.device import resolve_device
from capkit.evaluation import CaptionEvaluator
from capkit.evaluation.results import write_per_image
from capkit.recipes.evaluate import score_checkpoint, score_files
from capkit.registry import METRICS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkit evaluate",
        description="Score generated captions with capkit's metrics (COCO caption metrics, sacrebleu, plugins).",
    )
    model = parser.add_argument_group("caption a split with a trained model, then score it")
    model.add_argument("--checkpoint", type=Path, metavar="DIR", help="checkpoint directory, e.g. RUN_DIR/checkpoints/best")
    model.add_argument("--split", default="test", help="dataset split to caption (default: %(default)s)")
    model.add_argument("--beam", type=int, default=3, help="beam size (1: greedy; default: %(default)s)")
    model.add_argument("--max-len", type=int, help="most words per caption (default: the run's eval.max_len)")
    model.add_argument("--length-penalty", type=float, help="default: the run's eval.length_penalty")
    model.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                       help="dataset overrides, e.g. root=/data/flickr8k (the run's data.dataset otherwise)")
    model.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    model.add_argument("--gallery", type=int, default=0, metavar="N",
                       help="write an HTML gallery of the first N images (caption, references, scores, attention)")
    model.add_argument("--gallery-dir", type=Path, metavar="DIR",
                       help="default: a gallery folder of the split in the run directory")
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
        choices=("ptb", "python", "none"),
        default="ptb",
        help="ptb: the COCO pipeline's PTB tokenizer (needs Java) before the COCO metrics; python: the same without "
        "Java (scores differ slightly, see docs/RESULTS.md); none: raw strings",
    )
    parser.add_argument("--out", type=Path, metavar="PATH", help="write the scores to this JSON file")
    parser.add_argument(
        "--per-image", type=Path, metavar="PATH", help="write per-image captions, references and scores (JSON)"
    )
    add_plugin_flag(parser)
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    by_model = args.checkpoint is not None
    by_file = args.predictions is not None or args.references is not None
    if by_model == by_file or (by_file and (args.predictions is None or args.references is None)):
        parser.error("give either --checkpoint DIR, or --predictions PRED.json and --references REFS.json")
    configure_logging(verbose_format=False)
    return run(args)


@command("capkit evaluate", FileNotFoundError, ValueError, KeyError)
def run(args: argparse.Namespace) -> int:
    evaluator = CaptionEvaluator(args.metrics, tokenizer=args.tokenizer)
    evaluator.check_runtime()
    if args.checkpoint is not None:
        scored = score_checkpoint(
            evaluator, args.checkpoint, args.split, beam_size=args.beam, max_len=args.max_len,
            length_penalty=args.length_penalty, dataset_overrides=_parse_overrides(args.data),
            device=resolve_device(args.device), plugins=args.plugin, gallery=args.gallery, gallery_dir=args.gallery_dir,
        )
        if scored.gallery is not None:
            print(f"gallery: {scored.gallery}")
    else:
        scored = score_files(evaluator, args.predictions, args.references)
    print(f"{len(scored.hypotheses)} images: {scored.source}")
    _print_table(scored.scores)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(scored.scores, indent=1) + "\n")
    if args.per_image is not None:
        write_per_image(args.per_image, scored.hypotheses, scored.references, scored.per_image)
    return 0


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ValueError(f"--data takes KEY=VALUE pairs, got {bad}")
    return to_container(OmegaConf.from_dotlist(pairs))


def _print_table(scores: dict[str, float]) -> None:
    width = max((len(k) for k in scores), default=6)
    print(f"{'metric':<{width}}  score")
    for key, value in scores.items():
        print(f"{key:<{width}}  {value:.4f}")


if __name__ == "__main__":
    sys.exit(main())
