"""tests/committed.py: committed references are read and compared one way, tight on the CPU that made them and within
float rounding elsewhere; no test opens a committed reference file by itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from committed import CROSS_MACHINE_FLOAT32, FILES, SCHEDULE_ULPS, CommittedReference, this_machine

TESTS = Path(__file__).resolve().parent


@pytest.fixture(params=[True, False], ids=["same-cpu", "other-cpu"])
def scheduler_reference(request) -> CommittedReference:
    reference = CommittedReference("scheduler_reference")
    reference.same_machine = request.param  # as if made on this CPU / on another one
    return reference


def _ulps_away(value: torch.Tensor, ulps: int) -> torch.Tensor:
    """``value`` moved by ``ulps`` float32 ulps of each element, away from zero."""
    step = torch.finfo(torch.float32).eps * value.double().abs()
    return (value.double() + ulps * step * value.double().sign()).to(value.dtype)


def test_outputs_are_not_handed_out_raw(scheduler_reference) -> None:
    assert scheduler_reference["initial"].shape == scheduler_reference.shape("initial")  # an input
    for key in ("ddim.20.timesteps", "lms.7.init_noise_sigma", "ddim.20.latents", "pipeline.lms.guided.images"):
        with pytest.raises(KeyError, match="reference output"):
            scheduler_reference[key]
    with pytest.raises(KeyError, match="is an input"):
        scheduler_reference.assert_close("initial", scheduler_reference["initial"])


def test_schedules_are_exact_on_their_cpu_and_within_float32_ulps_elsewhere(scheduler_reference) -> None:
    key = "lms.20.timesteps"
    exact = scheduler_reference._tensors[key]
    scheduler_reference.assert_close(key, exact.clone())
    one_ulp = _ulps_away(exact, 1)  # what another CPU's log/exp do (measured: 1 ulp)
    if scheduler_reference.same_machine:
        with pytest.raises(AssertionError, match="ulps apart"):
            scheduler_reference.assert_close(key, one_ulp)
    else:
        scheduler_reference.assert_close(key, one_ulp)
    for real_change in (_ulps_away(exact, 4 * SCHEDULE_ULPS), exact + 1, exact.flip(0)):
        with pytest.raises(AssertionError):
            scheduler_reference.assert_close(key, real_change)


def test_network_outputs_within_their_bound_plus_rounding_elsewhere(scheduler_reference) -> None:
    key = "pipeline.lms.guided.latents"
    exact = scheduler_reference._tensors[key]
    scale = exact.abs().max()
    scheduler_reference.assert_close(key, exact + 0.9e-5 * scale, bound=1e-5)
    rounded_elsewhere = exact + (1e-5 + 0.5 * CROSS_MACHINE_FLOAT32) * scale
    if scheduler_reference.same_machine:
        with pytest.raises(AssertionError, match="bound"):
            scheduler_reference.assert_close(key, rounded_elsewhere, bound=1e-5)
    else:
        scheduler_reference.assert_close(key, rounded_elsewhere, bound=1e-5)
    with pytest.raises(AssertionError):  # a real change: 1e-3 of the scale
        scheduler_reference.assert_close(key, exact * (1 + 1e-3), bound=1e-5)
    images = scheduler_reference._tensors["pipeline.lms.guided.images"]
    with pytest.raises(AssertionError):  # absolute metric for images in [0, 1]
        scheduler_reference.assert_close("pipeline.lms.guided.images", images + 2e-4, bound=1e-4, metric="absolute")


def test_a_live_yardstick_or_a_stored_one_widens_the_bound() -> None:
    reference = CommittedReference("reference")
    key = "unet4.b.out"
    exact = reference._tensors[key]
    stored_error = (reference._tensors[f"{key}_bf16"].float() - exact).abs().max() / exact.abs().max()
    for same in (True, False):
        reference.same_machine = same
        widened = reference.bound(key, bound=1e-9, yardstick=f"{key}_bf16", margin=1.0)
        assert widened == pytest.approx(stored_error.item() * (1 if same else 2) + (0 if same else CROSS_MACHINE_FLOAT32))
    reference.same_machine = True
    assert reference.bound(key, bound=1e-9, yardstick=exact * 1.01, margin=1.25) == pytest.approx(1.25 * 0.01, rel=1e-4)


def test_live_comparison_is_exact_on_the_cpu_for_exact_files(scheduler_reference) -> None:
    live = dict(scheduler_reference._tensors)
    scheduler_reference.assert_matches_live(live)
    key = "ddim.20.latents"
    nudged = live | {key: _ulps_away(live[key], 1)}
    if scheduler_reference.same_machine:
        with pytest.raises(AssertionError):
            scheduler_reference.assert_matches_live(nudged)
    else:
        scheduler_reference.assert_matches_live(nudged)
    with pytest.raises(AssertionError):
        scheduler_reference.assert_matches_live(live | {key: live[key] * (1 + 1e-3)})


def test_bf16_yardstick_compared_by_its_size() -> None:
    reference = CommittedReference("reference")
    live = dict(reference._tensors)
    for same in (True, False):
        reference.same_machine = same
        reference.assert_matches_live(live)
        with pytest.raises(AssertionError):  # a bf16 fixture that was made in float32: no yardstick at all
            reference.assert_matches_live(live | {"unet4.b.out_bf16": live["unet4.b.out"].bfloat16()})


def test_the_committed_files_record_the_cpu_they_were_made_on() -> None:
    for name in FILES:
        machine = CommittedReference(name).machine
        assert machine != "unknown" and "torch-" in machine, name
    assert "torch-" in this_machine()


# ---- no test compares a committed reference any other way ---------------------------------------------------------

COMMITTED_NAME = re.compile(r"\b(" + "|".join(FILES) + r")\.safetensors")
READERS = {"load_file", "safe_open", "load", "load_tensors", "read_tensors"}


def committed_reads(source: str) -> list[str]:
    """Places in a test module's source that open a committed reference file without ``CommittedReference``: a
    string naming one of the files, or a reader call whose arguments name one."""
    found, tree = [], ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node)}
    for node in ast.walk(tree):
        if id(node) in docstrings:  # prose may name the files
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and COMMITTED_NAME.search(node.value):
            found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            text = " ".join(ast.unparse(arg) for arg in node.args)
            if func in READERS and re.search(r"_?reference\b|FIXTURES", text) and "safetensors" in text:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_test_opens_a_committed_reference_itself() -> None:
    offenders = {path.name: committed_reads(path.read_text()) for path in sorted(TESTS.glob("*.py"))
                 if path.name != "committed.py"}
    assert not {name: places for name, places in offenders.items() if places}


def test_the_scan_finds_the_ways_a_test_could_do_it() -> None:
    # (file names assembled here, so that this module does not name the files itself)
    reference, pipeline, scheduler = (f"{name}.safetensors" for name in FILES)
    for source in (f'load_file(FIXTURES / "{reference}")',
                   f'path = FIXTURES / "{scheduler}"',
                   f'with safe_open(str(FIXTURES / "{pipeline}"), "pt") as f: pass',
                   'x = load_file(FIXTURES / f"{name}.safetensors")'):
        assert committed_reads(source), source
    assert not committed_reads('CommittedReference("reference")["unet4.b.sample"]')
