"""Shared test helpers: where the committed reference fixtures live, how to compare against them, and on which device.

The fixtures are written by ``scripts/make_reference_tensors.py`` from diffusers/transformers only (never from pbe).

The suite is also the GPU check: ``PBE_TEST_DEVICE=cuda`` (or ``cuda:N``, ``mps``; default ``cpu``) gives tests
taking the ``device`` fixture that device, and ``parity_tolerance`` the bound for a dtype there:

    PBE_TEST_DEVICE=cuda HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HUB = FIXTURES / "hub"  # unet4 + vae4 + image_encoder, hub layout (.bin)
HUB_SMALL = FIXTURES / "hub_small"  # unet2 + vae2 + image_encoder1
ORIGINAL_CKPT = FIXTURES / "original" / "model.ckpt"  # unet4 + vae4 + image_encoder, original layout


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, computed in float32 on the CPU."""
    ours, ref = ours.detach().cpu().float(), ref.detach().cpu().float()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# ---- the device the suite runs on ---------------------------------------------------------------------------------------

TEST_DEVICE = os.environ.get("PBE_TEST_DEVICE", "cpu")


def _test_device() -> torch.device:
    """PBE_TEST_DEVICE as a device that exists here; pytest.UsageError otherwise (a GPU check that silently ran on the
    CPU would prove nothing)."""
    try:
        device = torch.device(TEST_DEVICE)
    except RuntimeError:
        raise pytest.UsageError(f"PBE_TEST_DEVICE={TEST_DEVICE}: expected cpu, cuda, cuda:N or mps") from None
    available = {"cpu": lambda: True, "cuda": lambda: (device.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available}
    if device.type not in available:
        raise pytest.UsageError(f"PBE_TEST_DEVICE={TEST_DEVICE}: expected cpu, cuda, cuda:N or mps")
    if not available[device.type]():
        raise pytest.UsageError(f"PBE_TEST_DEVICE={TEST_DEVICE}: no such device here (PyTorch {torch.__version__})")
    return device


def pytest_configure(config: pytest.Config) -> None:
    _test_device()  # refuse an unusable PBE_TEST_DEVICE before any test runs


def pytest_report_header(config: pytest.Config) -> str:
    from pbe import devices

    half = sorted(devices.cpu_flags() & {flag for flags in devices.NATIVE_CPU_FLAGS.values() for flag in flags})
    return f"pbe test device: {_test_device()} (PBE_TEST_DEVICE); CPU half-precision flags: {' '.join(half) or 'none'}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where device-aware tests run pbe and the reference: PBE_TEST_DEVICE (default cpu)."""
    return _test_device()


# How far pbe may stray from diffusers' float32 CPU output (relative_error), by dtype, before any yardstick: float32 on
# the CPU is bit-identical in practice; bfloat16 keeps 8 significant bits, so each op rounds by up to 2^-9 and dozens
# of layers accumulate that (2e-2); float16 keeps 11, rounding 8x finer (2e-2 / 8 = 2.5e-3).
ROUNDING_BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2.5e-3}
# pbe may stray at most this much further than diffusers itself does at the same dtype on the same device.
REFERENCE_MARGIN = 1.25


def parity_tolerance(run_reference: Callable[[torch.device, torch.dtype], torch.Tensor], *, device: torch.device,
                     dtype: torch.dtype) -> float:
    """The bound on relative_error(pbe's output at ``dtype`` on ``device``, diffusers' float32 CPU output).

    ``run_reference(device, dtype)`` runs the diffusers/transformers component on the test's inputs there. Outside
    float32 on the CPU, the bound is the dtype's ``ROUNDING_BOUND`` or, where diffusers' own output there strays
    further from its float32 CPU output (tiny random networks; TF32 convolutions on CUDA), ``REFERENCE_MARGIN`` times
    that error, measured live.
    """
    bound = ROUNDING_BOUND[dtype]
    if device.type == "cpu" and dtype == torch.float32:
        return bound
    exact = run_reference(torch.device("cpu"), torch.float32)
    return max(bound, REFERENCE_MARGIN * relative_error(run_reference(device, dtype), exact))


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "reference.safetensors")


def ldm_base_config():
    """What an original-layout checkpoint cannot reveal about the tiny stand-in (head counts, GroupNorm groups).

    Read from the hub stand-in's config.json files, which describe the same tiny networks.
    """
    import pbe
    from pbe.model import PaintByExampleConfig

    hub = pbe.loading.convert(HUB).config  # configs only; cheap for the tiny stand-in
    base = PaintByExampleConfig()
    return dataclasses.replace(
        base,
        unet=dataclasses.replace(base.unet, heads=hub.unet.heads, norm_groups=hub.unet.norm_groups),
        vae=dataclasses.replace(base.vae, norm_groups=hub.vae.norm_groups),
        image_encoder=dataclasses.replace(
            base.image_encoder, clip=dataclasses.replace(base.image_encoder.clip, heads=hub.image_encoder.clip.heads)
        ),
    )


@pytest.fixture(scope="session")
def original_safetensors(tmp_path_factory) -> Path:
    """The original-layout stand-in re-saved as .safetensors (a plain container change: same keys, same tensors)."""
    from safetensors.torch import save_file

    from weights_convert.readers import read_tensors

    path = tmp_path_factory.mktemp("original") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in read_tensors(ORIGINAL_CKPT).items()}, path)
    return path
