"""The committed fixtures in tests/fixtures must be exactly what diffusers/transformers compute today.

Rebuilds the tiny reference components with scripts/make_reference_tensors.py (reference stack only, never pbe)
and compares them with the committed reference tensors, checkpoints and end-to-end pipeline runs. Regenerate the
fixtures with `HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_reference_tensors.py` if this fails after a deliberate
change.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def _load_script() -> ModuleType:
    path = ROOT / "scripts" / "make_reference_tensors.py"
    spec = importlib.util.spec_from_file_location("make_reference_tensors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(script: ModuleType) -> Iterator[None]:
    # The fixtures were computed on one CPU thread; other thread counts sum in another order (~1e-6 relative).
    with script.reference_threads():
        yield


@pytest.fixture(scope="module")
def components(script: ModuleType) -> dict[str, torch.nn.Module]:
    return script.build_components()


def _assert_close_to_live(committed: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
    assert set(committed) == set(live)
    for key, ref in live.items():
        got = committed[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        if not ref.is_floating_point():
            assert torch.equal(got, ref), key
            continue
        # Same machine, same seeds, same weights: only the summation order of multithreaded CPU kernels may differ
        # between runs, so allow float32 rounding noise relative to the tensor's scale and nothing more.
        tolerance = 1e-6 * ref.abs().max().item()
        assert (got - ref).abs().max().item() <= tolerance, key


def test_reference_tensors_match_live_recomputation(script: ModuleType, components: dict) -> None:
    _assert_close_to_live(load_file(FIXTURES / "reference.safetensors"), script.reference_tensors(components))


@pytest.mark.parametrize("folder", ["hub", "hub_small"])
def test_hub_weights_match_live_components(script: ModuleType, components: dict, folder: str) -> None:
    unet, vae, encoder = (components[name] for name in script.HUB_FOLDERS[folder])
    for sub, model in (("unet", unet), ("vae", vae)):
        saved = torch.load(FIXTURES / folder / sub / "diffusion_pytorch_model.bin", weights_only=True)
        script.assert_exact(saved, script.plain_state_dict(model), f"{folder}/{sub}")
    saved = torch.load(FIXTURES / folder / "image_encoder" / "pytorch_model.bin", weights_only=True)
    assert "model.vision_model.embeddings.position_ids" in saved  # transformers-4 spelling, like the hub repo
    script.assert_exact(saved, script.encoder_state_dict_transformers4(encoder), f"{folder}/image_encoder")


def test_original_layout_converts_to_live_components(script: ModuleType, components: dict) -> None:
    # Read weights-only with an inert stand-in for the pickled Lightning callback; every tensor has its own storage,
    # which the proof needs to track which original tensors diffusers' converters consume.
    original = script.load_original_ckpt(FIXTURES / "original" / "model.ckpt")
    unet, vae, encoder = (components[name] for name in script.HUB_FOLDERS["hub"])
    script.prove_original_layout(original, unet, vae, encoder)
    script.check_original(FIXTURES / "original", original)  # and the Lightning trap is still armed


def test_original_layout_matches_the_shared_table(script: ModuleType, components: dict) -> None:
    table = script.read_table(FIXTURES / "ldm_to_diffusers_unet_vae.tsv")  # committed copy of the shared table
    unet, vae, encoder = (components[name] for name in script.HUB_FOLDERS["hub"])
    script.assert_exact(script.load_original_ckpt(FIXTURES / "original" / "model.ckpt"),
                        script.original_state_dict(unet, vae, encoder, table), "original/model.ckpt vs the table")


def test_pipeline_references_match_live_recomputation(script: ModuleType, components: dict) -> None:
    path = FIXTURES / "pipeline_reference.safetensors"
    with safe_open(path, framework="pt") as f:
        committed_cases = json.loads(f.metadata()["cases"])
    live, cases = script.pipeline_references(components)
    assert committed_cases == json.loads(script.cases_json(cases))
    _assert_close_to_live(load_file(path), live)
