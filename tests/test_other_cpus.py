"""The comparisons with committed references, run again on another CPU's code paths.

A CPU cannot be swapped in a test, but the libraries' kernel choice can be capped below what this CPU has: PyTorch's
vectorised kernels (``ATEN_CPU_CAPABILITY``), oneDNN's convolutions and matrix products (``ONEDNN_MAX_CPU_ISA``) and
numpy's SIMD maths (``NPY_DISABLE_CPU_FEATURES``). One level below this CPU's best (AVX-512 -> AVX2, AVX2 -> no
vector kernels) is how an older CPU computes, and the fixture scripts count the caps into the CPU signature, so the
committed references are compared there by the other-CPU rule of tests/committed.py. A representative selection runs
in a subprocess: sampler schedules and trajectories, networks, a whole pipeline, the live re-derivation, the helper's
own tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
SELECTION = [
    "tests/test_committed.py",
    *(f"tests/test_schedulers.py::test_matches_diffusers_after_every_step[{case}]"
      for case in ("pndm-7", "ddim_eta-7", "lms-20", "euler_karras-20", "euler-ancestral-20", "dpmpp-2m-karras-7",
                   "unipc-7")),
    "tests/test_networks.py::test_networks_match_reference[hub-fp32]",
    "tests/test_pipeline_parity.py::test_same_seed_same_image_as_diffusers[pndm_guided]",
    "tests/test_reference_live.py::test_reference_tensors_match_live_recomputation",
]


def capped_environment() -> dict[str, str]:
    """Variables that make this CPU compute one level below its best, for torch, oneDNN and numpy."""
    import torch

    best = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", "SVE256", "NEON", ...
    aten, onednn = ("avx2", "AVX2") if best.upper().startswith("AVX512") else ("default", "SSE41")
    try:  # numpy's optional SIMD targets, lowest first
        from numpy._core._multiarray_umath import __cpu_dispatch__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__

    # The SIMD targets numpy may dispatch to above the cap: AVX2 keeps its x86-64-v3 target, "default" none.
    above = [t for t in __cpu_dispatch__ if aten == "default" or not re.match(r"X86_V3|AVX2|FMA3|F16C", t)]
    env = {"ATEN_CPU_CAPABILITY": aten, "NPY_DISABLE_CPU_FEATURES": " ".join(above)}
    if os.uname().machine in ("x86_64", "AMD64"):
        env["ONEDNN_MAX_CPU_ISA"] = onednn
    return env


def test_the_cap_makes_another_machine() -> None:
    env = capped_environment()
    capped = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts');"
                             "import make_reference_tensors as m, torch;"
                             "print(m.machine_signature()); print(torch.backends.cpu.get_cpu_capability())"],
                            cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    signature, capability = capped.stdout.splitlines()[-2:]
    assert signature != load_script("make_reference_tensors").machine_signature()
    assert capability.lower() == env["ATEN_CPU_CAPABILITY"]


def test_committed_references_hold_on_a_capped_cpu() -> None:
    env = {**os.environ, **capped_environment(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECTION],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 20 and "failed" not in summary and "skipped" not in summary, summary
