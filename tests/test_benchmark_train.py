"""scripts/benchmark_train.py on the tiny stand-in (``--tiny``, 64x64): every configuration measured in its own
process, the JSON written, the watchdog killing a child that passes the memory limit, bad flags refused.

Timings are never asserted beyond being positive: the point is that the benchmark runs end to end through the
training loop's functions and that a configuration over the limit is reported, not run into the ground.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script

benchmark = load_script("benchmark_train")


def _run(tmp_path: Path, *flags: str) -> tuple[int, dict]:
    out = tmp_path / "benchmark_train.json"
    status = benchmark.main(["--tiny", "--threads", "1", "--output", str(out), *flags])
    return status, json.loads(out.read_text())


def test_every_configuration_is_measured_in_a_fresh_process(tmp_path: Path, capsys) -> None:
    status, report = _run(tmp_path, "--steps", "1")
    assert status == 0
    assert [row["config"] for row in report["rows"]] == [s.name for s in benchmark.GRID]
    assert len(benchmark.GRID) == 8 and {(s.method, s.checkpointing, s.precision) for s in benchmark.GRID} == {
        (m, c, p) for m in ("full", "lora") for c in (True, False) for p in ("fp32", "bf16")}
    for row in report["rows"]:
        assert row["status"] == "ok", row
        assert row["median_s"] > 0 and row["warmup_s"] > 0 and len(row["times_s"]) == 1
        assert row["peak_was_reset"] and row["built_gib"] > 0 and row["watch_peak_gib"] > 0
        # The peak after the reset holds the built networks and the step's extra memory, and nothing of before.
        assert row["process_peak_gib"] >= row["step_peak_gib"] >= row["built_gib"]
        assert row["adam_state_gib"] > 0 and row["threads"] == 1
    rows = {row["config"]: row for row in report["rows"]}
    full, lora = rows["full-ckpt-fp32"], rows["lora-ckpt-fp32"]
    # LoRA trains its adapters alone: far fewer parameters than the paper's set, on the same networks plus them.
    assert 0 < lora["trained_parameters"] < full["trained_parameters"] / 10
    assert lora["parameters"] > full["parameters"]
    assert full["adam_state_gib"] * 2**30 == 2 * 4 * full["trained_parameters"]  # two float32 moments each
    machine = report["machine"]
    assert machine["cpu"] and set(machine["cpu_flags"]) == {"avx512_bf16", "amx_bf16"} and machine["torch"]
    assert machine["threads"] == 1 and all(len(row["load_before"]) == 3 for row in report["rows"])
    assert report["settings"]["side"] == 64 and report["settings"]["batch"] == 1
    table = capsys.readouterr().out
    assert table == report["table"] + "\n"
    assert all(f"| {s.name} |" in table for s in benchmark.GRID)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_child_over_the_memory_limit_is_killed_and_reported(tmp_path: Path, capsys) -> None:
    # 0.05 GiB: a Python process passes it while importing torch, long before its networks are built.
    status, report = _run(tmp_path, "--memory-limit", "0.05", "--configs", "lora-ckpt-bf16,full-nockpt-fp32")
    assert status == 0  # a configuration that does not fit is a result, not a failure
    assert [row["config"] for row in report["rows"]] == ["lora-ckpt-bf16", "full-nockpt-fp32"]
    for row in report["rows"]:
        assert row["status"] == "over-limit" and row["limit_gib"] == 0.05
        assert row["watch_peak_gib"] > 0.05 and "median_s" not in row
    out = capsys.readouterr().out
    assert out.count("over 0.05 GiB") == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch", "0"], "--batch: expected an integer > 0, got '0'"),
    (["--steps", "two"], "--steps: expected an integer > 0, got 'two'"),
    (["--memory-limit", "-1"], "--memory-limit: expected a number > 0, got '-1'"),
    (["--memory-limit", "nan"], "--memory-limit: expected a number > 0, got 'nan'"),
    (["--configs", "full-ckpt-fp16"], "--configs: expected a comma-separated subset of full-ckpt-fp32,"),
    (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--output", "/nonexistent-folder/b.json"], "--output: expected a file in a writable folder"),
])
def test_bad_flags_are_refused_before_anything_runs(flags: list[str], message: str, tmp_path: Path, capsys,
                                                    monkeypatch) -> None:
    monkeypatch.setattr(benchmark, "run_child", lambda *a, **k: pytest.fail("a child was started"))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--tiny", *(["--output", str(tmp_path / "b.json")] if "--output" not in flags else []),
                        *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_device_the_machine_lacks_is_refused(tmp_path: Path) -> None:
    # No machine has a hundred GPUs: refused with and without CUDA, before any configuration runs.
    with pytest.raises(SystemExit, match="--device: expected a device this machine has .* got 'cuda:99'"):
        benchmark.main(["--tiny", "--device", "cuda:99", "--output", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()
