"""The committed reference files in tests/fixtures, and the one way tests read and compare them.

The reference files hold outputs of diffusers/transformers (never of pbe), computed by ``scripts/make_*_references.py``
and ``scripts/make_reference_tensors.py`` on one CPU, whose signature they record in their "machine" metadata. Float
results of the same computation differ between CPUs by rounding: vector kernels (AVX2, AVX-512, AMX; numpy's SIMD
maths) sum in other orders, fuse other multiply-adds and use other approximations of log/exp/sin. So a comparison with
a committed reference must know where the reference was made: tight on the same CPU, and on another CPU the same
bound widened by what float rounding alone can move the reference there (never more). Tests therefore read a
committed file only as ``CommittedReference(name)``: it hands out the INPUTS the reference was computed from, and
compares OUTPUTS only through ``assert_close`` / ``assert_matches_live`` / ``assert_rounds_to``, which apply that rule;
reading an output any other way raises, and tests/test_committed.py fails if a test opens a committed file itself.

What rounding can do on another CPU, by kind of output:
* ``schedule`` (timesteps, sigma tables, the initial noise scale): a short chain of elementwise float32/float64 ops
  (pow, log, exp, interpolation). Vector maths libraries are accurate to within 1-4 ulps per op; measured between the
  CPUs we met: 1 ulp (145.93905639648438 vs 145.9390411376953). Each element may move by ``SCHEDULE_ULPS`` ulps of
  its own magnitude.
* ``network`` (UNet/VAE/encoder outputs, pipeline latents and images, sampler trajectories): dot products and
  convolutions with K up to 2880 terms summed in CPU-specific blocks; reordering a K-term sum moves it by up to
  ~sqrt(K) ulps of its terms' scale (~54 for K = 2880), and a pipeline chains a few UNet calls and a decoder.
  Measured between AMD EPYC AVX-512-BF16, AMD EPYC Zen 3 AVX2-only and Intel Xeon AMX: up to 14 ulps of the tensor's
  largest value for one network call, 58 for 3-step pipeline images. ``CROSS_MACHINE_FLOAT32`` = 2^-16 of the
  tensor's largest value (128 ulps) is twice the worst, and ~1000x below what a real change does (a wrong timestep,
  a reordered random draw or a different weight moves outputs by 1e-2 or more).
* ``bf16`` (the reference networks run in bfloat16, kept as the yardstick of how far bfloat16 strays from float32):
  bfloat16 kernels round at other points on other CPUs (AMX accumulates in other blocks than AVX-512-BF16), so the
  tensors move by bfloat16 ulps; what carries over is the yardstick's size, measured within a factor 0.75-1.33
  between CPUs: ``CROSS_MACHINE_BF16_YARDSTICK`` = 2.
Integer tensors (seeds, sizes) are exact everywhere.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

FIXTURES = Path(__file__).resolve().parent / "fixtures"

CROSS_MACHINE_FLOAT32 = 2.0**-16
CROSS_MACHINE_BF16_YARDSTICK = 2.0
SCHEDULE_ULPS = 16  # 16 ulps = 2^-19 of the element's magnitude in float32
# Same CPU, same seeds, same weights, one thread, diffusers run again: only run-to-run kernel choices may differ.
SAME_MACHINE_LIVE = 1e-6
# pbe may stray at most this much further than diffusers itself does at the same dtype on the same device.
REFERENCE_MARGIN = 1.25

Kind = Literal["schedule", "network", "bf16"]
# Which keys of each committed file are outputs (what the reference computed), and of which kind; every other key is
# an input the test feeds to pbe. ``live_exact``: recomputed on the same CPU, the file's float outputs are bit-equal.
FILES: dict[str, dict] = {
    "reference": {
        "outputs": {r"_bf16$": "bf16", r"\.(out|decoded|mean|logvar|std|uncond)$": "network",
                    r"^vae\w*\.sample$": "network"},
        "live_exact": False,
    },
    "pipeline_reference": {"outputs": {r"\.(images|latents)$": "network"}, "live_exact": False},
    "scheduler_reference": {
        "outputs": {r"\.(timesteps|init_noise_sigma)$": "schedule", r"\.(latents|images)$": "network"},
        "live_exact": True,
    },
}

Metric = Literal["relative", "absolute"]


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, computed in float32 on the CPU."""
    ours, ref = ours.detach().cpu().float(), ref.detach().cpu().float()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def absolute_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref|, computed in float32 on the CPU (images in [0, 1])."""
    return (ours.detach().cpu().float() - ref.detach().cpu().float()).abs().max().item()


METRICS = {"relative": relative_error, "absolute": absolute_error}


@functools.cache
def this_machine() -> str:
    """This CPU's signature, as the fixture scripts write it into the files' "machine" metadata."""
    from conftest import load_script

    return load_script("make_reference_tensors").machine_signature()


class CommittedReference:
    """One committed reference file (``tests/fixtures/{name}.safetensors``) and the CPU it was made on."""

    def __init__(self, name: str) -> None:
        if name not in FILES:
            raise KeyError(f"{name}: not a committed reference file (known: {', '.join(FILES)})")
        self.name, self.path = name, FIXTURES / f"{name}.safetensors"
        with safe_open(self.path, framework="pt") as f:
            self._tensors = {key: f.get_tensor(key) for key in f.keys()}
            self.metadata: dict[str, str] = dict(f.metadata() or {})
        self.machine = self.metadata.get("machine", "unknown")
        self.same_machine = self.machine == this_machine()

    # ---- reading ---------------------------------------------------------------------------------------------------

    def kind(self, key: str) -> Kind | None:
        """The kind of output ``key`` is, or None for an input."""
        for pattern, kind in FILES[self.name]["outputs"].items():
            if re.search(pattern, key):
                return kind
        return None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        """An input the reference was computed from. Outputs are compared through the assert methods only."""
        if self.kind(key) is not None:
            raise KeyError(f"{self.name}: {key} is a reference output; compare it with assert_close, which knows "
                           f"the CPU it was made on ({self.machine})")
        return self._tensors[key]

    def shape(self, key: str) -> torch.Size:
        return self._tensors[key].shape

    def settings(self, field: str) -> dict:
        """A JSON field of the file's metadata (the cases it was made with)."""
        return json.loads(self.metadata[field])

    # ---- comparing -------------------------------------------------------------------------------------------------

    def _output(self, key: str, index: int | None) -> torch.Tensor:
        if self.kind(key) is None:
            raise KeyError(f"{self.name}: {key} is an input, not a reference output")
        return self._tensors[key] if index is None else self._tensors[key][index]

    def bound(self, key: str, *, bound: float, metric: Metric = "relative", index: int | None = None,
              yardstick: torch.Tensor | str | None = None, margin: float = REFERENCE_MARGIN) -> float:
        """The bound ``assert_close`` applies to a ``network`` output (in ``metric``'s units): ``bound``, or
        ``margin`` times how far the ``yardstick`` strays from the reference if that is further; on another CPU, plus
        what rounding moves the reference there. ``yardstick``: diffusers' own output at another dtype or on another
        device, computed live, or the key of one stored in this file (its bfloat16 run)."""
        expected = self._output(key, index)
        if isinstance(yardstick, str):
            stored = METRICS[metric](self._output(yardstick, index), expected)
            bound = max(bound, margin * stored * (1 if self.same_machine else CROSS_MACHINE_BF16_YARDSTICK))
        elif yardstick is not None:
            bound = max(bound, margin * METRICS[metric](yardstick, expected))
        if not self.same_machine:  # |ours - ref_there| <= |ours - ref_here| + |ref_here - ref_there|
            scale = 1.0 if metric == "relative" else expected.float().abs().max().item()
            bound += CROSS_MACHINE_FLOAT32 * scale
        return bound

    def assert_close(self, key: str, ours: torch.Tensor, *, bound: float = 0.0, metric: Metric = "relative",
                     index: int | None = None, yardstick: torch.Tensor | str | None = None,
                     margin: float = REFERENCE_MARGIN, what: object = "") -> float:
        """``ours`` against the reference output ``key`` (its row ``index`` if given); returns the error.

        ``network`` outputs: ``metric`` (``relative`` to the reference's largest value, or ``absolute``) within the
        bound of ``bound(...)``. ``schedule`` outputs: bit-identical on the same CPU, each element within
        ``SCHEDULE_ULPS`` ulps on another (``bound`` is not used).
        """
        expected = self._output(key, index)
        label = f"{self.name}:{key}{'' if index is None else f'[{index}]'} {what}".strip()
        ours = torch.as_tensor(ours)
        assert ours.shape == expected.shape, (label, tuple(ours.shape), tuple(expected.shape))
        if self.kind(key) == "schedule":
            ulps = schedule_ulps(ours, expected)
            assert ulps <= (0 if self.same_machine else SCHEDULE_ULPS), (label, f"{ulps:.1f} ulps apart",
                                                                         f"made on {self.machine}")
            return ulps
        limit = self.bound(key, bound=bound, metric=metric, index=index, yardstick=yardstick, margin=margin)
        error = METRICS[metric](ours, expected)
        assert error <= limit, (label, f"error {error:.3g}", f"bound {limit:.3g}", f"made on {self.machine}")
        return error

    def assert_rounds_to(self, key: str, eight_bit: torch.Tensor) -> None:
        """``eight_bit`` (uint8) is the reference images ``key`` (in [0, 1]) rounded as ``round(x * 255)``, up to
        values that sit on a rounding boundary: at most one level off, in fewer than 1e-3 of the values. The same on
        every CPU: a 2^-16 move crosses a boundary with probability ~2^-16 x 255 x 2 (< 1e-2 of that 1e-3)."""
        expected = (self._output(key, None).float() * 255).round().to(torch.int64)
        got = torch.as_tensor(eight_bit).to(torch.int64)
        assert got.shape == expected.shape, (key, tuple(got.shape), tuple(expected.shape))
        assert (got - expected).abs().max().item() <= 1, key
        assert (got != expected).double().mean().item() < 1e-3, key

    def assert_matches_live(self, live: Mapping[str, torch.Tensor]) -> None:
        """The whole file against the same reference recomputed now (diffusers/transformers run live): inputs and
        integers exact; float outputs bit-equal (``live_exact`` files) or within ``SAME_MACHINE_LIVE`` on the same
        CPU; on another CPU within what rounding can do for their kind; bfloat16 yardsticks by their size."""
        assert set(self._tensors) == set(live), sorted(set(self._tensors) ^ set(live))
        exact = FILES[self.name]["live_exact"]
        for key, fresh in live.items():
            committed, kind = self._tensors[key], self.kind(key)
            assert committed.dtype == fresh.dtype and committed.shape == fresh.shape, key
            if kind is None or not fresh.is_floating_point() or (self.same_machine and exact):
                assert torch.equal(committed, fresh), key
            elif kind == "bf16":
                float32_key = re.sub(r"_bf16$", "", key)
                ratio = relative_error(committed, self._tensors[float32_key]) / relative_error(fresh, live[float32_key])
                spread = 1 + SAME_MACHINE_LIVE if self.same_machine else CROSS_MACHINE_BF16_YARDSTICK
                assert 1 / spread <= ratio <= spread, (key, ratio)
            elif kind == "schedule":
                assert schedule_ulps(committed, fresh) <= (0 if self.same_machine else SCHEDULE_ULPS), key
            else:
                bound = SAME_MACHINE_LIVE if self.same_machine else CROSS_MACHINE_FLOAT32
                assert relative_error(committed, fresh) <= bound, (key, relative_error(committed, fresh), bound)


def schedule_ulps(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest distance between ``ours`` and ``ref``, element by element, in float32 ulps of the reference
    element (zeros count in units of float32's smallest normal number). float32 whatever the stored dtype: diffusers
    computes its schedules from float32 tables (``alphas_cumprod``, sigmas), so a float64 value such as
    ``init_noise_sigma`` carries float32 rounding."""
    info = torch.finfo(torch.float32)
    ours64, ref64 = ours.detach().cpu().double(), ref.detach().cpu().double()
    return ((ours64 - ref64).abs() / (info.eps * ref64.abs().clamp_min(info.tiny))).max().item()
