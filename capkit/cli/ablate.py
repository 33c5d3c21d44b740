"""``tools/ablate.py ABLATION.yaml [key=value ...]``: train, score and tabulate attention variants."""
from __future__ import annotations

import argparse
import logging
import sys

from capkit.ablation import load_ablation, run_ablation, summarise
from capkit.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="capkit ablate",
        description="Train and evaluate each variant of an ablation config on equal terms (same data, cached "
        "features, budget and seeds); write ablation.csv, ablation.md and ablation.png. Finished runs are skipped.",
    )
    parser.add_argument("config", help="ablation YAML, e.g. configs/ablation_attention.yaml")
    parser.add_argument("overrides", nargs="*", help="overrides of the ablation config, e.g. seeds=[0] output_dir=runs/x")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        ablation = load_ablation(args.config, args.overrides)
        results = run_ablation(ablation)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = summarise(results, ablation.output_dir)
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.csv'}, {out / 'ablation.md'} and {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
