"""``capkit ablate ABLATION.yaml [key=value ...]``: train, score and tabulate attention variants."""
from __future__ import annotations

import argparse
import sys

from capkit.cli.common import add_debug_flag, command, configure_logging
from capkit.recipes.ablation import load_ablation, run_ablation, summarise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capkit ablate",
        description="Train and evaluate each variant of an ablation config on equal terms (same data, cached "
        "features, budget and seeds); write ablation.csv, ablation.md and ablation.png. Finished runs are skipped.",
    )
    parser.add_argument("config", help="ablation YAML, e.g. configs/ablation_attention.yaml")
    parser.add_argument("overrides", nargs="*", help="overrides of the ablation config, e.g. seeds=[0] output_dir=runs/x")
    add_debug_flag(parser)
    return parser


@command("capkit ablate", FileNotFoundError)
def run(args: argparse.Namespace) -> int:
    ablation = load_ablation(args.config, args.overrides)
    out = summarise(run_ablation(ablation), ablation.output_dir)
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.csv'}, {out / 'ablation.md'} and {out / 'ablation.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
