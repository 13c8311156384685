"""scripts/benchmark.py's machinery on tiny stand-ins (``--tiny``): every row present, parity checked, exit status.

Timing values are never asserted (only that they are positive): the point is that the benchmark runs end to end and
that a wrong answer cannot pass.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_script

benchmark = load_script("benchmark")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tiny stand-in for the module (built by whichever test runs first)."""
    return tmp_path_factory.mktemp("benchmark-cache")


@pytest.fixture
def keep_threads():
    """--inline sets torch's thread count in this process; put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(cache: Path, out: Path, *extra: str) -> dict:
    status = benchmark.main(["--tiny", "--quick", "--threads", "1", "--cache", str(cache), "--json", str(out), *extra])
    report = json.loads(out.read_text())
    assert status == 0, [row["check"] for row in report["rows"] if row["status"] != "ok"]
    return report


def _assert_row_ok(row: dict) -> None:
    assert row["status"] == "ok" and row["check"]["passed"], row["check"]
    assert row["ratio"] > 0
    for library in benchmark.LIBRARIES:
        result = row[library]
        assert result["median_s"] > 0 and len(result["times"]) == 1 and min(result["times"]) > 0
        assert result["peak_gb"] > 0 and result["rss_before_gb"] > 0
        assert (result["flops"] > 0) == (row["task"] != "load")


def test_every_task_and_dtype_in_process(cache: Path, tmp_path: Path, keep_threads) -> None:
    report = _run(cache, tmp_path / "benchmark.json", "--inline")
    cells = [(row["task"], row["dtype"]) for row in report["rows"]]
    assert cells == [(task, dtype) for task in benchmark.TASKS for dtype in benchmark.DTYPES]
    for row in report["rows"]:
        _assert_row_ok(row)
    assert set(report["ceiling_tflops"]) == set(benchmark.DTYPES) and min(report["ceiling_tflops"].values()) > 0
    assert report["settings"]["steps"] == 3 and not report["settings"]["isolated_subprocesses"]
    generate = {row["dtype"]: row for row in report["rows"] if row["task"] == "generate"}
    assert generate["fp32"]["check"]["max_abs"] <= benchmark.GENERATE_MAX_ABS_FP32


def test_measurements_run_in_fresh_subprocesses(cache: Path, tmp_path: Path) -> None:
    report = _run(cache, tmp_path / "benchmark.json", "--only", "unet", "--dtypes", "bf16")
    assert report["settings"]["isolated_subprocesses"]
    [row] = report["rows"]
    assert (row["task"], row["dtype"]) == ("unet", "bf16")
    _assert_row_ok(row)
    for library in benchmark.LIBRARIES:
        assert row[library]["peak_gb"] >= row[library]["rss_before_gb"]


@pytest.mark.parametrize(
    ("task", "dtype", "error", "passed"),
    [("unet", "fp32", 0.5e-4, True), ("unet", "fp32", 2e-4, False), ("vae_decode", "bf16", 4e-2, True),
     ("vae_decode", "bf16", 6e-2, False), ("generate", "fp32", 2e-3, False), ("generate", "bf16", 1e-2, True),
     ("generate", "bf16", 3e-2, False)],
)
def test_parity_check_rejects_a_wrong_answer(task: str, dtype: str, error: float, passed: bool) -> None:
    reference = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(1, 4, 4, 4)
    ours = reference + np.float32(error)  # relative error = error (max |reference| = 1); mean abs = error
    assert benchmark.check_parity(task, dtype, ours, reference)["passed"] is passed


def test_parity_check_rejects_other_weights_shapes_and_nan() -> None:
    weights = np.array([1000.0, 12.5, 3.25])
    assert benchmark.check_parity("load", "bf16", weights.copy(), weights)["passed"]
    assert not benchmark.check_parity("load", "bf16", weights + [1, 0, 0], weights)["passed"]
    assert not benchmark.check_parity("unet", "fp32", np.zeros((1, 4)), np.zeros((1, 5)))["passed"]
    assert not benchmark.check_parity("unet", "fp32", np.full((2,), np.nan), np.ones(2))["passed"]


def test_profile_script_breaks_both_unet_calls_into_categories(cache: Path, capsys) -> None:
    assert benchmark.main(["--tiny", "--build-only", "--cache", str(cache)]) == 0
    profile = load_script("profile_unet")
    assert profile.main(["--tiny", "--cache", str(cache), "--repeats", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("one guided UNet call")) + 2
    table = {line[:20].strip(): line[20:].split() for line in lines[start:start + len(profile.CATEGORIES) + 1]}
    assert list(table) == [*profile.CATEGORIES, "total"]
    for key in ("attention other", "conv 3x3", "linear", "norm", "total"):  # the tiny UNet has all of these
        assert all(float(seconds) > 0 for seconds in table[key]), (key, table[key])
    assert float(table["attention 4096 tok"][0]) == 0  # tiny latents: no 4096-token level
    assert lines[-1].startswith("pbe / diffusers: ")


def test_profile_script_says_how_to_build_a_missing_stand_in(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="build it first with scripts/benchmark.py --build-only --tiny"):
        load_script("profile_unet").main(["--tiny", "--cache", str(tmp_path)])
