"""Reusing freed memory for large tensors during the denoising loop on the CPU (glibc's malloc; a no-op elsewhere).

glibc serves every allocation of 32 MiB or more with fresh pages from the kernel and hands them back on free. A
denoising step allocates and frees dozens of such tensors (a float32 feature map of 960 channels at 64x64 latents,
GEGLU's hidden states), and the first touch of each fresh page costs a page fault and the kernel zeroing it:
measured here, 10 ms per 42 MB tensor, 11% of a float32 UNet call and 7% of a bfloat16 one. Inside
``reuse_freed_memory()`` malloc keeps freed memory in its heap and serves later allocations from it; on the way out,
the unused heap is handed back to the kernel. Tensors on a GPU never go through malloc: there it does nothing.

What the way out can and cannot restore. Below 32 MiB glibc adapts by itself: its mmap threshold starts at 128 KiB and,
each time a fresh-page block is freed, rises to that block's size (at most ``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB on
64-bit), with the trim threshold at twice that; so a loop of 12 MiB tensors takes fresh pages only in its first
rounds. Any ``mallopt`` of M_MMAP_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD or M_TOP_PAD (and the same settings made
through the environment) switches that adaptation off for the rest of the process, and no interface switches it back
on (glibc's ``mp_.no_dyn_threshold``, malloc/malloc.c). Restoring the numbers found on entry would freeze the
threshold where it stood, 128 KiB in a fresh process: measured, a 12 MiB loop then takes 3,073 fresh pages in every
round, for ever. So, unless the process started with its own settings in the environment (then those come back
exactly), the way out sets the values the adaptation converges to: threshold 32 MiB, trim threshold 64 MiB. A 12 MiB
loop afterwards behaves as in a process that never entered the block (fresh pages in the first rounds, none after:
tests/test_memory.py); what differs is that sizes between the threshold glibc had reached and 32 MiB come from the
heap at once rather than after the first free, and up to 64 MiB of free heap top is kept rather than twice the
threshold reached.

It pays where the same sizes come back again and again, as in the denoising loop (the pipeline wraps exactly that).
A few large tensors of varied sizes, as in the autoencoder at 512x512, fragment the heap instead: measured there, the
same speed-up but up to 0.7 GB (bfloat16) / 1.5 GB (float32) more peak memory, so the pipeline runs it outside.
The same effect can be had for a whole process by starting it with ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.

    with pbe.reuse_freed_memory(device):      # research loops can do what the pipeline does
        for t in timesteps:
            eps = nets.unet(sample, t, context)
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# mallopt(3) parameters, and the environment variables / GLIBC_TUNABLES names glibc reads them from at start-up.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_SETTINGS = {  # parameter: (environment variable, tunable, glibc's default)
    _M_MMAP_MAX: ("MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max", 65536),
    _M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold", 128 * 1024),
    _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold", 128 * 1024),
}
# Where glibc's own adaptation ends: DEFAULT_MMAP_THRESHOLD_MAX = 4 MiB * sizeof(long), trim threshold twice that.
_ADAPTED_MMAP_THRESHOLD = 4 * 2**20 * ctypes.sizeof(ctypes.c_long)
_ADAPTED = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: _ADAPTED_MMAP_THRESHOLD, _M_TRIM_THRESHOLD: 2 * _ADAPTED_MMAP_THRESHOLD}
_NEVER = 2**31 - 1  # the largest value mallopt takes

_lock = threading.Lock()
_depth = 0  # nesting level of reuse_freed_memory(), across threads: malloc's settings are per process


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _settings_on_exit(environ: dict[str, str]) -> dict[int, int]:
    """The mallopt values the block leaves behind: the process's own start-up settings if it has any, else the values
    glibc's adaptation converges to (see the module docstring: the adaptation itself cannot be switched back on)."""
    tunables = dict(item.partition("=")[::2] for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    given = {param: _number(environ.get(env, tunables.get(tunable))) for param, (env, tunable, _) in _SETTINGS.items()}
    if all(value is None for value in given.values()):
        return dict(_ADAPTED)
    # Some settings given at start-up: glibc's adaptation was off from the start, the others hold their defaults.
    return {param: _SETTINGS[param][2] if value is None else value for param, value in given.items()}


def _number(text: str | None) -> int | None:
    """An environment setting as glibc reads it (decimal, or 0x hexadecimal); None if absent or unreadable."""
    try:
        return None if text is None else int(text, 16 if text.lower().startswith("0x") else 10)
    except ValueError:
        return None


_LIBC = _glibc()
_ON_EXIT = _settings_on_exit(dict(os.environ))


def active() -> bool:
    """Whether freed memory is being kept for reuse right now (inside ``reuse_freed_memory()`` on glibc)."""
    return _LIBC is not None and _depth > 0


@contextmanager
def reuse_freed_memory(device: torch.device | str = "cpu") -> Iterator[None]:
    """Within this block, large CPU tensors reuse memory freed by earlier ones instead of fresh pages from the kernel.

    Exact: it changes where tensors live, never what is computed. Only tensors on the CPU come from malloc, so for any
    other ``device`` (where the loop's tensors live) it does nothing. Nests, and is safe across threads (the outermost
    exit hands the unused memory back). Meant for loops that allocate the same sizes at every iteration; see the
    module docstring for what it costs elsewhere and what the way out restores.
    """
    global _depth
    if _LIBC is None or torch.device(device).type != "cpu":
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_MAX, 0)  # serve every size from the heap ...
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _NEVER)  # ... and keep what is freed there
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for param, value in _ON_EXIT.items():
                    _LIBC.mallopt(param, value)
                _LIBC.malloc_trim(0)
