"""pbe.devices: the auto device, the fast precision of the hardware, and the check on emulated half precision.

CPUs are simulated by their /proc/cpuinfo flags (``pbe.devices.cpu_flags`` patched): an AVX2-only one (AMD Zen 3,
where bfloat16 and float16 are emulated, ~170x slower than float32) and ones with bfloat16 instructions. The last
test runs on PBE_TEST_DEVICE (tests/conftest.py), so it is also the GPU check of the device fixture and tolerances.
"""

from __future__ import annotations

import platform
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel

import pbe
from pbe import devices

from conftest import (
    CROSS_DEVICE_FLOAT32,
    HUB,
    REFERENCE_MARGIN,
    ROUNDING_BOUND,
    configure_device,
    parity_tolerance,
    reference_bound,
    relative_error,
    rounding_bound,
)

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})  # AMD Zen 3
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_bf16"}  # AMD Zen 4
AMX = AVX2_ONLY | {"avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"}  # Intel Sapphire Rapids
GRAVITON3 = frozenset({"fp", "asimd", "asimdhp", "bf16", "sve"})  # aarch64's Features line


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny networks gain nothing from threads, and on a small shared machine thread pools of test runs side by
    side stall each other; the setting is restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu(monkeypatch):
    """Simulate a CPU: ``cpu(flags)`` makes pbe.devices see those flags; no half-precision warning given yet."""
    monkeypatch.setattr(devices, "_warned", set())
    return lambda flags: monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="x86 /proc/cpuinfo flags")
def test_cpu_flags_agree_with_torchs_own_probes() -> None:
    flags = devices.cpu_flags()
    assert ("avx2" in flags) == torch.cpu._is_avx2_supported()
    assert ("avx512_bf16" in flags) == torch.cpu._is_avx512_bf16_supported()
    assert ("amx_tile" in flags) == torch.cpu._is_amx_tile_supported()


@pytest.mark.parametrize(("flags", "dtype"), [(AVX2_ONLY, torch.float32), (AVX512_BF16, torch.bfloat16),
                                              (AMX, torch.bfloat16), (GRAVITON3, torch.bfloat16)],
                         ids=["avx2", "avx512_bf16", "amx", "aarch64_bf16"])
def test_default_dtype_on_the_cpu_is_bf16_only_with_bf16_instructions(cpu, flags, dtype) -> None:
    cpu(flags)
    assert devices.default_dtype("cpu") == dtype
    assert devices.default_dtype(torch.device("cpu")) == dtype


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "meta"])
def test_default_dtype_on_a_gpu_is_fp16(cpu, device) -> None:
    cpu(AVX2_ONLY)  # the CPU's flags do not matter there
    assert devices.default_dtype(device) == torch.float16


def test_native_precision(cpu) -> None:
    cpu(AVX2_ONLY)
    assert devices.native_precision("cpu", torch.float32) and devices.native_precision("cpu", torch.float64)
    assert not devices.native_precision("cpu", torch.bfloat16) and not devices.native_precision("cpu", torch.float16)
    assert devices.native_precision("cuda", torch.bfloat16) and devices.native_precision("mps", torch.float16)
    cpu(AVX512_BF16)  # bfloat16 instructions, but no float16 ones
    assert devices.native_precision("cpu", torch.bfloat16) and not devices.native_precision("cpu", torch.float16)
    cpu(AMX)
    assert devices.native_precision("cpu", torch.bfloat16) and devices.native_precision("cpu", torch.float16)


