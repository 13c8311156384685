"""``pbe serve`` under load: 20 concurrent event-stream requests against a queue of 5 on the tiny stand-in, twice.

Every request completes or is refused 503 with Retry-After (none errors or hangs; a refused client asks again after
Retry-After seconds, so each wave paints all 20), the server stays up, and its memory stays flat: the resident size
after a second identical wave is within ``RSS_GROWTH_BOUND`` of the first's.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import PIL.Image

from conftest import HUB_SMALL
from serving import events, files, free_port, pictures, serve_command, stop, wait_until_serving

REQUESTS, QUEUE, SIDE = 20, 5, 64
# Large examples (cheap: CLIP shrinks them to 224x224) make each request hold ~1.5 MB: its 512x512 upload and the
# decoded example. The first wave grows the heap to what one painting needs (the networks' activations, allocator
# arenas of the server's threads) and that memory is reused after. A request that leaked its job or its upload would
# add 20 x 0.75 MB or more per wave; 8 MB keeps room for the allocator's noise (0.2-0.5 MB measured) and catches that.
EXAMPLE_SIDE = 512
EXAMPLES = [PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (EXAMPLE_SIDE, EXAMPLE_SIDE, 3),
                                                                     dtype=np.uint8)) for seed in range(4)]
RSS_GROWTH_BOUND = 8 * 1024 * 1024


def _rss(pid: int) -> int:
    """The resident set size of process ``pid`` in bytes (/proc/PID/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _one(url: str, seed: int) -> tuple[str, Any]:
    """One event-stream request: ("done", size), ("refused", Retry-After) or what went wrong."""
    inputs = pictures((SIDE, SIDE), seed=seed % 4)
    inputs["example"] = EXAMPLES[seed % len(EXAMPLES)]
    with httpx.Client(base_url=url, timeout=120) as http, http.stream(
            "POST", "/api/paint", files=files(inputs), data={"steps": "2", "seed": str(seed)},
            headers={"Accept": "text/event-stream"}) as response:
        if response.status_code == 503:
            response.read()
            return "refused", int(response.headers["retry-after"])
        if response.status_code != 200:
            return f"status {response.status_code}", response.read()
        last = None
        for name, data in events(response):
            last = name, data
        if last and last[0] == "done":
            return "done", (last[1]["width"], last[1]["height"])
        return f"ended with {last}", None


def _until_painted(url: str, seed: int) -> list[tuple[str, Any]]:
    """Ask as a patient client does: again after Retry-After seconds while refused; every outcome, in order."""
    outcomes = [_one(url, seed)]
    while outcomes[-1][0] == "refused" and len(outcomes) < 50:
        time.sleep(outcomes[-1][1])
        outcomes.append(_one(url, seed))
    return outcomes


def _wave(url: str) -> tuple[list[list[tuple[str, Any]]], float]:
    start = time.monotonic()
    with ThreadPoolExecutor(REQUESTS) as pool:
        outcomes = list(pool.map(lambda seed: _until_painted(url, seed), range(REQUESTS)))
    return outcomes, time.monotonic() - start


def test_twenty_concurrent_requests_complete_or_are_refused_and_memory_stays_flat() -> None:
    port = free_port()
    server = serve_command("--checkpoint", str(HUB_SMALL), "--device", "cpu", "--dtype", "fp32",
                           "--port", str(port), "--queue", str(QUEUE))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(server)
        rss, figures = [], []
        for _ in range(2):
            tries, seconds = _wave(url)
            first = [kind for (kind, _), *_ in tries]
            assert set(first) <= {"done", "refused"}, tries
            assert first.count("done") >= QUEUE + 1  # the running one and a full queue at least
            assert all(outcome[-1] == ("done", (SIDE, SIDE)) for outcome in tries), tries  # all painted in the end
            assert all(value >= 1 for outcome in tries for kind, value in outcome if kind == "refused")
            health = httpx.get(f"{url}/api/health", timeout=30).json()
            assert health["status"] == "ok" and health["queue"]["waiting"] == 0
            rss.append(_rss(server.pid))
            refused = sum(len(outcome) - 1 for outcome in tries)
            figures.append(f"{REQUESTS} painted ({first.count('refused')} refused at first, {refused} refusals in "
                           f"all) in {seconds:.2f} s ({REQUESTS / seconds:.2f} paintings/s), "
                           f"RSS {rss[-1] / 2**20:.1f} MiB")
        print("\n" + "\n".join(figures), f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
        assert rss[1] - rss[0] <= RSS_GROWTH_BOUND, figures
    finally:
        assert stop(server) == 130
