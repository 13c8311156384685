"""Where the time of one guided UNet call goes, for pbe and diffusers, on the benchmark's full-size stand-in.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/profile_unet.py --dtype bf16      # after scripts/benchmark.py built it

Each library runs in its own subprocess: one warm-up call, then ``--repeats`` timed calls with every leaf layer timed
by wall clock (forward hooks, and a wrapper around ``F.scaled_dot_product_attention``). torch.profiler is not used:
on this CPU it inflates small elementwise ops several-fold. The categories:

    attention 4096 tok   scaled_dot_product_attention over 4096 tokens (the 64x64 level's self-attention)
    attention other      every other scaled_dot_product_attention
    conv 3x3 / conv 1x1  nn.Conv2d by kernel size
    linear               nn.Linear
    norm                 GroupNorm / LayerNorm layers (pbe's fused GroupNorm-SiLU included)
    rest                 the call's wall time minus the above: activations, residual adds, reshapes, concatenation

The last line states the floor: what the two kernel families pbe cannot change (PyTorch's attention and oneDNN's
convolutions) take in pbe's call, as a fraction of diffusers' whole call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = ("attention 4096 tok", "attention other", "conv 3x3", "conv 1x1", "linear", "norm", "rest")


def _benchmark_module() -> Any:
    spec = importlib.util.spec_from_file_location("pbe_benchmark", REPO_ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _category(module: Any) -> str | None:
    from torch import nn

    from pbe.model.layers import GroupNorm, LayerNorm

    if isinstance(module, nn.Conv2d):
        return "conv 1x1" if module.kernel_size == (1, 1) else "conv 3x3"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm, GroupNorm, LayerNorm)):
        return "norm"
    return None


def profile(library: str, dtype_name: str, repeats: int, threads: int, cache_root: Path) -> dict[str, float]:
    """Median seconds per category over ``repeats`` calls of ``library``'s guided UNet call on the stand-in in
    ``cache_root``."""
    import torch
    import torch.nn.functional as F

    bench = _benchmark_module()
    torch.set_num_threads(threads)
    cache = bench.Cache(cache_root)
    geometry = bench.read_geometry(cache, bench.STANDINS[cache_root.name])
    dtype = bench.torch_dtype(dtype_name)
    if library == "pbe":
        import pbe

        unet, scope = pbe.load(cache.native(dtype_name), dtype=dtype).unet, pbe.reuse_freed_memory()
    else:
        import contextlib

        unet, scope = bench.diffusers_component("unet", cache.hub, dtype), contextlib.nullcontext()
    x = bench.task_inputs("unet", geometry, dtype)

    spent: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}
    for module in unet.modules():
        if (name := _category(module)) is not None:
            module.register_forward_pre_hook(lambda m, _: started.__setitem__(id(m), time.perf_counter()))
            module.register_forward_hook(
                lambda m, _i, _o, name=name: spent.__setitem__(name, spent[name] + time.perf_counter() - started[id(m)]))
    sdpa = F.scaled_dot_product_attention

    def timed_sdpa(q: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = sdpa(q, *args, **kwargs)
        spent["attention 4096 tok" if q.shape[-2] == 4096 else "attention other"] += time.perf_counter() - start
        return out

    F.scaled_dot_product_attention = timed_sdpa
    runs = []
    with torch.no_grad(), scope:
        bench.guided_unet_call(library, unet, x)
        for _ in range(repeats):
            spent.clear()
            start = time.perf_counter()
            bench.guided_unet_call(library, unet, x)
            total = time.perf_counter() - start
            runs.append(dict(spent) | {"rest": total - sum(spent.values()), "total": total})
    return {key: statistics.median(run.get(key, 0.0) for run in runs) for key in (*CATEGORIES, "total")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/pbe-benchmark"),
                        help="scripts/benchmark.py's --cache (default ~/.cache/pbe-benchmark)")
    parser.add_argument("--tiny", action="store_true", help="the tiny stand-in (for tests)")
    parser.add_argument("--worker", choices=("pbe", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.cache.expanduser() / ("tiny" if args.tiny else "full")
    if args.worker:
        print(json.dumps(profile(args.worker, args.dtype, args.repeats, args.threads, root)))
        return 0
    if not (root / "COMPLETE.json").is_file():
        sys.exit(f"no stand-in in {root}: build it first with scripts/benchmark.py --build-only"
                 f"{' --tiny' if args.tiny else ''} --cache {args.cache}")

    results: dict[str, dict[str, float]] = {}
    for library in ("pbe", "diffusers"):
        command = [sys.executable, __file__, "--worker", library, "--dtype", args.dtype, "--repeats",
                   str(args.repeats), "--threads", str(args.threads), "--cache", str(args.cache)]
        command += ["--tiny"] if args.tiny else []
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                              env=os.environ | {"HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
                                                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                                            os.environ.get("PYTHONPATH")]))})
        if proc.returncode:
            sys.exit(f"{library} failed:\n{proc.stderr[-2000:]}")
        results[library] = json.loads(proc.stdout.strip().splitlines()[-1])

    pbe_r, ref = results["pbe"], results["diffusers"]
    print(f"one guided UNet call, {args.dtype}, {args.threads} threads, median of {args.repeats} (seconds)")
    print(f"{'':<20}{'pbe':>8}{'diffusers':>11}")
    for key in (*CATEGORIES, "total"):
        print(f"{key:<20}{pbe_r[key]:>8.4f}{ref[key]:>11.4f}")
    floor = pbe_r["attention 4096 tok"] + pbe_r["attention other"] + pbe_r["conv 3x3"] + pbe_r["conv 1x1"]
    print(f"pbe / diffusers: {pbe_r['total'] / ref['total']:.2f}; pbe's attention + convolutions alone: {floor:.3f} s "
          f"= {floor / ref['total']:.2f} of diffusers' call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