@pytest.mark.parametrize(("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert devices.resolve_device("auto") == devices.resolve_device() == torch.device(expected)


def test_explicit_devices_are_parsed_not_chosen() -> None:
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"):
        devices.resolve_device("gpu")


@pytest.mark.parametrize(("dtype", "name"), [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_check_precision_refuses_emulated_half_precision_with_the_reason_and_the_way_out(cpu, dtype, name) -> None:
    cpu(AVX2_ONLY)
    with pytest.raises(ValueError, match=f"{name} on this CPU is slow: it has no {name} instructions") as info:
        devices.check_precision("cpu", dtype, refuse=True, way_out="use --dtype fp32")
    assert "about 170x slower than float32" in str(info.value) and "152 GFLOP/s" in str(info.value)
    assert str(info.value).endswith("; use --dtype fp32")


def test_check_precision_warns_once_per_process_and_dtype(cpu) -> None:
    cpu(AVX2_ONLY)

    def load() -> None:  # stands in for from_pretrained: the warning points at its caller
        devices.check_precision("cpu", torch.bfloat16, refuse=False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # so only check_precision's own once-rule can hold a repeat back
        load()
        load()
        devices.check_precision("cpu", torch.float16, refuse=False)
    assert [w.category for w in caught] == [devices.SlowPrecisionWarning] * 2
    assert "bfloat16 on this CPU is slow" in str(caught[0].message) and caught[0].filename == __file__
    assert str(caught[0].message).endswith("torch_dtype=torch.float32, or call .to(torch.float32)")
    assert "float16 on this CPU is slow" in str(caught[1].message)


@pytest.mark.parametrize(("flags", "device", "dtype"), [(AVX2_ONLY, "cpu", torch.float32), (AMX, "cpu", torch.bfloat16),
                                                        (AMX, "cpu", torch.float16), (AVX2_ONLY, "cuda", torch.bfloat16),
                                                        (AVX2_ONLY, "mps", torch.float16)])
def test_check_precision_is_silent_where_the_precision_is_native(cpu, flags, device, dtype) -> None:
    cpu(flags)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        devices.check_precision(device, dtype, refuse=True)
        devices.check_precision(device, dtype, refuse=False)


# ---- on PBE_TEST_DEVICE --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@torch.no_grad()
def test_unet_on_the_test_device_matches_diffusers(reference, device, dtype) -> None:
    """The tiny hub UNet on PBE_TEST_DEVICE, against diffusers' float32 CPU output for the same checkpoint and inputs,
    within conftest.parity_tolerance (for a half precision or a GPU: the bound diffusers' own run there sets)."""
    case = {name: reference[f"unet4.b.{name}"] for name in ("sample", "timestep", "context")}

    def run_reference(on: torch.device, precision: torch.dtype) -> torch.Tensor:
        unet = UNet2DConditionModel.from_pretrained(HUB / "unet", torch_dtype=precision).to(on)
        return unet(case["sample"].to(on, precision), case["timestep"].to(on), case["context"].to(on, precision)).sample

    tolerance = parity_tolerance(run_reference, device=device, dtype=dtype)
    unet = pbe.load(HUB, dtype=dtype, device=device).unet
    ours = unet(case["sample"].to(device, dtype), case["timestep"].to(device), case["context"].to(device, dtype))
    assert ours.device.type == device.type and ours.dtype == dtype
    assert relative_error(ours, run_reference(torch.device("cpu"), torch.float32)) <= tolerance


def test_parity_tolerance_is_the_rounding_bound_or_the_references_own_error_with_a_margin() -> None:
    runs, stray = [], {torch.float32: 0.0}

    def run_reference(on: torch.device, precision: torch.dtype) -> torch.Tensor:
        runs.append((on.type, precision))
        return torch.full((3,), 1.0 + stray[precision])

    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert parity_tolerance(run_reference, device=cpu, dtype=torch.float32) == ROUNDING_BOUND[torch.float32]
    assert runs == []  # float32 on the CPU: no yardstick needed
    stray[torch.float16] = 0.1  # diffusers' own float16 run strays further than float16's rounding bound
    assert parity_tolerance(run_reference, device=meta, dtype=torch.float16) == pytest.approx(REFERENCE_MARGIN * 0.1)
    assert runs == [("cpu", torch.float32), ("meta", torch.float16)]
    stray[torch.bfloat16] = 1e-3  # ... or less far: the rounding bound holds
    assert parity_tolerance(run_reference, device=meta, dtype=torch.bfloat16) == ROUNDING_BOUND[torch.bfloat16]



# ---- the tolerance logic off the CPU, without a GPU (torch.device("cuda") is only a name here) ---------------------------

CUDA = torch.device("cuda")


def test_float32_off_the_cpu_is_bounded_by_the_cross_device_bound_and_the_cpu_keeps_its_own() -> None:
    assert rounding_bound(torch.float32, device=torch.device("cpu")) == ROUNDING_BOUND[torch.float32] == 1e-5
    assert rounding_bound(torch.float32, device=CUDA) == CROSS_DEVICE_FLOAT32 > ROUNDING_BOUND[torch.float32]
    assert rounding_bound(torch.float32, device=torch.device("mps")) == CROSS_DEVICE_FLOAT32
    for dtype in (torch.bfloat16, torch.float16):  # half precision rounds the same everywhere
        assert rounding_bound(dtype, device=CUDA) == ROUNDING_BOUND[dtype]
        assert rounding_bound(dtype, device=torch.device("cpu")) == ROUNDING_BOUND[dtype]
    assert reference_bound(1e-4, 1e-5) == 1e-4 and reference_bound(1e-4, 1e-3) == pytest.approx(REFERENCE_MARGIN * 1e-3)


def test_parity_tolerance_on_cuda_measures_diffusers_there_against_its_cpu_float32() -> None:
    runs, stray = [], {}

    def run_reference(on: torch.device, precision: torch.dtype) -> torch.Tensor:
        runs.append((on.type, precision))
        return torch.full((3,), 1.0 + stray.get((on.type, precision), 0.0))

    # float32 on cuda: diffusers' own run there is measured; the floor is the cross-device bound
    assert parity_tolerance(run_reference, device=CUDA, dtype=torch.float32) == CROSS_DEVICE_FLOAT32
    assert runs == [("cpu", torch.float32), ("cuda", torch.float32)]
    stray["cuda", torch.float32] = 2**-10  # diffusers' float32 on that GPU strays further: pbe may stray 1.25x as far
    assert parity_tolerance(run_reference, device=CUDA, dtype=torch.float32) == REFERENCE_MARGIN * 2**-10
    stray["cuda", torch.float16] = 2**-7  # float16 on cuda: diffusers' float16 error there, with the margin
    assert parity_tolerance(run_reference, device=CUDA, dtype=torch.float16) == REFERENCE_MARGIN * 2**-7


def test_cuda_test_runs_compute_float32_without_tf32() -> None:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # process-wide flags: restored
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # cuDNN's default: on
        configure_device(torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # the CPU: nothing to change
        configure_device(torch.device("cuda", 1))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
