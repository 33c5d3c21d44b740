"""``capkit list``: every registered component as ``<kind>\\t<name>\\t<origin>``."""
from __future__ import annotations

import argparse

import capkit  # noqa: F401  (registers the builtins)
from capkit.cli.common import add_debug_flag, command
from capkit.registry import REGISTRIES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="capkit list", description="List every registered component: kind, name and origin."
    )
    parser.add_argument("kind", nargs="?", choices=sorted(REGISTRIES), help="only this kind")
    add_debug_flag(parser)
    return run(parser.parse_args(argv))


@command("capkit list")
def run(args: argparse.Namespace) -> int:
    for kind, registry in REGISTRIES.items():
        if args.kind and kind != args.kind:
            continue
        for name in registry.names():
            print(f"{kind}\t{name}\t{registry.origin(name)}")
    return 0
