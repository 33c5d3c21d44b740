"""``capkit export --model NAME|DIR --format onnx OUT_DIR``: a trained model as ONNX graphs for runtimes without
PyTorch (``capkit_onnx``, ``capkit caption --runtime onnx``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capkit.cli.common import add_debug_flag, add_model_flags, command, configure_logging, load_model_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkit export",
        description="Export a model as ONNX graphs (encoder, attention memory, decoder step) and a config.json, "
        "checked against the model, for onnxruntime without PyTorch.",
    )
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="the folder to write")
    add_model_flags(parser)
    parser.set_defaults(device="cpu")  # the graphs are traced on the CPU
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="default: %(default)s")
    parser.add_argument("--fp16", action="store_true",
                        help="store the weights as float16 (files half the size; computed in float32)")
    parser.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in OUT_DIR")
    add_debug_flag(parser)
    return parser


@command("capkit export", FileNotFoundError)
def run(args: argparse.Namespace) -> int:
    from capkit.errors import ConfigError
    from capkit.export.onnx import export_onnx  # torch.onnx is imported by no other command

    if len(args.model or args.checkpoint or []) > 1:
        raise ConfigError("an ensemble is exported as its members: give one --model or --checkpoint per export")
    model = load_model_from_args(args)
    summary = export_onnx(model, args.out, fp16=args.fp16, opset=args.opset, overwrite=args.overwrite)
    for name, size in summary.sizes.items():
        print(f"{summary.directory / name}\t{size / 1e6:.1f} MB")
    checks = ", ".join(f"{role} {diff:.1e}" for role, diff in summary.max_abs_diff.items())
    print(f"checked with onnxruntime against the model (largest difference: {checks})")
    print(f"caption with: capkit caption IMAGE --runtime onnx --model {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging(verbose_format=False)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
