"""Running the app: bind the address first (a taken port is one clear error, port 0 picks a free one), then
serve with uvicorn, in the foreground (``capkit demo``) or on a thread (tests, the load benchmark)."""
from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from capkit.errors import ConfigError

__all__ = ["bind", "is_loopback", "serve", "serving"]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port).

    Raises:
        ConfigError: the port is taken or the address is not this machine's.
    """
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port}: already in use on {host}; give another port (0 picks a free one)") \
                from err
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); give an "
                              f"address of this machine, e.g. 127.0.0.1") from err
    sock.listen(2048)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app: FastAPI, log_level: str) -> uvicorn.Server:
    # the app's own lifespan starts the batcher; access logs would print a line per request of a load test
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on"))


def serve(app: FastAPI, sock: socket.socket, *, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until interrupted (Ctrl+C)."""
    _server(app, log_level).run(sockets=[sock])


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` on a thread while the block runs; yields its base URL (``http://127.0.0.1:PORT``)."""
    sock = bind(host, port)
    server = _server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="capkit-server", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server stopped while starting; see its log")
            threading.Event().wait(0.01)
        yield url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
