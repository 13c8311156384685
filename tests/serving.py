"""Helpers of the ``pbe serve`` tests: a real uvicorn server (in a thread, or ``python -m pbe serve`` in a subprocess),
test pictures as PNG bytes, and a Server-Sent-Events reader."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve_command(*flags: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m pbe serve FLAGS`` with the repository first on PYTHONPATH, stderr piped."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                       HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "pbe", "serve", *flags], cwd=ROOT, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until_serving(process: subprocess.Popen[str], *, timeout: float = 60) -> str:
    """The stderr lines up to and including ``serving on ...`` (fails if the process ends first)."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise AssertionError(f"pbe serve ended ({process.wait()}):\n{''.join(lines)}")
        lines.append(line)
        if line.startswith("serving on "):
            return "".join(lines)
    raise AssertionError(f"pbe serve did not start in {timeout} s:\n{''.join(lines)}")


def stop(process: subprocess.Popen[str]) -> int:
    """SIGTERM, then the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()


def png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pictures(size: tuple[int, int] = (64, 64), *, seed: int = 0) -> dict[str, PIL.Image.Image]:
    """A noise picture, a mask with a white square in the middle, an example (PIL images, ``size`` = (W, H))."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = PIL.Image.new("L", size)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    example = PIL.Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    return {"image": image, "mask": mask, "example": example}


def files(images: dict[str, PIL.Image.Image] | None = None, **replace: bytes) -> dict[str, tuple[str, bytes, str]]:
    """The three pictures as multipart file fields (PNG), some replaced by raw bytes."""
    images = images or pictures()
    out = {name: (f"{name}.png", png(image), "image/png") for name, image in images.items()}
    out.update({name: (f"{name}.bin", data, "application/octet-stream") for name, data in replace.items()})
    return out


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a Server-Sent-Events response, as they arrive."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))
