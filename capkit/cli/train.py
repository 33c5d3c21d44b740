"""``capkit train CONFIG [key=value ...] [--resume RUN_DIR]``: train, keep the best checkpoint, test it.

``train.objective=scst train.init_from=RUN/checkpoints/best`` continues a cross-entropy run with self-critical
training on CIDEr-D (the usual second stage). The recipe is ``capkit.recipes.train``.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from capkit.cli.common import add_debug_flag, command, configure_logging, non_negative_int
from capkit.config import load_config
from capkit.recipes.train import train_experiment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkit train",
        description="Train a captioner from a YAML config, evaluate the best checkpoint on the test split.",
    )
    parser.add_argument("config", help="experiment YAML or a bundled config's name, e.g. configs/demo.yaml or demo")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.lr=1e-4 model.attention.name=none")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    start.add_argument("--overwrite", action="store_true", help="replace the run already in the run directory")
    parser.add_argument("--samples", type=non_negative_int, default=5,
                        help="test images whose captions are printed at the end")
    add_debug_flag(parser)
    return parser


@command("capkit train", FileNotFoundError)
def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    train_experiment(cfg, config_path=args.config, resume=args.resume, overwrite=args.overwrite, samples=args.samples,
                     command=args.command_line)
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_intermixed_args(argv)
    args.command_line = shlex.join(["capkit", "train", *argv])  # for the run's summary and a model card
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
