"""What every command shares: one line and exit status 2 for a user error, a traceback only for a bug."""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable

from capkit.errors import CapkitError

__all__ = ["USER_ERROR", "add_debug_flag", "add_plugin_flag", "command", "configure_logging", "message"]

USER_ERROR = 2  # the exit status of a user error, as argparse uses for a bad command line


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import this module for the model's components (repeatable); a checkpoint's own plugin list is "
        "never imported",
    )


def message(err: BaseException) -> str:
    """The error's text; a plain ``KeyError`` would quote it."""
    return str(err.args[0]) if type(err) is KeyError and err.args else str(err)


def command(
    prog: str, *user_errors: type[BaseException]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorate a command's ``run(args) -> exit status``: a ``CapkitError`` (or one of ``user_errors``) becomes
    ``<prog>: error: <message>`` on stderr and status 2, unless ``args.debug`` asks for the traceback."""

    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def guarded(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except (CapkitError, *user_errors) as err:
                if getattr(args, "debug", False):
                    raise
                print(f"{prog}: error: {message(err)}", file=sys.stderr)
                return USER_ERROR

        return guarded

    return wrap


def configure_logging(verbose_format: bool = True) -> None:
    """INFO logs with times (training) or levels (the other commands) on stderr."""
    fmt = "%(asctime)s %(name)s: %(message)s" if verbose_format else "%(levelname)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S")
