"""``capkit visualize IMAGE --checkpoint DIR --out FIGURE.png``: caption one image and draw its attention."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capkit.cli.common import add_debug_flag, add_plugin_flag, command
from capkit.data.images import open_image
from capkit.engine.device import resolve_device
from capkit.recipes.inference import caption_images, load_trained
from capkit.visualization import save_caption_figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkit visualize", description="Draw where a trained model looks for every word it writes."
    )
    parser.add_argument("image", type=Path, help="an image file")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="e.g. RUN_DIR/checkpoints/best")
    parser.add_argument("--out", type=Path, required=True, metavar="PNG", help="where to write the figure")
    parser.add_argument("--beam", type=int, default=3, help="beam size (default: %(default)s)")
    parser.add_argument("--max-len", type=int, default=16, help="most words (default: %(default)s)")
    parser.add_argument("--columns", type=int, default=5, help="panels per row (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    add_plugin_flag(parser)
    add_debug_flag(parser)
    return parser


@command("capkit visualize", FileNotFoundError)
def run(args: argparse.Namespace) -> int:
    picture = open_image(args.image)
    trained = load_trained(args.checkpoint, resolve_device(args.device), plugins=args.plugin)
    (caption,), generation = caption_images(trained, [picture], beam_size=args.beam, max_len=args.max_len)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_caption_figure(
        args.out, picture, generation.best[0], generation.grid, words=trained.vocab.itos,
        data_config=trained.model.encoder.data_config, columns=args.columns, title=caption,
    )
    print(f"{caption}\n{args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
