"""weights_convert: the checked key mapping, its error messages, and the `python -m weights_convert` command."""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pbe
from pbe.checkpoint import CheckpointError, config_to_json, is_native, read_native
from pbe.cli import main as pbe_main
from pbe.model import PaintByExampleConfig
from weights_convert.__main__ import main as convert_main
from weights_convert.convert import convert, our_shapes
from weights_convert.mapping import build_keymap, expand
from weights_convert.readers import read_tensors
from weights_convert.tables import RULES

from conftest import FIXTURES, HUB, HUB_SMALL, ORIGINAL_CKPT, ldm_base_config

FIXTURES_TABLE = FIXTURES / "ldm_to_diffusers_unet_vae.tsv"  # committed copy of the shared table


@pytest.fixture(scope="module")
def original_tensors(original_safetensors) -> dict[str, torch.Tensor]:
    return load_file(original_safetensors)


def _write(tmp_path, tensors, name="model.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def test_every_source_tensor_is_mapped_or_ignored_on_purpose(original_tensors) -> None:
    converted = convert(ORIGINAL_CKPT, base=ldm_base_config())
    mapped = sum(len(sd) for sd in converted.state_dicts.values())
    # Three of the mapped parameters per mapper block come from ONE fused q/k/v tensor.
    fused = converted.config.image_encoder.mapper_layers * 2 * 2  # (q, k, v from one tensor) x (weight, bias)
    assert mapped - fused + len(converted.ignored) == len(original_tensors)
    assert all("DDPM" in why or "position" in why for why in converted.ignored.values())
    assert "learnable_vector" not in converted.ignored  # the uncond token is copied, never re-initialised
    torch.testing.assert_close(converted.state_dicts["image_encoder"]["uncond_embedding"],
                               original_tensors["learnable_vector"], rtol=0, atol=0)


def test_original_ckpt_loads_without_lightning_and_without_running_pickled_code() -> None:
    assert "pytorch_lightning" not in sys.modules
    tensors = read_tensors(ORIGINAL_CKPT)
    assert "model.diffusion_model.input_blocks.0.0.weight" in tensors
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    assert "pytorch_lightning" not in sys.modules


def test_hub_and_original_layouts_give_identical_weights() -> None:
    hub = convert(HUB)
    original = convert(ORIGINAL_CKPT, base=ldm_base_config())
    assert hub.config == original.config
    for network, sd in hub.state_dicts.items():
        assert sd.keys() == original.state_dicts[network].keys()
        for key, tensor in sd.items():
            assert torch.equal(tensor, original.state_dicts[network][key]), (network, key)


def test_diffusers_mapper_depth_is_derived_from_the_clip_depth() -> None:
    # Reference quirk kept: diffusers builds (num_hidden_layers + 1) // 5 mapper blocks.
    assert convert(HUB).config.image_encoder.mapper_layers == 2  # 9 CLIP layers
    assert convert(HUB_SMALL).config.image_encoder.mapper_layers == 1  # 4 CLIP layers
    assert convert(HUB_SMALL).config.vae.downscale == 2  # two-level autoencoder


# ---- bad sources: one clear error naming the file and the problem ----------------------------------------------------

def test_missing_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        pbe.load(tmp_path / "nope.ckpt")


def test_truncated_files(tmp_path, original_safetensors) -> None:
    data = ORIGINAL_CKPT.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt"):
        pbe.load(tmp_path / "cut.ckpt")
    data = original_safetensors.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        pbe.load(tmp_path / "cut.safetensors")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.bin"):
        pbe.load(tmp_path / "empty.bin")


def test_unknown_layout(tmp_path) -> None:
    path = _write(tmp_path, {"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unknown layout.*bar.bias"):
        pbe.load(path)


def test_stable_diffusion_text_to_image_checkpoint_is_refused(tmp_path, original_tensors) -> None:
    tensors = dict(original_tensors)
    weight = tensors["model.diffusion_model.input_blocks.0.0.weight"]
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = weight[:, :4].clone()  # 4-channel UNet
    with pytest.raises(CheckpointError, match="4 input channels.*text-to-image Stable Diffusion"):
        pbe.load(_write(tmp_path, tensors), config=ldm_base_config())


def test_text_encoder_keys_are_refused(tmp_path, original_tensors) -> None:
    tensors = dict(original_tensors)
    tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 4)
    with pytest.raises(CheckpointError, match="text-encoder keys"):
        pbe.load(_write(tmp_path, tensors))


def test_stable_diffusion_hub_folder_is_refused(tmp_path) -> None:
    folder = tmp_path / "sd"
    (folder / "text_encoder").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="Stable Diffusion folder"):
        pbe.load(folder)


