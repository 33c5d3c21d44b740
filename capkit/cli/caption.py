"""``capkit caption IMAGE|FOLDER|LIST.txt ... [--model NAME] [--output caps.jsonl]``: caption images.

Without ``--model`` the shipped pretrained model (``sat-flickr8k``) is used. Captions go to stdout (one
``image<TAB>caption`` line each) or, with ``--output``, to a JSON Lines, CSV or COCO results file that a later
run with the same output resumes. ``--runtime onnx --model EXPORT_DIR`` decodes with onnxruntime a model that
``capkit export`` wrote (``capkit_onnx``), the same captions as PyTorch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from capkit.cli.common import add_debug_flag, add_decoding_flags, add_model_flags, command, configure_logging, \
    decoding_flags, load_model_from_args, positive_int
from capkit.errors import ConfigError, CorruptImageError, ModelNotFoundError
from capkit.evaluation.results import OUTPUT_FORMATS
from capkit.recipes.captioning import caption_files, collect_images, default_workers
from capkit.recipes.evaluate import describe_decoding

log = logging.getLogger("capkit.caption")

MAX_WORKERS = 64  # image-reading processes; more only contend for the cores
RUNTIMES = ("torch", "onnx")


def worker_count(text: str) -> int:
    """An argparse type: 0 to ``MAX_WORKERS`` image-reading processes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_WORKERS}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkit caption",
        description="Caption images with a pretrained or trained model (default: the shipped sat-flickr8k).",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE",
                        help="image files, folders (searched recursively) or .txt files listing image paths")
    add_model_flags(parser)
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="onnx: decode with onnxruntime a folder written by `capkit export` (--model EXPORT_DIR) "
                        "(default: %(default)s)")
    parser.add_argument("--output", "-o", type=Path, metavar="FILE",
                        help="write the captions here (resumes: images already in it are skipped); default: stdout")
    parser.add_argument("--format", choices=OUTPUT_FORMATS,
                        help="output format (default: by the file's suffix: .csv, .json COCO results, else jsonl)")
    add_decoding_flags(parser)
    parser.add_argument("--n-best", type=positive_int, default=1, metavar="N",
                        help="also write each image's N best captions with their scores (JSON Lines output; "
                        "N at most the beam size)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help="images per batch (default: the model's)")
    parser.add_argument("--workers", type=worker_count, metavar="N",
                        help=f"processes reading the images (0: none; default: {default_workers()})")
    parser.add_argument("--attention-out", type=Path, metavar="DIR", help="save a per-word attention figure per image")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    return parser


@command("capkit caption", FileNotFoundError)
def run(args: argparse.Namespace) -> int:
    files = collect_images(args.inputs)
    model = load_model_from_args(args) if args.runtime == "torch" else load_exported_model(args)
    decoding = model.decoding_with(**decoding_flags(args))
    if args.n_best > decoding["beam_size"]:
        raise ConfigError(f"--n-best {args.n_best} is more than the beam size {decoding['beam_size']}: a beam search "
                          f"keeps that many captions; raise --beam")
    log.info("decoding: %s (%s)", describe_decoding(decoding),
             "the model's settings" if decoding == model.decoding else "flags over the model's settings")

    def show(image, result) -> None:
        print(f"{image.path}\t{result.caption}", flush=True)
        for rank, (caption, score) in enumerate(result.n_best[1:], 2):  # the best is the line above
            print(f"{image.path}\t#{rank} {caption} ({score:.3f})", flush=True)

    def skipped(image, why: str) -> None:
        if len(files) > 1:  # one image that cannot be read is the error below, in one line
            log.warning("skipped %s: %s", image.path, why)

    summary = caption_files(
        model, files, output=args.output, output_format=args.format, decoding=decoding, batch_size=args.batch_size,
        attention_out=args.attention_out, on_result=None if args.output else show, on_unreadable=skipped,
        progress=not args.no_progress and args.output is not None, workers=args.workers, n_best=args.n_best,
    )
    if summary.unreadable and not summary.captioned and not summary.already_done:
        path, why = summary.unreadable[0]
        raise CorruptImageError(why if len(files) == 1 else f"none of the {len(files)} images could be read "
                                f"(first: {path}: {why})")
    where = f" into {args.output}" if args.output else ""
    log.info("captioned %d images%s; %d already there; %d unreadable%s", summary.captioned, where,
             summary.already_done, len(summary.unreadable), " (listed above)" if summary.unreadable else "")
    return 0


def load_exported_model(args: argparse.Namespace):
    """``--runtime onnx``: the export folder ``--model`` names, in onnxruntime."""
    from capkit.export.runtime import load_onnx_model  # onnxruntime only for this runtime

    if args.model is None or len(args.model) != 1:
        raise ModelNotFoundError("--runtime onnx needs one --model EXPORT_DIR, a folder written by `capkit export "
                                 "--format onnx` (a checkpoint, a model name or an ensemble runs with --runtime torch)")
    model = load_onnx_model(args.model[0])
    log.info("model: %s (%s)", args.model[0], model.architecture)
    return model


def main(argv: list[str] | None = None) -> int:
    configure_logging(verbose_format=False)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
