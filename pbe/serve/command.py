"""``pbe serve``: load the model once and serve the page and the HTTP API with uvicorn until Ctrl-C or SIGTERM.

Refused before the model loads (usage errors, exit status 2): a host other than loopback without ``--allow-remote``,
bad limits, a port already in use (tried by binding it). Bound to another host it warns that anyone who reaches it
can use the model. Ctrl-C or SIGTERM cancels the paintings (each stops at its next step), closes the connections
and ends with exit status 130, as every pbe command.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import Any

from ..errors import UsageError
from ..options import ModelOptions
from .limits import Limits

DESCRIPTION = "serve a web page and an HTTP API that paint with one model (see /docs for the API)"
MEGABYTE = 1024 * 1024
TOKEN_VARIABLE = "PBE_SERVE_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``pbe serve``'s flags: where it listens, who may use it, its limits, and the model (``ModelOptions``)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; another one needs "
                             "--allow-remote)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a --host other than loopback: anyone who reaches it can use the model")
    parser.add_argument("--token", default=os.environ.get(TOKEN_VARIABLE) or None,
                        help=f"require this token (Authorization: Bearer TOKEN) to paint; the printed URL carries "
                             f"it (default: the environment variable {TOKEN_VARIABLE}, which, unlike the flag, other "
                             f"users of this machine cannot read in the process list)")
    parser.add_argument("--queue", type=int, default=None,
                        help=f"requests that may wait while one paints; more are answered 503 (default "
                             f"{Limits().queue})")
    parser.add_argument("--max-upload-mb", type=float, default=None,
                        help=f"largest request body, the three pictures together, in MiB (default "
                             f"{Limits().max_upload_bytes / MEGABYTE:g})")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help=f"largest picture, width x height, read before decoding (default "
                             f"{Limits().max_pixels})")
    ModelOptions.add_arguments(parser)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _limits(args: argparse.Namespace) -> Limits:
    """The ``Limits`` the flags ask for (the defaults where a flag is absent); a UsageError names the flag."""
    changes: dict[str, Any] = {}
    if args.queue is not None:
        changes["queue"] = args.queue
    if args.max_pixels is not None:
        changes["max_pixels"] = args.max_pixels
    if args.max_upload_mb is not None:
        if not args.max_upload_mb > 0 or args.max_upload_mb * MEGABYTE >= 2**63:
            raise UsageError(f"--max-upload-mb: expected a positive number of MiB, got {args.max_upload_mb!r}")
        changes["max_upload_bytes"] = max(1, int(args.max_upload_mb * MEGABYTE))
    flags = {"queue": "--queue", "max_pixels": "--max-pixels", "max_upload_bytes": "--max-upload-mb"}
    try:
        return Limits(**changes)
    except ValueError as err:
        name, _, problem = str(err).partition(": ")
        raise UsageError(f"{flags.get(name, name)}: {problem}") from None


def _check_installed() -> None:
    """A UsageError naming the missing package when the ``serve`` extra is not installed."""
    for package in ("fastapi", "uvicorn", "python_multipart"):
        try:
            __import__(package)
        except ImportError:
            name = package.replace("_", "-")
            raise UsageError(f"pbe serve needs {name} (the serve extra): pip install 'pbe[serve]'") from None


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (uvicorn serves on it); a UsageError when the port is taken or the host
    is not an address of this machine."""
    if not 0 <= port < 65536:
        raise UsageError(f"--port: expected a port from 0 to 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise UsageError(f"--host: cannot resolve {host!r} ({err.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(f"--port: cannot listen on {host}:{port} ({err.strerror}); is another server running "
                         f"there? Choose another --port") from None
    return sock


def run(args: argparse.Namespace) -> int:
    """``pbe serve``: check, bind, load, serve; returns when the server stops (Ctrl-C or SIGTERM raise
    ``KeyboardInterrupt`` out of here, which ``pbe.cli`` turns into exit status 130)."""
    if not _is_loopback(args.host) and not args.allow_remote:
        raise UsageError(f"--host {args.host}: not a loopback address; anyone who reaches it could use the model: "
                         f"add --allow-remote to serve it anyway (and consider --token)")
    if args.token is not None and not args.token.strip():
        raise UsageError("--token: expected a non-empty text, got ''")
    _check_installed()
    limits = _limits(args)
    model, choice = ModelOptions.from_arguments(args).resolved()
    sock = _bind(args.host, args.port)
    try:
        return _serve(sock, args, model, choice, limits)
    finally:
        sock.close()


def _serve(sock: socket.socket, args: argparse.Namespace, model: ModelOptions, choice: str, limits: Limits) -> int:
    import uvicorn

    from ..pipeline import PaintByExample
    from .app import create_app

    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host}, not only on this machine: anyone who can reach port {args.port} can "
              f"use the model{'' if args.token else ' (add --token to require a token)'}", file=sys.stderr)
    print(choice, file=sys.stderr)
    pipe = PaintByExample.from_pretrained(model.checkpoint, dtype=model.torch_dtype, device=model.device,
                                          config=model.config, lora=model.lora, lora_scale=model.lora_scale)
    app = create_app(pipe, model=model, limits=limits, token=args.token)
    port = sock.getsockname()[1]
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown_host}:{port}/" + (f"#token={args.token}" if args.token else "")
    print(f"serving on {url} (API: http://{shown_host}:{port}/docs; Ctrl-C to stop)", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Stop the paintings first: an open event stream would otherwise hold the shutdown until it ends.
            app.state.painter.stop()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
