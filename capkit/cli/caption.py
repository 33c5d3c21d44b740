"""``capkit caption --checkpoint DIR IMAGE [IMAGE ...]``: print one caption per image."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capkit.cli.common import add_debug_flag, add_plugin_flag, command
from capkit.data.images import open_image
from capkit.engine.device import resolve_device
from capkit.errors import DataError
from capkit.recipes.inference import caption_images, load_trained
from capkit.visualization import save_caption_figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capkit caption", description="Caption images with a trained model.")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="e.g. RUN_DIR/checkpoints/best")
    parser.add_argument("--beam", type=int, default=3, help="beam size (1: greedy; default: %(default)s)")
    parser.add_argument("--max-len", type=int, default=16, help="most words per caption (default: %(default)s)")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="default: %(default)s")
    parser.add_argument("--attention-out", type=Path, metavar="DIR", help="save a per-word attention figure per image")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    add_plugin_flag(parser)
    add_debug_flag(parser)
    return parser


@command("capkit caption", FileNotFoundError)
def run(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise DataError(f"no such image file: {', '.join(missing)}")
    trained = load_trained(args.checkpoint, resolve_device(args.device), plugins=args.plugin)
    pictures = [open_image(path) for path in args.images]
    captions, generation = caption_images(
        trained, pictures, beam_size=args.beam, max_len=args.max_len, length_penalty=args.length_penalty
    )
    if args.attention_out:
        args.attention_out.mkdir(parents=True, exist_ok=True)
    for path, picture, caption, hyp in zip(args.images, pictures, captions, generation.best):
        print(f"{path}\t{caption}")
        if args.attention_out:
            save_caption_figure(
                args.attention_out / f"{path.stem}_attention.png", picture, hyp, generation.grid,
                words=trained.vocab.itos, data_config=trained.model.encoder.data_config, title=caption,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
