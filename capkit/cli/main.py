"""``capkit <command> [args]`` (also ``python -m capkit``): list, train, evaluate, convert, caption, demo,
visualize, ablate, export."""
from __future__ import annotations

import importlib
import sys

from capkit.cli.common import USER_ERROR

COMMANDS = {
    "list": "capkit.cli.list_components",
    "train": "capkit.cli.train",
    "caption": "capkit.cli.caption",
    "demo": "capkit.cli.demo",
    "visualize": "capkit.cli.visualize",
    "evaluate": "capkit.cli.evaluate",
    "convert": "capkit.cli.convert",
    "ablate": "capkit.cli.ablate",
    "export": "capkit.cli.export",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-V", "--version"):
        from capkit import __version__

        print(f"capkit-captioning {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = (
            f"usage: capkit {{{','.join(COMMANDS)}}} [args]  (each command has --help)\n"
            f"       capkit --version"
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"capkit: error: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
            return USER_ERROR
        print(usage)
        return 0
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
