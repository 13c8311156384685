"""The committed scheduler fixture must be what diffusers computes today, and pbe's configs must be diffusers' own.

Reruns scripts/make_scheduler_references.py's scheduler-only runs with diffusers (never pbe) and compares them with
tests/fixtures/scheduler_reference.safetensors; builds every sampler and config case in both libraries the same way
and compares the resulting configs key by key. Regenerate the fixture with
`HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_scheduler_references.py` if this fails after a deliberate change.
"""

from __future__ import annotations

from types import ModuleType

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402

from conftest import CommittedReference, load_script  # noqa: E402

from pbe.schedulers import OFFICIAL_CONFIG, SCHEDULERS  # noqa: E402

# diffusers' LMS calls np.array on a tensor, which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")



@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("make_scheduler_references")


def test_scheduler_fixture_is_what_diffusers_computes(script: ModuleType) -> None:
    committed = CommittedReference("scheduler_reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script
    try:
        fresh, meta = script.scheduler_references()
        pipelines, meta["pipeline_cases"] = script.pipeline_references(script.source_schedulers())
    finally:
        torch.set_num_threads(threads)
    settings = committed.settings("settings")
    assert meta["cases"] == settings["cases"] and meta["pipeline_cases"] == settings["pipeline_cases"]
    committed.assert_matches_live(fresh | pipelines)


def test_configs_equal_diffusers(script: ModuleType) -> None:
    """Every case's scheduler config, built by pbe from the official config, equals diffusers' key by key
    (`_use_default_values` as a set: diffusers' order is a set's)."""
    sources = script.source_schedulers()
    assert sources["hub"].config["_use_default_values"] == OFFICIAL_CONFIG["_use_default_values"]
    for case, settings in script._cases().items():
        cls, named = script.CLASSES[settings["scheduler"]]
        ref = dict(cls.from_config(sources[settings["source"]].config, **named, **settings["overrides"]).config)
        ours_cls, ours_named = SCHEDULERS[settings["scheduler"]]
        source = OFFICIAL_CONFIG if settings["source"] == "hub" else dict(sources["fixture"].config)
        ours = dict(ours_cls.from_config(source, **ours_named, **settings["overrides"]).config)
        ref_defaults, our_defaults = set(ref.pop("_use_default_values", [])), set(ours.pop("_use_default_values", []))
        ref.pop("_diffusers_version", None), ours.pop("_diffusers_version", None)
        assert our_defaults == ref_defaults, case
        assert ours == ref, case
