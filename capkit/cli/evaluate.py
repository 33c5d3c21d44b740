"""``capkit evaluate``: score captions with the registered metrics.

Two modes:

- ``--checkpoint RUN_DIR/checkpoints/best --split test`` (or ``--model NAME|DIR``): caption a split of the
  dataset the model was trained on (batched beam search, the model's own decoding settings unless flags say
  otherwise), then score it;
- ``--predictions PRED --references REFS.json`` (or ``--split val --data name=flickr8k root=...``): score a
  captions file (COCO results, or ``capkit caption``'s JSON Lines or CSV), no model involved.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import capkit  # noqa: F401  (registers the builtins)
from capkit.cli.common import (
    add_debug_flag,
    check_output,
    add_decoding_flags,
    add_model_flags,
    command,
    configure_logging,
    decoding_flags,
    load_model_from_args,
    model_name,
    non_negative_int,
    parse_overrides,
    print_scores,
)
from capkit.config import EvalConfig
from capkit.engine.run_dir import RunDir
from capkit.errors import OutputPathError
from capkit.evaluation import CaptionEvaluator
from capkit.evaluation.results import write_per_image
from capkit.recipes.evaluate import describe_decoding, score_checkpoint, score_files
from capkit.registry import METRICS

log = logging.getLogger("capkit.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkit evaluate",
        description="Score generated captions with capkit's metrics (COCO caption metrics, sacrebleu, plugins).",
    )
    model = parser.add_argument_group("caption a split with a trained model, then score it")
    add_model_flags(model, default=None)
    model.add_argument("--split", default="test", help="dataset split to caption or score against (default: %(default)s)")
    add_decoding_flags(model)
    model.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                       help="dataset overrides, e.g. root=/data/flickr8k (the run's data.dataset otherwise); with "
                       "--predictions, the dataset whose --split holds the references (name=flickr8k root=...)")
    model.add_argument("--gallery", type=non_negative_int, default=0, metavar="N",
                       help="write an HTML gallery of the first N images (caption, references, scores, attention)")
    model.add_argument("--gallery-dir", type=Path, metavar="DIR",
                       help="default: a gallery folder of the split in the run directory")
    files = parser.add_argument_group("score a results file (no model)")
    files.add_argument(
        "--predictions", type=Path, metavar="PRED",
        help='COCO results JSON ([{"image_id": ..., "caption": ...}]) or capkit caption\'s .jsonl or .csv output',
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
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    by_model = args.checkpoint is not None or args.model is not None
    by_file = args.predictions is not None or args.references is not None
    if by_model == by_file or (by_file and args.predictions is None):
        parser.error("give either --checkpoint DIR (or --model NAME|DIR), or --predictions PRED with --references "
                     "REFS.json or --data name=DATASET ... --split SPLIT")
    if by_file and args.references is None and not args.data:
        parser.error("--predictions needs its references: --references REFS.json, or --data name=DATASET root=... "
                     "with --split SPLIT")
    configure_logging(verbose_format=False)
    return run(args)


@command("capkit evaluate", FileNotFoundError, ValueError, KeyError)
def run(args: argparse.Namespace) -> int:
    check_output(args.out, "--out")
    check_output(args.per_image, "--per-image")
    if args.out is not None and args.per_image is not None and args.out.resolve() == args.per_image.resolve():
        raise OutputPathError(f"--out and --per-image are both {args.out}: one would overwrite the other; give two "
                              f"files")
    check_output(args.gallery_dir, "--gallery-dir", folder=True)
    evaluator = CaptionEvaluator(args.metrics, tokenizer=args.tokenizer)
    evaluator.check_runtime()
    if args.checkpoint is not None or args.model is not None:
        model = load_model_from_args(args)
        gallery_dir = args.gallery_dir
        if args.gallery and gallery_dir is None:  # beside the run, or here for a model that has no run
            gallery_dir = RunDir.of_checkpoint(args.checkpoint[0]).gallery(args.split) \
                if args.checkpoint and len(args.checkpoint) == 1 else Path(f"gallery_{args.split}")
        scored = score_checkpoint(
            evaluator, model, args.split, **decoding_flags(args), dataset_overrides=parse_overrides(args.data),
            gallery=args.gallery, gallery_dir=gallery_dir, name=model_name(args),
        )
        log.info("decoding: %s (%s)", describe_decoding(scored.decoding),
                 "the model's settings" if scored.decoding == model.decoding else "flags over the model's settings")
        if scored.gallery is not None:
            print(f"gallery: {scored.gallery}")
    else:
        dataset = parse_overrides(args.data) if args.references is None else None
        scored = score_files(evaluator, args.predictions, args.references, dataset=dataset, split=args.split)
    print(f"{len(scored.hypotheses)} images: {scored.source}")
    print_scores(scored.scores)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(scored.scores, indent=1) + "\n")
    if args.per_image is not None:
        write_per_image(args.per_image, scored.hypotheses, scored.references, scored.per_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
