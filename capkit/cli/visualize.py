"""``capkit visualize IMAGE --out FIGURE.png [--model NAME | --checkpoint DIR]``: caption one image and draw
where the model looked for every word."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from matplotlib.backend_bases import FigureCanvasBase

from capkit.cli.common import add_debug_flag, add_decoding_flags, add_model_flags, check_output, command, \
    configure_logging, decoding_flags, load_model_from_args, positive_int
from capkit.errors import OutputPathError
from capkit.recipes.evaluate import describe_decoding

log = logging.getLogger("capkit.visualize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkit visualize", description="Draw where a trained model looks for every word it writes."
    )
    parser.add_argument("image", type=Path, help="an image file")
    parser.add_argument("--out", type=Path, required=True, metavar="PNG", help="where to write the figure")
    add_model_flags(parser)
    add_decoding_flags(parser)
    parser.add_argument("--columns", type=positive_int, default=5, help="panels per row (default: %(default)s)")
    add_debug_flag(parser)
    return parser


@command("capkit visualize", FileNotFoundError)
def run(args: argparse.Namespace) -> int:
    check_output(args.out, "--out")
    check_figure_path(args.out, inputs=[args.image, *(args.model or []), *(args.checkpoint or [])])
    model = load_model_from_args(args)
    decoding = model.decoding_with(**decoding_flags(args))
    log.info("decoding: %s (%s)", describe_decoding(decoding),
             "the model's settings" if decoding == model.decoding else "flags over the model's settings")
    result = model.caption(args.image, **decoding)
    result.save_figure(args.out, columns=args.columns)
    print(f"{result.caption}\n{args.out}")
    return 0


def check_figure_path(out: Path, *, inputs: list) -> None:
    """``--out`` names a format matplotlib writes, and neither an input file nor a file inside a model folder
    given (a figure written there would destroy what was read)."""
    target = out.resolve()
    for given in map(Path, inputs):
        if given.is_file() and out.exists() and out.samefile(given):
            raise OutputPathError(f"--out {out} is an input of this command; give another file for the figure")
        if given.is_dir() and target.is_relative_to(given.resolve()):
            raise OutputPathError(f"--out {out} is inside the model folder {given}; write the figure elsewhere")
    if out.suffix.lower().lstrip(".") not in FigureCanvasBase.get_supported_filetypes():
        raise OutputPathError(f"--out {out}: a figure is written as .png, .pdf, .svg, .jpg (or another format "
                              f"matplotlib writes): give a file name with one of those suffixes")


def main(argv: list[str] | None = None) -> int:
    configure_logging(verbose_format=False)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
