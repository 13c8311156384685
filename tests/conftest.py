"""Shared test helpers: where the committed reference fixtures live, how to compare against them, and on which device.

The fixtures are written by ``scripts/make_reference_tensors.py`` from diffusers/transformers only (never from pbe).

The suite is also the GPU check: ``PBE_TEST_DEVICE=cuda`` (or ``cuda:N``, ``mps``; default ``cpu``) gives tests
taking the ``device`` fixture that device, and ``parity_tolerance`` the bound for a dtype there:

    PBE_TEST_DEVICE=cuda HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/

On CUDA the run switches TF32 off (``configure_device``): float32 parity means float32 there too. On the CPU every
bound is the CPU's own; off it float32 is floored at ``CROSS_DEVICE_FLOAT32`` and every comparison may stray
``REFERENCE_MARGIN`` times as far as diffusers' own run on that device (``reference_bound``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import PIL.Image
import pytest
import torch

from committed import REFERENCE_MARGIN, CommittedReference, relative_error  # noqa: F401 (re-exported for tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HUB = FIXTURES / "hub"  # unet4 + vae4 + image_encoder, hub layout (.bin)
HUB_SMALL = FIXTURES / "hub_small"  # unet2 + vae2 + image_encoder1
ORIGINAL_CKPT = FIXTURES / "original" / "model.ckpt"  # unet4 + vae4 + image_encoder, original layout


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


def configure_device(device: torch.device) -> None:
    """Make ``device`` compute float32 as float32 for the run: on CUDA, TF32 off for matmuls and convolutions (TF32
    rounds their inputs to 10 mantissa bits, ~1e-3 relative, far beyond any float32 bound here; cuDNN enables it by
    default)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config: pytest.Config) -> None:
    configure_device(_test_device())  # and refuse an unusable PBE_TEST_DEVICE before any test runs


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
# float32 on another device (TF32 off, see configure_device) against float32 made on a CPU: every product and sum is
# still IEEE float32, but GPU kernels sum in other orders (split-K matmuls, tree reductions, Winograd or implicit-GEMM
# convolutions). Reordering a K-term sum moves it by up to ~sqrt(K) ulps of its terms' scale; between CPUs this
# measured up to 14 ulps of the largest value per network call and 58 for pipeline images (tests/test_reference_live.py,
# whose bound is 2^-16). Never measured on a GPU here: 2^-14 (512 ulps) is 4x that bound, still ~100x below what a real
# change does (a wrong timestep, draw or weight moves outputs by 1e-2 or more).
CROSS_DEVICE_FLOAT32 = 2.0**-14


def rounding_bound(dtype: torch.dtype, *, device: torch.device) -> float:
    """The floor of every parity bound: ``ROUNDING_BOUND[dtype]``, or ``CROSS_DEVICE_FLOAT32`` for float32 off the CPU
    (the references are float32 CPU outputs)."""
    if dtype == torch.float32 and device.type != "cpu":
        return CROSS_DEVICE_FLOAT32
    return ROUNDING_BOUND[dtype]


def reference_bound(floor: float, reference_error: float, *, margin: float = REFERENCE_MARGIN) -> float:
    """``floor``, or ``margin`` times how far diffusers' own run strays from the reference where that is further
    (tiny random networks in half precision; another device's kernels)."""
    return max(floor, margin * reference_error)


def parity_tolerance(run_reference: Callable[[torch.device, torch.dtype], torch.Tensor], *, device: torch.device,
                     dtype: torch.dtype) -> float:
    """The bound on relative_error(pbe's output at ``dtype`` on ``device``, diffusers' float32 CPU output).

    ``run_reference(device, dtype)`` runs the diffusers/transformers component on the test's inputs there. Outside
    float32 on the CPU, the bound is ``rounding_bound`` or, where diffusers' own output there strays further from its
    float32 CPU output (tiny random networks; another device's kernels), ``REFERENCE_MARGIN`` times that error,
    measured live.
    """
    bound = rounding_bound(dtype, device=device)
    if device.type == "cpu" and dtype == torch.float32:
        return bound
    exact = run_reference(torch.device("cpu"), torch.float32)
    return reference_bound(bound, relative_error(run_reference(device, dtype), exact))


@pytest.fixture(scope="session")
def reference() -> CommittedReference:
    """The network references (tests/fixtures/reference.safetensors): inputs by key, outputs compared through it."""
    return CommittedReference("reference")


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


@functools.cache
def load_script(name: str) -> ModuleType:
    """``scripts/{name}.py`` as a module, loaded once: the fixture scripts define how the references were made."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pbe_script_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module whose tests also run subprocesses: the tiny networks gain nothing from threads,
    subprocess results must match in-process ones (thread count changes float rounding), and on a small shared
    machine test runs side by side stall each other's thread pools. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A private copy of the hub-layout stand-in (the shared fixture may be regenerated while tests run)."""
    return Path(shutil.copytree(HUB, tmp_path_factory.mktemp("checkpoint") / "hub"))


def reference_pipeline(*, device: torch.device, dtype: torch.dtype):  # noqa: ANN201 (diffusers is imported lazily)
    """diffusers' PaintByExamplePipeline on the tiny stand-in in ``HUB``, as the pipeline fixtures were made
    (scripts/make_reference_tensors.py), loaded component by component in ``dtype`` and moved to ``device`` the way its
    users do: the yardstick of how far diffusers' own generations stray there from its float32 CPU fixtures."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    script = load_script("make_reference_tensors")
    components = {"unet4": UNet2DConditionModel.from_pretrained(HUB / "unet", torch_dtype=dtype),
                  "vae4": AutoencoderKL.from_pretrained(HUB / "vae", torch_dtype=dtype),
                  "image_encoder": PaintByExampleImageEncoder.from_pretrained(HUB / "image_encoder", torch_dtype=dtype)}
    return script.reference_pipeline(components).to(device)


def generation_error(key: str, result: torch.Tensor, reference: torch.Tensor) -> float:
    """How far a generation strays from its reference: ``images`` (in [0, 1]) by the largest absolute difference,
    ``latents`` relative to their scale (relative_error)."""
    if key == "images":
        return (result.detach().cpu().float() - reference.detach().cpu().float()).abs().max().item()
    return relative_error(result, reference)


def random_picture(height: int, width: int, seed: int) -> PIL.Image.Image:
    """A picture of uniform random colours (tests that need any picture of a given size)."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def centre_mask(height: int, width: int) -> PIL.Image.Image:
    """A mask that repaints the middle half of each side (white), keeps the rest (black)."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return PIL.Image.fromarray(mask)
