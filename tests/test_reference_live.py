"""The committed fixtures in tests/fixtures must be exactly what diffusers/transformers compute today.

Rebuilds the tiny reference components with scripts/make_reference_tensors.py (reference stack only, never pbe)
and compares them with the committed reference tensors, checkpoints and end-to-end pipeline runs. Regenerate the
fixtures with `HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_reference_tensors.py` if this fails after a deliberate
change.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import torch  # noqa: E402

from conftest import CommittedReference, load_script  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"



@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("make_reference_tensors")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(script: ModuleType) -> Iterator[None]:
    # The fixtures were computed on one CPU thread; other thread counts sum in another order (~1e-6 relative).
    with script.reference_threads():
        yield


@pytest.fixture(scope="module")
def components(script: ModuleType) -> dict[str, torch.nn.Module]:
    return script.build_components()


def test_reference_tensors_match_live_recomputation(script: ModuleType, components: dict) -> None:
    CommittedReference("reference").assert_matches_live(script.reference_tensors(components))


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
    committed = CommittedReference("pipeline_reference")
    live, cases = script.pipeline_references(components)
    assert committed.settings("cases") == json.loads(script.cases_json(cases))
    committed.assert_matches_live(live)
