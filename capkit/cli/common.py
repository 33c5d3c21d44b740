"""What every command shares: one line and exit status 2 for a user error, a traceback only for a bug."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capkit.errors import CapkitError, ConfigError, OutputPathError

__all__ = [
    "USER_ERROR",
    "DEFAULT_MODEL",
    "add_debug_flag",
    "add_plugin_flag",
    "add_model_flags",
    "add_decoding_flags",
    "positive_int",
    "non_negative_int",
    "load_model_from_args",
    "model_name",
    "check_output",
    "parse_overrides",
    "print_scores",
    "command",
    "configure_logging",
    "message",
]

USER_ERROR = 2  # the exit status of a user error, as argparse uses for a bad command line
DEFAULT_MODEL = "sat-flickr8k"  # the pretrained package capkit ships (plugins/capkit-sat-flickr8k)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import this module for the model's components (repeatable); a checkpoint's own plugin list is "
        "never imported",
    )


def add_model_flags(parser: argparse.ArgumentParser, *, default: str | None = DEFAULT_MODEL) -> None:
    """``--model NAME|DIR`` (or ``--checkpoint DIR``), ``--revision``, ``--device`` and ``--plugin``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--model", metavar="NAME|DIR", action="append", help="a saved model directory, an installed pretrained model "
        "or a Hugging Face Hub repo id" + (f" (default: {default})" if default else "") + "; repeated: an ensemble",
    )
    which.add_argument("--checkpoint", metavar="DIR", action="append",
                       help="a training checkpoint, e.g. RUN_DIR/checkpoints/best; repeated: an ensemble")
    parser.add_argument("--revision", help="the Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    add_plugin_flag(parser)
    parser.set_defaults(default_model=default)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


MAX_BEAM, MAX_WORDS = 64, 256  # beyond these a beam search holds gigabytes, or runs for hours, for nothing


def at_most(limit: int, why: str, least: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer from ``least`` to ``limit``."""

    def parse(text: str) -> int:
        value = int_at_least(least)(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit} ({why}), got {value}")
        return value

    return parse


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """``--beam``, ``--max-len``, ``--length-penalty``, ``--no-repeat-ngram-size``, ``--[no-]suppress-unk``: each
    defaults to the model's own setting."""
    parser.add_argument("--beam", type=at_most(MAX_BEAM, "each beam holds every image's hypotheses in memory"),
                        metavar="K", help=f"beam size, 1: greedy, at most {MAX_BEAM} (default: the model's)")
    parser.add_argument("--max-len", type=at_most(MAX_WORDS, "no caption is that long"), metavar="N",
                        help=f"most words per caption, at most {MAX_WORDS} (default: the model's)")
    parser.add_argument("--length-penalty", type=float, metavar="A", help="default: the model's")
    parser.add_argument("--no-repeat-ngram-size", type=at_most(MAX_WORDS, "no caption is that long", least=0),
                        metavar="N", help="N > 0: no caption repeats one of its N-grams (3: no 'a dog and a dog'); "
                                          "0: no constraint (default: the model's)")
    parser.add_argument("--suppress-unk", action=argparse.BooleanOptionalAction, default=None,
                        help="never write <unk>, which the caption's text would drop ('a man holding a') "
                             "(default: the model's)")


def decoding_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of ``add_decoding_flags`` as ``decoding_with``'s overrides (None: the model's setting)."""
    return dict(beam_size=args.beam, max_len=args.max_len, length_penalty=args.length_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size, suppress_unk=args.suppress_unk)


def load_model_from_args(args: argparse.Namespace):
    """The model that ``add_model_flags``' flags name, on the device they ask for; several ``--model`` (or
    ``--checkpoint``) flags make an ensemble of them."""
    # imported here: every command imports this module, and ``capkit train`` needs none of these
    from capkit.engine.device import resolve_device
    from capkit.pretrained.ensemble import ensemble

    device = resolve_device(args.device)
    names = _model_names(args)
    models = [_load_one(args, name, device) for name in names]
    model = models[0] if len(models) == 1 else ensemble(models)
    logging.getLogger("capkit").info("model: %s%s (%s)", " + ".join(map(str, names)),
                                     "" if args.checkpoint or args.model else " (the default)", model.architecture)
    return model


def model_name(args: argparse.Namespace) -> str:
    """What ``add_model_flags``' flags name, in words: ``a + b`` for an ensemble."""
    return " + ".join(map(str, _model_names(args)))


def _model_names(args: argparse.Namespace) -> list[str | None]:
    """The ``--checkpoint`` or ``--model`` values given, else the command's default model."""
    return args.checkpoint or args.model or [args.default_model]


def _load_one(args: argparse.Namespace, name: str | None, device):
    from capkit.errors import ModelNotFoundError
    from capkit.pretrained.model import TrainedCaptioner
    from capkit.recipes.inference import load_trained

    if name is not None and not str(name).strip():
        raise ModelNotFoundError(f"{'--checkpoint' if args.checkpoint else '--model'} is empty: give a model folder, "
                                 f"an installed model's name or a Hub repo id")
    if args.checkpoint:
        return load_trained(name, device, plugins=args.plugin)
    if name is None:
        raise ModelNotFoundError("give a model: --model NAME|DIR or --checkpoint DIR")
    try:
        return TrainedCaptioner.from_pretrained(name, device=device, revision=args.revision, plugins=args.plugin)
    except ModelNotFoundError as err:
        if args.model is None:  # the default is missing: say how to get it
            raise ModelNotFoundError(
                f"{err}. The default model {name!r} ships as a package: pip install plugins/capkit-{name} (from a "
                f"capkit checkout), or give --model NAME|DIR or --checkpoint DIR"
            ) from err
        raise


def check_output(path: Path | None, flag: str, *, folder: bool = False) -> None:
    """Refuse an output path that cannot be written before any work is done (not after it: the work would be
    lost): a folder where a file belongs or the reverse, a file where a parent folder belongs, no permission.
    Creates nothing."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise OutputPathError(f"{flag} {path}: is a {'file' if folder else 'folder'}; give a "
                              f"{'folder' if folder else 'file name'}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{flag} {path}: {ancestor} is a file, so nothing can be written below it")
    if not os.access(ancestor, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputPathError(f"{flag} {path}: cannot be written here (permission denied); give another path")


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``--data KEY=VALUE ...`` as a dict (values typed as YAML)."""
    from omegaconf import OmegaConf

    from capkit.config import to_container

    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError(f"--data takes KEY=VALUE pairs, got {bad}")
    return to_container(OmegaConf.from_dotlist(pairs))


def print_scores(scores: dict[str, float]) -> None:
    width = max((len(k) for k in scores), default=6)
    print(f"{'metric':<{width}}  score")
    for key, value in scores.items():
        print(f"{key:<{width}}  {value:.4f}")


def message(err: BaseException) -> str:
    """The error's text on one line (a wrapped library message can span several); a plain ``KeyError`` would
    quote it."""
    text = str(err.args[0]) if type(err) is KeyError and err.args else str(err)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


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
