"""pbe.reuse_freed_memory(): inside it, large CPU tensors reuse freed memory (no fresh pages, so no page faults);
after it, the process allocates as one that never entered it; on other devices it does nothing.

Measured with the process's own minor page-fault counter. malloc's settings belong to the whole process and some of
them cannot be put back exactly (see pbe.memory), so every measurement runs in a fresh Python process: the test
process itself is never touched.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from pbe import memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning exists for glibc only")

LARGE = 16 * 2**20  # float32 elements: 64 MiB, above glibc's largest mmap threshold (32 MiB): fresh pages by default
MEDIUM = 3 * 2**20  # 12 MiB, below it: glibc's own adaptation serves it from the heap after the first rounds
ROUNDS = 24

PRELUDE = f"""
import json, resource
import torch
import pbe
from pbe import memory

def faults(numel, rounds={ROUNDS}):
    '''Minor page faults of each of `rounds` allocate-fill-free cycles of a float32 tensor of `numel` elements.'''
    counts = []
    for i in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(numel).fill_(float(i))
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts
"""


def run_fresh(body: str) -> dict:
    """Run ``body`` (after PRELUDE) in a fresh Python process; it prints one JSON object, returned here."""
    code = PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES"):
        env.pop(name, None)  # glibc's defaults, whatever the test process was started with
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def fresh_rounds(counts: list[int], numel: int) -> int:
    """Rounds that took fresh pages (more than a twentieth of the tensor's pages)."""
    return sum(count > numel * 4 // 4096 // 20 for count in counts)


def reuses(counts: list[int], numel: int) -> bool:
    # Small allocations in between may split a freed block, so the heap can grow again in the first few rounds (seen:
    # up to 9 of 24), then stays. Without reuse, no round gets away without fresh pages.
    return fresh_rounds(counts, numel) <= len(counts) // 2


def test_large_tensors_reuse_freed_memory_inside_and_not_outside() -> None:
    seen = run_fresh("""
        outside = faults(%d)
        with pbe.reuse_freed_memory():
            active = memory.active()
            inside = faults(%d)
        print(json.dumps({"outside": outside, "inside": inside, "active": active, "after": memory.active()}))
    """ % (LARGE, LARGE))
    assert fresh_rounds(seen["outside"], LARGE) == ROUNDS, seen["outside"]  # glibc's default: fresh pages every time
    assert seen["active"] and not seen["after"]
    assert reuses(seen["inside"], LARGE), seen["inside"]


def test_after_the_block_the_process_allocates_like_one_that_never_entered_it() -> None:
    """glibc's own adaptation serves a 12 MiB loop from the heap after its first rounds. Setting malloc's parameters
    switches that off for good (3,073 fresh pages in every round); the block must not leave it so."""
    never = run_fresh("print(json.dumps(faults(%d)))" % MEDIUM)
    after = run_fresh("""
        with pbe.reuse_freed_memory():
            faults(%d, rounds=3)
        print(json.dumps(faults(%d)))
    """ % (LARGE, MEDIUM))
    assert not any(never[ROUNDS // 2:]), never  # the premise: glibc settles within half the rounds
    assert not any(after[ROUNDS // 2:]), after
    assert fresh_rounds(after, MEDIUM) <= fresh_rounds(never, MEDIUM) + 2, (after, never)


def test_after_the_block_the_largest_tensors_take_fresh_pages_again() -> None:
    after = run_fresh("""
        with pbe.reuse_freed_memory():
            faults(%d, rounds=3)
        print(json.dumps(faults(%d)))
    """ % (LARGE, LARGE))
    assert fresh_rounds(after, LARGE) == ROUNDS, after  # freed memory goes back to the kernel, as by default


def test_nesting_keeps_the_setting_until_the_outermost_exit() -> None:
    seen = run_fresh("""
        with pbe.reuse_freed_memory():
            with pbe.reuse_freed_memory():
                pass
            active = memory.active()
            inside = faults(%d)
        print(json.dumps({"active": active, "inside": inside, "after": memory.active()}))
    """ % LARGE)
    assert seen["active"] and not seen["after"]
    assert reuses(seen["inside"], LARGE), seen["inside"]


def test_an_exception_inside_still_leaves_the_block() -> None:
    seen = run_fresh("""
        try:
            with pbe.reuse_freed_memory():
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        print(json.dumps({"active": memory.active(), "after": faults(%d)}))
    """ % LARGE)
    assert not seen["active"]
    assert fresh_rounds(seen["after"], LARGE) == ROUNDS, seen["after"]


@pytest.mark.parametrize("device", ["meta", "cuda", "cuda:1", "mps"])
def test_other_devices_leave_malloc_alone(device) -> None:
    """Tensors on a GPU never come from malloc: nothing to save there, so malloc's settings stay untouched."""
    seen = run_fresh("""
        with pbe.reuse_freed_memory(%r):
            active = memory.active()
            inside = faults(%d, rounds=4)
        print(json.dumps({"active": active, "inside": inside}))
    """ % (device, LARGE))
    assert not seen["active"]
    assert fresh_rounds(seen["inside"], LARGE) == 4, seen["inside"]


def test_settings_left_behind() -> None:
    """Without start-up settings: where glibc's adaptation ends (32 MiB threshold on 64-bit, trim at twice that).
    With some: exactly those, the others at glibc's defaults (the adaptation was off from the start)."""
    mmap_max, threshold, trim = memory._M_MMAP_MAX, memory._M_MMAP_THRESHOLD, memory._M_TRIM_THRESHOLD
    adapted = memory._settings_on_exit({})
    assert adapted == {mmap_max: 65536, threshold: 32 * 2**20, trim: 64 * 2**20} or sys.maxsize < 2**32
    assert memory._settings_on_exit({"MALLOC_MMAP_MAX_": "0"}) == {mmap_max: 0, threshold: 131072, trim: 131072}
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.trim_threshold=0x100000"}
    assert memory._settings_on_exit(tunables) == {mmap_max: 65536, threshold: 131072, trim: 2**20}
    assert memory._settings_on_exit({"MALLOC_MMAP_THRESHOLD_": "not a number"}) == adapted  # glibc ignores it too