def test_missing_keys_are_listed_with_their_count(tmp_path, original_tensors) -> None:
    tensors = {k: v for k, v in original_tensors.items() if ".transformer_blocks.0.attn1.to_q." not in k}
    with pytest.raises(CheckpointError, match=r"missing keys: \d+ \(model\.diffusion_model\.[^)]*attn1\.to_q"):
        pbe.load(_write(tmp_path, tensors), config=ldm_base_config())


@pytest.mark.parametrize("extra", [{"model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(3)},
                                   {"model.diffusion_model.extra.weight": torch.zeros(3),
                                    "first_stage_model.loss.logvar": torch.zeros(())}])
def test_unexpected_keys_are_refused(tmp_path, original_tensors, extra) -> None:
    tensors = dict(original_tensors, **extra)
    names = ", ".join(sorted(extra)) if "model_ema.decay" in extra else "model.diffusion_model.extra.weight"
    with pytest.raises(CheckpointError, match=rf"unexpected keys.*: \d \({names}\)"):
        pbe.load(_write(tmp_path, tensors), config=ldm_base_config())


def test_shape_mismatch_is_reported(tmp_path, original_tensors) -> None:
    tensors = dict(original_tensors)
    key = "cond_stage_model.mapper.resblocks.0.attn.c_proj.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    with pytest.raises(CheckpointError, match=rf"shape mismatches: {key}: expected \[32, 32\], found \[32, 33\]"):
        pbe.load(_write(tmp_path, tensors), config=ldm_base_config())


def test_hub_folder_missing_weights_or_config(tmp_path) -> None:
    folder = tmp_path / "hub"
    shutil.copytree(HUB, folder)
    (folder / "vae" / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="vae: no weights file"):
        pbe.load(folder)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unet/config.json: not valid JSON"):
        pbe.load(folder)


@pytest.mark.parametrize("change, message", [({"norm_num_groups": 3}, "not divisible by"),
                                             ({"block_out_channels": None}, "TypeError")])
def test_an_unusable_hub_config_names_its_file(tmp_path, change, message) -> None:
    folder = tmp_path / "hub"
    shutil.copytree(HUB, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=rf"unet/config.json: not a usable unet config \(.*{message}"):
        pbe.load(folder)


def test_unsupported_config_value_is_named(tmp_path) -> None:
    folder = tmp_path / "hub"
    shutil.copytree(HUB, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["use_linear_projection"] = True
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_linear_projection=True is not supported"):
        pbe.load(folder)


# ---- the command ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_command_converts_the_original_layout_and_reports(tmp_path, capsys, dtype) -> None:
    out = tmp_path / "pbe.safetensors"
    assert convert_main([str(HUB), str(out), "--dtype", dtype]) == 0
    report = capsys.readouterr().out
    assert "unet" in report and "vae" in report and "image_encoder" in report
    assert "ignored on purpose: 1 tensors" in report and "position index" in report
    assert is_native(out)
    config, state_dicts = read_native(out)
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert all(t.dtype == want for sd in state_dicts.values() for t in sd.values())
    assert config == convert(HUB).config
    assert [p.name for p in tmp_path.iterdir()] == ["pbe.safetensors"]  # no temporary file left


def test_command_converts_the_original_checkpoint_with_a_config_for_its_structure(tmp_path, capsys) -> None:
    # The original layout cannot reveal head counts or GroupNorm groups. The official values are taken only for the
    # official structure; the tiny stand-in's is not, so without --config: one clear error saying what to pass.
    out = tmp_path / "pbe.safetensors"
    assert convert_main([str(ORIGINAL_CKPT), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.ckpt" in err and "structure is not the official one" in err
    assert "unet.channels (8, 16, 32, 32) (official (320, 640, 1280, 1280))" in err
    assert "attention heads of the UNet and of the CLIP tower" in err and "GroupNorm groups" in err
    assert "--config" in err and "hub-layout folder" in err and not out.exists()
    config = tmp_path / "config.json"
    config.write_text(config_to_json(convert(HUB).config))
    for given in (config, HUB):  # a pbe config JSON, or a hub-layout folder describing the same networks
        out.unlink(missing_ok=True)
        assert convert_main([str(ORIGINAL_CKPT), str(out), "--config", str(given)]) == 0
        report = capsys.readouterr().out
        assert "layout: ldm" in report and "DDPM training schedule buffer" in report
        assert read_native(out)[0] == convert(HUB).config


@pytest.mark.parametrize("content, message", [
    (None, "no such file or folder"),
    ("{not json", "not a pbe config JSON"),
    ("{}", "not a pbe config JSON"),
])
def test_command_names_a_bad_config(tmp_path, capsys, content, message) -> None:
    config = tmp_path / "config.json"
    if content is not None:
        config.write_text(content)
    out = tmp_path / "pbe.safetensors"
    assert convert_main([str(ORIGINAL_CKPT), str(out), "--config", str(config)]) == (2 if content is None else 1)
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {config}: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_a_folder_without_hub_configs_is_not_a_config(tmp_path, capsys) -> None:
    assert convert_main([str(ORIGINAL_CKPT), str(tmp_path / "o.safetensors"), "--config", str(tmp_path)]) == 1
    assert "a folder without unet/config.json" in capsys.readouterr().err


def test_a_config_contradicting_a_self_describing_source_is_refused(tmp_path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(config_to_json(convert(HUB_SMALL).config))
    assert convert_main([str(HUB), str(tmp_path / "o.safetensors"), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "describes its own networks" in err and "unet.channels (16, 32) (the file's (8, 16, 32, 32))" in err
    assert convert_main([str(HUB), str(tmp_path / "o.safetensors"), "--config", str(HUB)]) == 0  # the same: fine


def test_command_fails_cleanly_and_leaves_nothing(tmp_path, capsys) -> None:
    bad = _write(tmp_path, {"foo": torch.zeros(1)}, "bad.safetensors")
    out = tmp_path / "out.safetensors"
    assert convert_main([str(bad), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.safetensors" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_command_never_overwrites_its_input(tmp_path, capsys) -> None:
    native = tmp_path / "native.safetensors"
    assert convert_main([str(HUB), str(native)]) == 0
    before = native.read_bytes()
    assert convert_main([str(native), str(native)]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert native.read_bytes() == before


def test_command_runs_as_a_module(tmp_path) -> None:
    out = tmp_path / "x.safetensors"
    proc = subprocess.run([sys.executable, "-m", "weights_convert", str(HUB_SMALL), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and out.is_file()
    proc = subprocess.run([sys.executable, "-m", "weights_convert", str(tmp_path / "missing"), str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


# ---- the tables ---------------------------------------------------------------------------------------------------

def test_both_layout_tables_reproduce_the_shared_correspondence_table() -> None:
    """For the OFFICIAL structure, our two tables compose into exactly the 934 UNet/VAE pairs of the shared table.

    The shared table (diffusers key, original key, original shape) was written from diffusers' own converters. The
    original-layout table is also checked 1:1 against its shapes (conv 1x1 -> linear included).
    """
    rows = [line.split("\t") for line in FIXTURES_TABLE.read_text().splitlines() if not line.startswith("#")]
    official = PaintByExampleConfig()
    for network in ("unet", "vae"):
        part = [(d.removeprefix(f"{network}."), o, s) for d, o, s in rows if d.startswith(f"{network}.")]
        ours = our_shapes(network, official)
        ldm = build_keymap(RULES["ldm"][network](getattr(official, network)), ours,
                           {o: torch.Size(json.loads(s)) for _, o, s in part}, {}, origin="table").pairs
        diffusers = expand(RULES["diffusers"][network](getattr(official, network)), ours, {d for d, _, _ in part},
                           origin="table")
        assert ours.keys() == ldm.keys() == diffusers.keys()
        assert sorted((diffusers[k][0], ldm[k][0]) for k in ours) == sorted((d, o) for d, o, _ in part)
    assert len(rows) == 934


# ---- one command, two entry points ------------------------------------------------------------------------------------

def test_pbe_convert_and_python_m_weights_convert_are_one_command(tmp_path, capsys) -> None:
    for argv in (["--help"], [str(tmp_path / "missing"), str(tmp_path / "out.safetensors")]):
        outputs = []
        for run in (convert_main, lambda a: pbe_main(["convert", *a])):
            try:
                status = run(argv)
            except SystemExit as exit_:  # --help
                status = exit_.code
            captured = capsys.readouterr()
            outputs.append((status, captured.out.partition("\n\n")[2], captured.err))  # all but the usage line
        assert outputs[0] == outputs[1]
    status, _, err = outputs[0]
    assert status == 2 and err == f"error: {tmp_path / 'missing'}: no such file or folder\n"


def test_a_failed_write_is_one_error_line(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    assert convert_main([str(HUB_SMALL), str(tmp_path / "file" / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ---- what a file is, when it is not a checkpoint -------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"", "an empty file (0 bytes)"),
    (bytes(range(7, 250)) * 3, "not a checkpoint format pbe knows (not safetensors, not a PyTorch pickle"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4a1b\nsize 7703324286\n", "a Git LFS pointer"),
    (b"<!DOCTYPE html>\n<html><head><title>404</title></head></html>", "an HTML page, not a checkpoint"),
    (b"Access denied\n", "a text file, not a checkpoint (it starts 'Access denied')"),
    (b'{"unet": {}}', "a JSON file, not a checkpoint"),
    (b"\x1f\x8b\x08\x00" + bytes(40), "a gzip archive"),
    (b"PK\x03\x04" + bytes(100), "a zip archive but not a readable PyTorch checkpoint"),
    (b"\x80\x02}q\x00.", "a pickle, but not a readable torch.save file"),  # a plain pickle of {}
])
def test_a_file_of_another_format_is_named_for_what_it_is(tmp_path, content, message) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        pbe.load(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ")
    assert "safetensors file" not in text  # never "not a readable safetensors file" for what is not one
    assert message in text


def test_a_truncated_safetensors_header_is_named(tmp_path, original_safetensors) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(original_safetensors.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="a truncated safetensors file"):
        pbe.load(path)


def test_a_legacy_non_zip_torch_save_is_read(tmp_path, original_tensors) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_tensors}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] == b"\x80\x02"
    tensors = read_tensors(path)
    assert tensors.keys() == original_tensors.keys()
    assert all(torch.equal(tensors[k], original_tensors[k]) for k in tensors)


class _RunsCode:
    """A pickled object whose unpickling would call ``function(*args)`` (what a malicious checkpoint does)."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle"])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, original_tensors, writer) -> None:
    marker = tmp_path / "MARKER"
    payload = {"state_dict": dict(list(original_tensors.items())[:3]),
               "callbacks": _RunsCode(os.system, f"touch {marker}")}
    path = tmp_path / "model.ckpt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch.save")
    with pytest.raises(CheckpointError) as caught:
        pbe.load(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: refused to run code from the checkpoint (it calls os.system)")
    assert "weights_only" not in text
    assert not marker.exists()


@pytest.mark.parametrize("function, name", [(subprocess.call, "subprocess.call"), (eval, "builtins.eval")])
def test_other_code_running_calls_are_named(tmp_path, function, name) -> None:
    marker = tmp_path / "MARKER"
    args = (["touch", str(marker)],) if function is subprocess.call else (f"open({str(marker)!r}, 'w')",)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hparams": _RunsCode(function, *args)}, path)
    with pytest.raises(CheckpointError, match=rf"refused to run code from the checkpoint \(it calls {name}\)"):
        pbe.load(path)
    assert not marker.exists()


def test_pickled_objects_that_are_not_code_are_inert_stand_ins(tmp_path, original_tensors) -> None:
    """Lightning pickles hyper-parameters too (paths, partials): loaded as empty shells, not refused as code."""
    path = tmp_path / "model.ckpt"
    hyper_parameters = {"dir": Path("/runs"), "act": functools.partial(max)}
    torch.save({"state_dict": original_tensors, "hyper_parameters": hyper_parameters}, path)
    unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert "pathlib.PosixPath" in unknown or "pathlib.WindowsPath" in unknown
    assert read_tensors(path).keys() == original_tensors.keys()


# ---- interrupts and kills: nothing left behind, or a recognisable leftover the next run removes ----------------------

# Runs the convert command in a subprocess whose safetensors writer, having written its file (and Rust's own `.tmp`
# sibling, as the real writer does while it works), waits: long enough to be signalled mid-write.
_SLOW_CONVERT = """
import pathlib, sys, time
import pbe.checkpoint
real_save = pbe.checkpoint.save_file
def slow_save(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    (pathlib.Path(path).parent / ".tmpAbC123").write_bytes(b"half-written")
    pathlib.Path(sys.argv[3]).write_text("writing")
    time.sleep(120)
pbe.checkpoint.save_file = slow_save
from weights_convert.command import main
sys.exit(main(sys.argv[1:3]))
"""


def _start_slow_conversion(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(HUB_SMALL), str(out_dir / "pbe.safetensors"),
                             str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    return proc, out_dir


def test_sigterm_is_handled_like_ctrl_c_and_leaves_nothing(tmp_path) -> None:
    proc, out_dir = _start_slow_conversion(tmp_path)
    assert [p.name for p in out_dir.iterdir()][0].startswith(".pbe.safetensors.pbe-partial-")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted\n"
    assert list(out_dir.iterdir()) == []


def test_sigkill_leaves_a_recognisable_partial_that_the_next_conversion_removes(tmp_path, capsys) -> None:
    proc, out_dir = _start_slow_conversion(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    leftovers = list(out_dir.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".pbe.safetensors.pbe-partial-")
    assert {p.name for p in leftovers[0].iterdir()} == {"pbe.safetensors", ".tmpAbC123"}  # all inside the one folder
    assert convert_main([str(HUB_SMALL), str(out_dir / "pbe.safetensors")]) == 0
    assert [p.name for p in out_dir.iterdir()] == ["pbe.safetensors"]


def test_python_m_weights_convert_reports_an_unwritable_output_in_one_line(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    proc = subprocess.run([sys.executable, "-m", "weights_convert", str(HUB_SMALL),
                           str(tmp_path / "file" / "out.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_both_entry_points_handle_an_interrupt_alike_and_leave_nothing(tmp_path, capsys, monkeypatch) -> None:
    import pbe.checkpoint

    def interrupted_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pbe.checkpoint, "save_file", interrupted_save)
    out = tmp_path / "out" / "pbe.safetensors"
    for run in (convert_main, lambda a: pbe_main(["convert", *a])):
        assert run([str(HUB_SMALL), str(out)]) == 130
        assert capsys.readouterr().err == "interrupted\n"
        assert list(out.parent.iterdir()) == []


# ---- issue 15: an existing output, a native source, an unwritable folder, a truncated file -------------------------

@pytest.mark.parametrize("entry", ["python -m weights_convert", "pbe convert"])
def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path, capsys, original_safetensors, entry) -> None:
    """Swapped arguments (`convert pbe.safetensors model.safetensors`) must not destroy the downloaded checkpoint."""
    run = convert_main if entry == "python -m weights_convert" else (lambda a: pbe_main(["convert", *a]))
    downloaded = tmp_path / "model.safetensors"
    shutil.copy(original_safetensors, downloaded)
    before = downloaded.read_bytes()
    junk = tmp_path / "junk.ckpt"  # had the source been read first, the error would be about it
    junk.write_bytes(b"not a checkpoint")
    assert run([str(junk), str(downloaded)]) == 2
    assert capsys.readouterr().err == f"error: {downloaded}: already exists; pass --overwrite to replace it\n"
    assert downloaded.read_bytes() == before
    assert run([str(HUB_SMALL), str(downloaded), "--overwrite"]) == 0
    assert is_native(downloaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.ckpt", "model.safetensors"]


def test_a_native_file_is_recognised_and_resaved_in_another_dtype(tmp_path, capsys) -> None:
    fp32, bf16 = tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors"
    assert convert_main([str(HUB_SMALL), str(fp32)]) == 0
    capsys.readouterr()
    assert convert_main([str(fp32), str(bf16), "--dtype", "bf16"]) == 0
    assert "layout: pbe native" in capsys.readouterr().out
    config, source = read_native(fp32)
    config_bf16, resaved = read_native(bf16)
    assert config_bf16 == config and resaved.keys() == source.keys()
    for network, tensors in source.items():
        assert resaved[network].keys() == tensors.keys()
        for key, tensor in tensors.items():
            assert resaved[network][key].dtype == torch.bfloat16
            assert torch.equal(resaved[network][key], tensor.to(torch.bfloat16))


def test_an_output_folder_that_takes_no_file_is_named_before_the_source_is_read(tmp_path, capsys) -> None:
    """/sys takes no new file, even from root (the issue saw `[Errno 1] ... /sys/.out.safetensors.pbe-partial-...`)."""
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    for out in (Path("/sys/out.safetensors"), Path("/sys/new-folder/out.safetensors")):
        assert convert_main([str(junk), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot write to /sys: ") and err.count("\n") == 1, err
        assert "pbe-partial" not in err


def test_a_safetensors_file_truncated_in_its_data_names_both_sizes(tmp_path) -> None:
    whole = _write(tmp_path, {"model.diffusion_model.a": torch.zeros(300), "b": torch.ones(7)}, "whole.safetensors")
    size = whole.stat().st_size
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(whole.read_bytes()[:size - 100])
    expected = f"{cut}: a truncated safetensors file: its header describes {size:,} bytes, the file has {size - 100:,}"
    for read in (pbe.load, read_tensors, read_native):
        with pytest.raises(CheckpointError) as caught:
            read(cut)
        assert str(caught.value).startswith(expected)
