"""``pbe batch`` and ``pbe.batch``: manifests, seeds, bad rows, restarts and ranks, on the tiny stand-in checkpoint.

Runs through real subprocesses (``python -m pbe batch``, ``torchrun``) where exit statuses, stderr or several processes
are the point; the rest in-process. Every process uses one thread: on the CPU the thread count changes float rounding,
and the bit-for-bit comparisons compare runs with the same count (as torchrun gives each rank one thread).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import pbe.batch
from pbe import PaintByExample, PaintOptions
from pbe.batch import ManifestError, Ranks, Row
from pbe.cli import main

from conftest import HUB

WIDTH, HEIGHT = 32, 24
TORCHRUN = Path(sys.executable).with_name("torchrun")


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with images a0..a4 (32x24), a mask, an example, a corrupt file and a mask of another size."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / f"a{i}.png")
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).rectangle([(8, 4), (23, 19)], fill=255)
    mask.save(folder / "mask.png")
    Image.new("L", (16, 16), 255).save(folder / "small_mask.png")
    Image.new("RGB", (30, 26), (200, 30, 30)).save(folder / "example.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def row(image: str, **fields: object) -> dict[str, object]:
    return {"image": image, "mask": "mask.png", "example": "example.png", **fields}


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


GOOD = [row("a0.png"), row("a1.png", seed=99), row("a2.png"), row("a3.png", output="sub/three.jpg"), row("a4.png")]


def batch_args(manifest: Path, out: Path, checkpoint: Path | str, *extra: str) -> list[str]:
    return ["batch", str(manifest), "--output-dir", str(out), "--checkpoint", str(checkpoint), "--steps", "2", *extra]


def environment(**env: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(pbe.batch.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
            **env}


def run_pbe(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pbe", *args], capture_output=True, text=True, env=environment(**env),
                          timeout=300)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temporary files included) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- manifests -----------------------------------------------------------------------------------------------------


def test_jsonl_and_csv_give_the_same_rows(tmp_path) -> None:
    jsonl = write_jsonl(tmp_path / "m.jsonl", [row("x/a.png", seed=7), row("b.jpg", output="o/b.jpg")])
    (tmp_path / "m.csv").write_text("image,mask,example,seed,output\nx/a.png,mask.png,example.png,7,\n\n"
                                    "b.jpg,mask.png,example.png,,o/b.jpg\n")
    from_jsonl, from_csv = pbe.batch.read_manifest(jsonl), pbe.batch.read_manifest(tmp_path / "m.csv")
    assert [(r.index, r.image, r.mask, r.example, r.output, r.seed) for r in from_jsonl] == [
        (0, tmp_path / "x/a.png", tmp_path / "mask.png", tmp_path / "example.png", Path("a.png"), 7),
        (1, tmp_path / "b.jpg", tmp_path / "mask.png", tmp_path / "example.png", Path("o/b.jpg"), None),
    ]
    assert [(r.index, r.image, r.output, r.seed) for r in from_csv] == [
        (r.index, r.image, r.output, r.seed) for r in from_jsonl]
    assert from_csv[1].where == "m.csv line 4"  # the blank line is skipped, not a row


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("m.jsonl", 'row 1 (m.jsonl line 2): not valid JSON'),
        ("m.jsonl", "row 1 (m.jsonl line 2): field 'mask' must be a file path, got nothing"),
        ("m.jsonl", "row 1 (m.jsonl line 2): unknown field(s) sede"),
        ("m.jsonl", "row 1 (m.jsonl line 2): field 'seed' must be an integer from 0 to 2**64 - 1, got -3"),
        ("m.jsonl", "row 1 (m.jsonl line 2): field 'seed' must be an integer from 0 to 2**64 - 1, got 1.5"),
        ("m.jsonl", "row 1 (m.jsonl line 2): output '../a.png' must stay inside the output folder"),
        ("m.jsonl", "row 1 (m.jsonl line 2): output '/tmp/a.png' must stay inside the output folder"),
        ("m.jsonl", "row 1 (m.jsonl line 2): output 'a.gif' must end in .png"),
        ("m.jsonl", "row 1 (m.jsonl line 2) and row 0 (m.jsonl line 1) both write 'a0.png'"),
        ("m.jsonl", "the manifest holds no rows"),
        ("m.csv", "m.csv line 1: the CSV header must name the columns image, mask, example"),
        ("m.csv", "row 1 (m.csv line 3): 6 cells for 5 header columns"),
        ("m.csv", "row 1 (m.csv line 3): field 'seed' must be an integer from 0 to 2**64 - 1, got 'x1'"),
        ("m.txt", "expected a file name ending in .jsonl, .ndjson, .csv"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_row_before_the_model_loads(tmp_path, data, capsys, manifest,
                                                                             message) -> None:
    good = json.dumps(row("a0.png"))
    bad_line = {
        "not valid JSON": '{"image": "a1.png",',
        "got nothing": json.dumps({"image": "a1.png", "example": "example.png"}),
        "sede": json.dumps(row("a1.png", sede=3)),
        "got -3": json.dumps(row("a1.png", seed=-3)),
        "got 1.5": json.dumps(row("a1.png", seed=1.5)),
        "'../a.png'": json.dumps(row("a1.png", output="../a.png")),
        "'/tmp/a.png'": json.dumps(row("a1.png", output="/tmp/a.png")),
        "'a.gif'": json.dumps(row("a1.png", output="a.gif")),
        "both write": json.dumps(row("other/a0.png")),
    }
    texts = {key: f"{good}\n{line}\n" for key, line in bad_line.items()}
    texts["no rows"] = "\n\n"
    header = "image,mask,example,seed,output\n"
    texts["CSV header"] = "image,mask,seed\na0.png,mask.png,1\n"
    texts["6 cells"] = header + "a0.png,mask.png,example.png,,\na1.png,mask.png,example.png,,,extra\n"
    texts["'x1'"] = header + "a0.png,mask.png,example.png,,\na1.png,mask.png,example.png,x1,\n"
    texts["ending in"] = good
    text = next(text for key, text in texts.items() if key in message)
    path = data / manifest
    path.write_text(text)
    try:
        # The checkpoint does not exist: the manifest error must come first (nothing slow happens before it).
        assert main(batch_args(path, tmp_path / "out", tmp_path / "missing-checkpoint")) == 2
    finally:
        path.unlink()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_an_input_is_refused(tmp_path, data, capsys) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [row(str(data / "a0.png"), mask=str(data / "mask.png"),
                                                      example=str(data / "example.png"))])
    assert main(batch_args(manifest, data, tmp_path / "missing-checkpoint")) == 2
    assert "row 0 (m.jsonl line 1): its output" in capsys.readouterr().err


@pytest.mark.parametrize(("output_dir", "extra", "message"), [
    ("/proc/painted", [], "--output-dir: cannot write in the folder /proc"),  # /proc takes no new file, even from root
    ("a0.png", [], "a0.png is a file, not a folder"),
    ("out", ["--steps", "5000"], "--steps: expected an integer from 1 to 999 for PNDMScheduler("),
    ("out", ["--resolution", "100"], "--resolution: expected a positive multiple of 8"),
    ("out", ["--mask-blur", "2"], "--mask-blur only applies with --keep-unmasked"),
])
def test_bad_options_and_output_folders_are_refused_before_the_model_loads(tmp_path, data, capsys, output_dir, extra,
                                                                           message) -> None:
    """The shared painting options are checked as pbe paint checks them; the output folder must be writable."""
    manifest = write_jsonl(tmp_path / "m.jsonl", [dict(r, image=str(data / r["image"]), mask=str(data / "mask.png"),
                                                       example=str(data / "example.png")) for r in GOOD])
    folder = {"a0.png": data / "a0.png", "out": tmp_path / "out"}.get(output_dir, Path(output_dir))
    # The checkpoint does not exist: had the model started loading, the error would be about it.
    assert main(batch_args(manifest, folder, tmp_path / "missing-checkpoint", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_seeds_are_the_row_seed_else_base_plus_index(tmp_path) -> None:
    rows = pbe.batch.parse_rows([row("a.png"), row("b.png", seed=3), row("c.png")])
    assert [pbe.batch.row_seed(r, 10) for r in rows] == [10, 3, 12]
    with pytest.raises(ValueError, match=r"--seed 18446744073709551614: row 2 would get seed 18446744073709551616"):
        pbe.batch.check_seeds(rows, 2**64 - 2)


def test_rows_are_dealt_to_ranks_by_index_modulo_world_size() -> None:
    rows = pbe.batch.parse_rows([row(f"{i}.png") for i in range(7)])
    shares = [[r.index for r in pbe.batch.rows_of_rank(rows, Ranks(rank, 3, 0))] for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]


def test_ranks_from_the_environment() -> None:
    assert pbe.batch.ranks_from_environment({}) == Ranks(0, 1, 0)
    assert pbe.batch.ranks_from_environment({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Ranks(5, 8, 1)
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer, got 'two'"):
        pbe.batch.ranks_from_environment({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        pbe.batch.ranks_from_environment({"RANK": "2", "WORLD_SIZE": "2"})
    # One of the pair alone would make every process rank 0, or alone: a launcher sets both.
    with pytest.raises(ValueError, match="WORLD_SIZE='2' is set but RANK is not"):
        pbe.batch.ranks_from_environment({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK='1' is set but WORLD_SIZE is not"):
        pbe.batch.ranks_from_environment({"RANK": "1"})


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch) -> None:
    from pbe.devices import rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [rank_device(device, 3) for device in ("auto", "cuda", "cuda:0")] == ["cuda:3", "cuda:3", "cuda:0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [rank_device("auto", 3), rank_device("cpu", 3)] == ["auto", "cpu"]  # auto: resolved as pbe paint does


# ---- painting ------------------------------------------------------------------------------------------------------


def test_batch_paints_reports_bad_rows_goes_on_and_each_row_repeats_with_pbe_paint(tmp_path, hub, data) -> None:
    bad = [row("missing.png"), row("corrupt.png"), row("a0.png", mask="small_mask.png", output="mismatch.png")]
    manifest = write_jsonl(data / "bad.jsonl", GOOD[:2] + bad + GOOD[2:])
    out = tmp_path / "out"
    proc = run_pbe(batch_args(manifest, out, hub))
    manifest.unlink()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr
    assert "row 2 (bad.jsonl line 3) failed: OSError: image: image file not found" in err and "missing.png" in err
    assert "row 3 (bad.jsonl line 4) failed: OSError: image: cannot read image file" in err and "corrupt.png" in err
    assert "row 4 (bad.jsonl line 5) failed: ValueError: mask" in err and "small_mask.png" in err
    assert "painted 5, skipped 0, failed 3 (of 8 rows)" in err
    assert "rows: 100%" in err  # the progress bar over rows
    assert set(files(out)) == {"a0.png", "a1.png", "a2.png", "sub/three.jpg", "a4.png"}

    # The summary's command repeats the first failed row; with a good file in its place it paints that row's seed.
    repeat = next(line for line in err.splitlines() if line.startswith("to repeat row 2 (bad.jsonl line 3) alone: "))
    command = shlex.split(repeat.split(" alone: ", 1)[1])
    assert command[:3] == ["OMP_NUM_THREADS=1", "pbe", "paint"] and command[command.index("--seed") + 1] == "2"

    # Any row repeated alone with `pbe paint` and the row's seed gives the same bytes: row 1 (seed field 99) and
    # row 5 (index 5, base seed 0).
    for image, seed, output in (("a1.png", 99, "a1.png"), ("a2.png", 5, "a2.png")):
        again = tmp_path / f"again-{output}"
        proc = run_pbe(["paint", "--image", str(data / image), "--mask", str(data / "mask.png"), "--example",
                        str(data / "example.png"), "-o", str(again), "--checkpoint", str(hub), "--steps", "2",
                        "--seed", str(seed)])
        assert proc.returncode == 0, proc.stderr
        assert again.read_bytes() == (out / output).read_bytes()


def test_restart_skips_what_exists_and_overwrite_repaints(tmp_path, hub, data, capsys) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [dict(r, image=str(data / r["image"]), mask=str(data / "mask.png"),
                                                       example=str(data / "example.png")) for r in GOOD])
    out = tmp_path / "out"
    assert main(batch_args(manifest, out, hub)) == 0
    first = files(out)
    assert set(first) == {"a0.png", "a1.png", "a2.png", "sub/three.jpg", "a4.png"}

    # Everything done: nothing is painted, and the model is not even loaded (the checkpoint is gone).
    capsys.readouterr()
    assert main(batch_args(manifest, out, tmp_path / "missing-checkpoint")) == 0
    assert "painted 0, skipped 5, failed 0 (of 5 rows)" in capsys.readouterr().err

    # Two rows lost: only they are painted again, to the same bytes.
    (out / "a2.png").unlink()
    (out / "sub" / "three.jpg").unlink()
    (out / "a0.png").write_bytes(b"left alone")
    assert main(batch_args(manifest, out, hub)) == 0
    assert "painted 2, skipped 3, failed 0 (of 5 rows)" in capsys.readouterr().err
    assert files(out) == {**first, "a0.png": b"left alone"}

    assert main(batch_args(manifest, out, hub, "--overwrite")) == 0
    assert "painted 5, skipped 0, failed 0 (of 5 rows)" in capsys.readouterr().err
    assert files(out) == first


class Interrupted(Exception):
    pass


def test_a_killed_run_loses_only_the_row_in_flight_and_continues(tmp_path, hub, data) -> None:
    """From Python: ``paint_manifest`` returns one outcome per row; an interruption mid-run leaves whole files only."""
    pipe = PaintByExample.from_pretrained(hub)
    rows = pbe.batch.parse_rows(GOOD, base_dir=data)
    settings = {"seed": 4, "options": PaintOptions(steps=2), "progress": False}
    whole = pbe.batch.paint_manifest(pipe, rows, tmp_path / "whole", **settings)
    assert [(o.row.index, o.status, o.seed, o.output) for o in whole] == [
        (i, "painted", 99 if i == 1 else 4 + i, tmp_path / "whole" / r.output) for i, r in enumerate(rows)]

    calls = 0

    def dies_on_the_third_row(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # not a row failure: it ends the run
        return pipe(*args, **kwargs)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pbe.batch.paint_manifest(dies_on_the_third_row, rows, out, **settings)
    assert files(out) == {name: files(tmp_path / "whole")[name] for name in ("a0.png", "a1.png")}
    again = pbe.batch.paint_manifest(pipe, rows, out, **settings)
    assert [o.status for o in again] == ["skipped"] * 2 + ["painted"] * 3
    assert files(out) == files(tmp_path / "whole")


def test_a_row_failing_inside_the_pipeline_is_reported_and_the_run_goes_on(tmp_path, hub, data) -> None:
    pipe = PaintByExample.from_pretrained(hub)

    def out_of_memory_on_row_one(example, image, mask, **kwargs):
        if kwargs["generator"].initial_seed() == 99:
            raise torch.OutOfMemoryError("CPU out of memory.\nTried to allocate 2 GiB")
        return pipe(example, image, mask, **kwargs)

    seen = []
    rows = pbe.batch.parse_rows(GOOD[:3], base_dir=data)
    outcomes = pbe.batch.paint_manifest(out_of_memory_on_row_one, rows, tmp_path, options=PaintOptions(steps=2),
                                        progress=False, on_outcome=seen.append)
    assert [o.status for o in outcomes] == ["painted", "failed", "painted"] and seen == outcomes
    assert outcomes[1].error == "OutOfMemoryError: CPU out of memory. Tried to allocate 2 GiB"
    assert pbe.batch.count(outcomes) == {"painted": 2, "skipped": 0, "failed": 1}


# ---- several processes ---------------------------------------------------------------------------------------------


def distributed_manifest(folder: Path, data: Path) -> Path:
    """Rank 0 of 2 gets the rows 0, 2, 4, 6: all bad, so it is done long before rank 1 has painted its 4 good rows."""
    bad = [row("missing.png"), row("corrupt.png"),
           row("missing.png", output="m2.png"), row("corrupt.png", output="c2.png")]
    records = [record for pair in zip(bad, GOOD[:4]) for record in pair]
    return write_jsonl(folder / "m.jsonl", [dict(r, image=str(data / r["image"]), mask=str(data / "mask.png"),
                                                 example=str(data / "example.png")) for r in records])


RANK_1_IS_SLOWER = ("--steps", "8")  # so that rank 0 is surely done first (rank 1 paints 4 rows, rank 0 none)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, hub, data) -> tuple[Path, Path]:
    """The manifest of ``distributed_manifest`` painted by one process: (manifest, output folder)."""
    folder = tmp_path_factory.mktemp("single")
    manifest = distributed_manifest(folder, data)
    proc = run_pbe(batch_args(manifest, folder / "out", hub, *RANK_1_IS_SLOWER))
    assert proc.returncode == 1 and "painted 4, skipped 0, failed 4 (of 8 rows)" in proc.stderr, proc.stderr
    return manifest, folder / "out"


@pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"no torchrun beside {sys.executable}")
def test_torchrun_two_ranks_equal_one_process_bit_for_bit(tmp_path, hub, single_process) -> None:
    manifest, expected = single_process
    out = tmp_path / "out"
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "pbe",
               *batch_args(manifest, out, hub, *RANK_1_IS_SLOWER)]
    proc = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=300)
    err = proc.stderr
    assert proc.returncode == 1, err  # a row failed
    assert "rank 0 of 2: 4 of 8 rows" in err and "rank 1 of 2: 4 of 8 rows" in err
    assert "rank 0 of 2: row 0 (m.jsonl line 1) failed: OSError" in err
    # Rank 0's failed rows did not stop rank 1 (torchrun stops every rank once one exits with an error).
    assert "rank 0 of 2: painted 0, skipped 0, failed 4" in err and "rank 1 of 2: painted 4, skipped 0, failed 0" in err
    assert "painted 4, skipped 0, failed 4 (of 8 rows)" in err
    assert files(out) == files(expected)


def test_ranks_set_by_environment_variables_equal_one_process_bit_for_bit(tmp_path, hub, single_process) -> None:
    """The launcher contract without torchrun (accelerate, Slurm wrappers): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*."""
    manifest, expected = single_process
    out = tmp_path / "out"
    port = str(free_port())
    command = [sys.executable, "-m", "pbe", *batch_args(manifest, out, hub, *RANK_1_IS_SLOWER)]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                              env=environment(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in range(2)]
    errs = [proc.communicate(timeout=300)[1] for proc in procs]
    # Both ranks exit 1: the totals they exchange hold rank 0's failed rows.
    assert [proc.returncode for proc in procs] == [1, 1], errs
    assert "rank 0 of 2: painted 0, skipped 0, failed 4" in errs[0]
    assert "rank 1 of 2: painted 4, skipped 0, failed 0" in errs[1]
    assert "painted 4, skipped 0, failed 4 (of 8 rows)" in errs[0]
    assert files(out) == files(expected)


# ---- issue 15: manifests as people write them ---------------------------------------------------------------------


def test_csv_header_names_and_cells_may_have_spaces_around_them(tmp_path) -> None:
    (tmp_path / "m.csv").write_text("image, mask, example , seed,output\n a/b.png, mask.png,example.png , 7, o.png\n")
    (only,) = pbe.batch.read_manifest(tmp_path / "m.csv")
    assert (only.image, only.mask, only.example, only.seed, only.output) == (
        tmp_path / "a/b.png", tmp_path / "mask.png", tmp_path / "example.png", 7, Path("o.png"))


@pytest.mark.parametrize("written", ["7", "7.0", "7e0", "18446744073709551615.0"])
def test_an_integral_seed_is_accepted_however_written_in_json_and_csv(tmp_path, written) -> None:
    (tmp_path / "m.jsonl").write_text(f'{{"image": "a.png", "mask": "m.png", "example": "e.png", "seed": {written}}}\n')
    (tmp_path / "m.csv").write_text(f"image,mask,example,seed\na.png,m.png,e.png,{written}\n")
    expected = 2**64 - 1 if written.startswith("1844") else 7  # exactly: JSON numbers are not rounded to floats
    for manifest in ("m.jsonl", "m.csv"):
        assert [row.seed for row in pbe.batch.read_manifest(tmp_path / manifest)] == [expected]
    assert pbe.batch.parse_rows([row("a.png", seed=7.0)])[0].seed == 7  # from Python too


@pytest.mark.parametrize(("manifest", "text", "shown"), [
    ("m.jsonl", '{"image": "a.png", "mask": "m.png", "example": "e.png", "seed": 7.5}\n', "7.5"),
    ("m.csv", "image,mask,example,seed\na.png,m.png,e.png,7.5\n", "'7.5'"),
    ("m.csv", "image,mask,example,seed\na.png,m.png,e.png,nan\n", "'nan'"),
    ("m.jsonl", '{"image": "a.png", "mask": "m.png", "example": "e.png", "seed": 1.8446744073709552e19}\n',
     "1.8446744073709552E+19"),
])
def test_a_seed_that_is_not_an_integer_is_refused_naming_row_and_field(tmp_path, manifest, text, shown) -> None:
    (tmp_path / manifest).write_text(text)
    with pytest.raises(ManifestError) as caught:
        pbe.batch.read_manifest(tmp_path / manifest)
    assert str(caught.value) == (f"row 0 ({manifest} line {2 if manifest == 'm.csv' else 1}): field 'seed' must be an "
                                 f"integer from 0 to 2**64 - 1, got {shown}")


def test_outputs_that_differ_only_by_case_are_refused_naming_both_rows(tmp_path, data, capsys) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [row(str(data / "a0.png"), output="Sub/X.png"), row("a1.png"),
                                                  row(str(data / "a2.png"), output="sub/x.png")])
    assert main(batch_args(manifest, tmp_path / "out", tmp_path / "missing-checkpoint")) == 2
    err = capsys.readouterr().err
    assert err == ("error: row 2 (m.jsonl line 3) writes 'sub/x.png' and row 0 (m.jsonl line 1) writes 'Sub/X.png': "
                   "names that differ only by case are one file on case-insensitive file systems (macOS, Windows); "
                   "give one of them another 'output'\n")
    assert not (tmp_path / "out").exists()


def test_a_row_naming_a_folder_says_it_is_a_folder(tmp_path, data) -> None:
    def never_called(*args, **kwargs):
        raise AssertionError("the row's inputs were not checked")

    rows = pbe.batch.parse_rows([row("a0.png", example="sub")], base_dir=tmp_path)
    (tmp_path / "sub").mkdir()
    for name in ("a0.png", "mask.png"):
        shutil.copy(data / name, tmp_path / name)
    (outcome,) = pbe.batch.paint_manifest(never_called, rows, tmp_path / "out", progress=False)
    assert outcome.status == "failed"
    assert outcome.error == f"OSError: example: '{tmp_path / 'sub'}' is a folder, expected a picture file"


@pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"no torchrun beside {sys.executable}")
def test_torchrun_ranks_print_whole_lines(tmp_path, hub, data) -> None:
    """The ranks share one stderr: each summary (and each row's outcome) is a line of its own, with no progress bar
    redrawn in place (carriage returns) to run into it."""
    manifest = write_jsonl(tmp_path / "m.jsonl", [dict(r, image=str(data / r["image"]), mask=str(data / "mask.png"),
                                                       example=str(data / "example.png"))
                                                  for r in [*GOOD[:3], row("missing.png")]])
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "pbe",
               *batch_args(manifest, tmp_path / "out", hub, "--steps", "1")]
    proc = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=300)
    lines = proc.stderr.splitlines()
    assert "rank 0 of 2: painted 2, skipped 0, failed 0" in lines, proc.stderr
    assert "rank 1 of 2: painted 1, skipped 0, failed 1" in lines, proc.stderr
    assert "painted 3, skipped 0, failed 1 (of 4 rows)" in lines, proc.stderr
    assert "rank 0 of 2: row 2 (m.jsonl line 3) painted" in lines, proc.stderr
    assert any(line.startswith("rank 1 of 2: row 3 (m.jsonl line 4) failed: OSError: image: ")
               for line in lines), proc.stderr
    assert "\r" not in proc.stderr


def test_each_line_a_rank_prints_is_one_write(tmp_path, data, monkeypatch) -> None:
    """Why summaries of torchrun ranks ran into one line: ``print`` writes the text and its newline separately, and
    another rank's whole line can land between the two in the stderr they share. Rank 1 of 2, in-process."""
    manifest = write_jsonl(tmp_path / "m.jsonl", [dict(r, image=str(data / r["image"]), mask=str(data / "mask.png"),
                                                       example=str(data / "example.png")) for r in GOOD[:2]])
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a0.png", "a1.png"):
        (out / name).write_bytes(b"painted before")  # all done: no model, no process group needed
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(pbe.batch, "join_ranks", lambda ranks: None)
    monkeypatch.setattr(pbe.batch, "total_counts", lambda counts, ranks: dict(counts))
    writes = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert main(batch_args(manifest, out, tmp_path / "missing-checkpoint")) == 0
    assert "rank 1 of 2: painted 0, skipped 1, failed 0\n" in writes
    assert all(text.endswith("\n") for text in writes), writes
