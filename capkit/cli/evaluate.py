"""``python -m capkit evaluate`` / ``tools/evaluate.py``: score captions with the registered metrics.

Two modes:

- ``--checkpoint RUN_DIR/checkpoints/best --split test --beam 3``: caption a split with a trained model
  (batched beam search), then score it;
- ``--predictions PRED.json --references REFS.json``: score a COCO results file, no model involved.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

import capkit  # noqa: F401  (registers the builtins)
from capkit.config import EvalConfig, to_container
from capkit.data.transforms import visible_region
from capkit.engine.device import resolve_device
from capkit.evaluation import CaptionEvaluator, JavaNotFoundError, MetricResult, load_predictions, load_references
from capkit.evaluation.results import write_per_image
from capkit.evaluation.evaluator import run_evaluation
from capkit.inference import caption_images, load_eval_split, load_trained
from capkit.types import EOS
from capkit.visualization.gallery import GalleryItem, write_gallery
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
    model.add_argument("--gallery-dir", type=Path, metavar="DIR", help="default: RUN_DIR/gallery_<split>")
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
    by_model = args.checkpoint is not None
    by_file = args.predictions is not None or args.references is not None
    if by_model == by_file or (by_file and (args.predictions is None or args.references is None)):
        parser.error("give either --checkpoint DIR, or --predictions PRED.json and --references REFS.json")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        evaluator = CaptionEvaluator(args.metrics, ptb_tokenize=args.tokenizer == "ptb")
        if by_model:
            hyps, refs, result, source = _score_checkpoint(evaluator, args)
        else:
            hyps, refs, result = _score_files(evaluator, args.predictions, args.references)
            source = f"{args.predictions} against {args.references}"
    except (FileNotFoundError, ValueError, KeyError, JavaNotFoundError) as err:
        print(f"capkit evaluate: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 1
    print(f"{len(hyps)} images: {source}")
    _print_table(result.scores)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.scores, indent=1) + "\n")
    if args.per_image is not None:
        write_per_image(args.per_image, hyps, refs, result.per_image)
    return 0


def _score_checkpoint(
    evaluator: CaptionEvaluator, args: argparse.Namespace
) -> tuple[dict[str, str], dict[str, list[str]], MetricResult, str]:
    trained = load_trained(args.checkpoint, resolve_device(args.device))
    cfg = trained.config
    split, loader = load_eval_split(trained, args.split, _parse_overrides(args.data))
    run_evaluation(
        trained.model, loader, evaluator, beam_size=args.beam,
        max_len=cfg.eval.max_len if args.max_len is None else args.max_len,
        length_penalty=cfg.eval.length_penalty if args.length_penalty is None else args.length_penalty,
        decode=trained.vocab.decode,
    )
    source = f"{split.data.name} {args.split} split, {args.checkpoint}, beam {args.beam}"
    if args.gallery:
        out = args.gallery_dir or args.checkpoint.parent.parent / f"gallery_{args.split}"
        page = _write_gallery(out, trained, split, evaluator, args)
        print(f"gallery: {page}")
    return evaluator.hypotheses, evaluator.references, evaluator.result, source


def _write_gallery(out: Path, trained, split, evaluator: CaptionEvaluator, args: argparse.Namespace) -> Path:
    """Caption the first ``--gallery`` images again, keeping their attention maps, and write the page."""
    records = split.records[: args.gallery]
    images = [r.open() for r in records]
    captions, generation = caption_images(
        trained, images, beam_size=args.beam,
        max_len=trained.config.eval.max_len if args.max_len is None else args.max_len,
        length_penalty=trained.config.eval.length_penalty if args.length_penalty is None else args.length_penalty,
    )
    items = [
        GalleryItem(
            image_id=r.image_id, image=image, caption=caption, references=r.captions,
            scores=evaluator.result.per_image.get(r.image_id, {}),
            words=[trained.vocab.itos[t] for t in hyp.tokens] + [EOS], alphas=hyp.alphas, grid=generation.grid,
            region=visible_region(*image.size, trained.model.encoder.data_config),
        )
        for r, image, caption, hyp in zip(records, images, captions, generation.best)
    ]
    return write_gallery(out, items, title=f"{args.checkpoint}: {args.split} split, beam {args.beam}")


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ValueError(f"--data takes KEY=VALUE pairs, got {bad}")
    return to_container(OmegaConf.from_dotlist(pairs))


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
