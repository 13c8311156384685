"""Which device to run on and which precision is fast there.

``resolve_device("auto")`` picks cuda if available, else mps, else the CPU. ``default_dtype(device)`` picks float16 on
a GPU and, on the CPU, bfloat16 where the CPU has bfloat16 instructions (AVX-512-BF16 or AMX-BF16), float32 elsewhere.

A CPU without those instructions runs bfloat16 and float16 matmuls and convolutions through emulation: measured on an
AVX2-only AMD EPYC (Zen 3), matmul 0.9 GFLOP/s in bfloat16 and 0.8 GFLOP/s in float16 against 152 GFLOP/s in float32,
about 170x slower, which turns a minutes-long generation into hours. ``check_precision`` says so: the command line
refuses such a choice, the Python API warns once.

Under a distributed launcher (torchrun, accelerate, Slurm wrappers) ``ranks_from_environment`` reads this process's
place (RANK, WORLD_SIZE, LOCAL_RANK) and ``rank_device`` gives each rank its own GPU, cuda:LOCAL_RANK.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# CPU instruction sets (Linux /proc/cpuinfo flag names) that make each half precision native on the CPU. x86: the
# AVX-512 and AMX extensions; aarch64: the BFloat16 and half-precision arithmetic extensions, the ones PyTorch's own
# oneDNN device checks ask for there (ATen/native/mkldnn/Utils.h).
NATIVE_CPU_FLAGS: dict[torch.dtype, tuple[str, ...]] = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16", "asimdhp"),
}
# Where /proc/cpuinfo cannot be read: torch's own probes for the same x86 flags (every CPU with AMX tiles has AMX-BF16).
_TORCH_CPU_PROBES = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported",
                     "amx_fp16": "_is_amx_fp16_supported"}
SLOWDOWN = ("PyTorch emulates it, about 170x slower than float32 (measured matmul on an AVX2-only AMD EPYC Zen 3: "
            "bfloat16 0.9 GFLOP/s, float16 0.8 GFLOP/s, float32 152 GFLOP/s)")

_warned: set[torch.dtype] = set()  # half precisions check_precision has warned about in this process


class SlowPrecisionWarning(UserWarning):
    """A half precision the CPU has no instructions for: it runs, but emulated and much slower than float32."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags, as Linux names them in /proc/cpuinfo (x86 ``flags``, aarch64 ``Features``).

    Without /proc/cpuinfo (macOS, Windows), the flags of ``NATIVE_CPU_FLAGS`` that torch's own CPU probes report.
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset(flag for flag, probe in _TORCH_CPU_PROBES.items() if getattr(torch.cpu, probe, lambda: False)())
    return frozenset(flag for line in lines if line.partition(":")[0].strip() in ("flags", "Features")
                     for flag in line.partition(":")[2].split())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: cuda if PyTorch sees a CUDA GPU, else mps if it sees an Apple GPU, else the CPU. Anything else is
    parsed as ``torch.device`` does (``"cpu"``, ``"cuda:1"``); whether that device exists is not checked here."""
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None


def native_precision(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` runs at the hardware's own speed on ``device``: always, except bfloat16 and float16 on a CPU
    without the instructions of ``NATIVE_CPU_FLAGS`` (see the module docstring for what that costs)."""
    if torch.device(device).type != "cpu" or dtype not in NATIVE_CPU_FLAGS:
        return True
    return not cpu_flags().isdisjoint(NATIVE_CPU_FLAGS[dtype])


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The fast precision for ``device``: float16 on a GPU (as diffusers' examples run), bfloat16 on a CPU with
    bfloat16 instructions (float32 weights' range, half the memory traffic), float32 on other CPUs."""
    if torch.device(device).type != "cpu":
        return torch.float16
    return torch.bfloat16 if native_precision(device, torch.bfloat16) else torch.float32


def check_precision(device: str | torch.device, dtype: torch.dtype, *, refuse: bool,
                    way_out: str = "load with torch_dtype=torch.float32, or call .to(torch.float32)") -> None:
    """Refuse or flag a half precision the CPU has no instructions for (nothing happens where it is native).

    ``refuse=True`` (the command line) raises ``ValueError``; ``refuse=False`` (the Python API) warns with a
    ``SlowPrecisionWarning`` once per process and dtype, pointing at the caller of the function that calls this one.
    The message gives the reason, the measured slowdown and ``way_out``.
    """
    if native_precision(device, dtype):
        return
    name = str(dtype).removeprefix("torch.")
    message = (f"{name} on this CPU is slow: it has no {name} instructions ({' / '.join(NATIVE_CPU_FLAGS[dtype])}), "
               f"so {SLOWDOWN}; {way_out}")
    if refuse:
        raise ValueError(message)
    if dtype not in _warned:
        _warned.add(dtype)
        warnings.warn(message, SlowPrecisionWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------------------------
# Ranks: this process's place in a distributed run
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place in a distributed run, as torchrun / accelerate / Slurm wrappers set it."""

    rank: int = 0  # global rank, 0 .. world_size - 1
    world_size: int = 1  # processes over all machines
    local_rank: int = 0  # rank on this machine: its GPU is cuda:local_rank


def ranks_from_environment(environ: Mapping[str, str] = os.environ) -> Ranks:
    """Read RANK, WORLD_SIZE and LOCAL_RANK (RANK and WORLD_SIZE absent: one process; LOCAL_RANK absent: RANK,
    right on one machine; torchrun, accelerate and Slurm wrappers set all three).

    Raises:
        ValueError: a value that is not an integer, RANK without WORLD_SIZE or the reverse (every process would think
            it is alone, or rank 0), or a rank outside 0 .. WORLD_SIZE - 1.
    """
    given = [name for name in ("RANK", "WORLD_SIZE") if name in environ]
    if len(given) == 1:
        missing = ({"RANK", "WORLD_SIZE"} - set(given)).pop()
        raise ValueError(f"environment variable {given[0]}={environ[given[0]]!r} is set but {missing} is not: "
                         "a distributed launcher (torchrun) sets both; set both or neither")
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
        text = environ.get(name)
        if text is None:
            values[name] = default
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}: expected an integer, got {text!r}") from None
    ranks = Ranks(values["RANK"], values["WORLD_SIZE"],
                  values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else values["RANK"])
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
        raise ValueError(f"environment variables RANK={ranks.rank}, WORLD_SIZE={ranks.world_size}, "
                         f"LOCAL_RANK={ranks.local_rank}: expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return ranks


def rank_device(requested: str, local_rank: int) -> str:
    """The device of a rank: with CUDA present, ``auto`` and ``cuda`` mean its own GPU, cuda:LOCAL_RANK; any other
    value (``auto`` without CUDA included) is left to ``resolve_device``."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return requested
