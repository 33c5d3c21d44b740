"""``capkit demo [--model NAME|DIR] [--host 127.0.0.1] [--port 7860]``: a web page to caption photos and see
where the model looked, and the HTTP endpoint behind it (``POST /caption``, ``GET /health``)."""
from __future__ import annotations

import argparse
import logging
import sys

from capkit.cli.common import add_debug_flag, add_model_flags, command, configure_logging, load_model_from_args, \
    model_name, positive_int
from capkit.serve.settings import ServeSettings

log = logging.getLogger("capkit.demo")


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeSettings()
    parser = argparse.ArgumentParser(
        prog="capkit demo",
        description="Serve a model: a demo page at / (upload a photo, read its captions, see each word's attention) "
        "and an HTTP API (POST /caption with an image, GET /health).",
    )
    add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=7860, help="default: %(default)s; 0 picks a free port")
    parser.add_argument("--max-batch", type=positive_int, default=defaults.max_batch,
                        help="most images in one beam search; 1 turns batching off (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait * 1000,
                        help="how long a request waits for others to share its beam search (default: %(default)g)")
    parser.add_argument("--timeout", type=float, default=defaults.timeout,
                        help="seconds a request may wait for its caption (default: %(default)g)")
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20,
                        help="largest upload accepted (default: %(default)g MiB)")
    parser.add_argument("--max-pixels", type=positive_int, default=defaults.max_pixels,
                        help="largest image accepted, in pixels (default: %(default)d)")
    add_debug_flag(parser)
    return parser


INSTALL_SERVE = "pip install 'capkit-captioning[serve]'"


@command("capkit demo")
def run(args: argparse.Namespace) -> int:
    from capkit.errors import ConfigError, MissingDependencyError

    try:
        from capkit.serve.app import create_app
        from capkit.serve.server import bind, is_loopback, serve, url
    except ImportError as err:
        raise MissingDependencyError(f"capkit demo needs FastAPI, uvicorn and python-multipart ({err.name} is "
                                     f"missing): {INSTALL_SERVE}") from err

    if not args.host.strip():  # an empty address would listen on every network
        raise ConfigError("--host is empty: give an address, e.g. 127.0.0.1 (this machine only) or 0.0.0.0")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: give a port from 0 to 65535")
    for flag, value in (("--max-wait-ms", args.max_wait_ms), ("--timeout", args.timeout),
                        ("--max-upload-mb", args.max_upload_mb)):
        if not value >= 0 or (flag != "--max-wait-ms" and value == 0):
            raise ConfigError(f"{flag} {value:g}: give a positive number")
    sock = bind(args.host, args.port)  # before the model loads: a taken port is known at once
    model = load_model_from_args(args)
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels, timeout=args.timeout,
        max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
        model_name=model_name(args),
    )
    if not is_loopback(args.host):
        log.warning("listening on %s: anyone who can reach this machine can use the model", args.host)
    print(f"capkit demo: {settings.model_name} at {url(sock)}  (API: POST /caption, GET /health; Ctrl+C stops)",
          flush=True)
    serve(create_app(model, settings), sock)
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging(verbose_format=False)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
