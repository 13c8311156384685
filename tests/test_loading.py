"""pbe.load and the native format; PaintByExample.from_pretrained through a hub cache on disk (no network)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pbe
from pbe.checkpoint import CheckpointError, config_from_json, config_to_json, read_native, read_safetensors, save_native
from pbe.files import current_umask, write_atomically
from pbe.loading import looks_like_path, resolve_checkpoint
from pbe.model import AutoencoderKL, ImageEncoder, PaintByExampleConfig, UNet
from weights_convert.convert import convert

from conftest import HUB, HUB_SMALL, ORIGINAL_CKPT


def test_official_parameter_counts_on_the_meta_device() -> None:
    with torch.device("meta"):
        counts = [sum(p.numel() for p in cls().parameters()) for cls in (UNet, AutoencoderKL, ImageEncoder)]
    assert counts == [859_535_364, 83_653_863, 366_950_912]


def test_config_json_round_trip() -> None:
    for config in (PaintByExampleConfig(), convert(HUB_SMALL).config):
        assert config_from_json(config_to_json(config)) == config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_round_trip_is_exact_and_cast_on_load(tmp_path, dtype) -> None:
    converted = convert(HUB)
    path = tmp_path / "pbe.safetensors"
    save_native(converted.state_dicts, converted.config, path)
    nets = pbe.load(path, dtype=dtype)
    assert nets.config == converted.config
    for name in ("unet", "vae", "image_encoder"):
        loaded = getattr(nets, name).state_dict()
        assert loaded.keys() == converted.state_dicts[name].keys()
        for key, tensor in converted.state_dicts[name].items():
            assert loaded[key].dtype == dtype
            assert torch.equal(loaded[key], tensor.to(dtype)), (name, key)


def test_native_file_holds_all_three_networks_and_configs(tmp_path) -> None:
    converted = convert(HUB_SMALL)
    path = tmp_path / "pbe.safetensors"
    save_native(converted.state_dicts, converted.config, path, dtype=torch.bfloat16)
    config, state_dicts = read_native(path)
    assert config == converted.config
    assert set(state_dicts) == {"unet", "vae", "image_encoder"}
    assert all(t.dtype == torch.bfloat16 for sd in state_dicts.values() for t in sd.values())
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # as any file, not a temporary file's 0600


def test_failed_native_write_leaves_nothing(tmp_path) -> None:
    converted = convert(HUB_SMALL)
    broken = dict(converted.state_dicts, vae={"x": "not a tensor"})
    with pytest.raises(Exception):
        save_native(broken, converted.config, tmp_path / "pbe.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_non_native_safetensors_is_not_mistaken_for_native(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="unknown layout"):
        pbe.load(path)


# ---- hub ids -----------------------------------------------------------------------------------------------------------

def _fake_hub_cache(cache, repo_id: str, source) -> None:
    """Lay out a Hugging Face cache entry for `repo_id` holding the files of `source` (no network involved)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_resolves_to_the_cached_snapshot_offline(tmp_path) -> None:
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "Fantasy-Studio/Paint-by-Example", HUB_SMALL)
    folder = resolve_checkpoint("Fantasy-Studio/Paint-by-Example", cache_dir=cache)
    assert (folder / "unet" / "config.json").is_file()
    assert folder.is_relative_to(cache)


def test_uncached_hub_id_offline_says_how_to_use_a_local_copy(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no cached copy.*--checkpoint"):
        resolve_checkpoint("Fantasy-Studio/Paint-by-Example", cache_dir=tmp_path / "empty-cache")


def test_not_a_path_nor_a_repo_id(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        resolve_checkpoint(str(tmp_path / "a" / "b" / "c.ckpt"))


@pytest.fixture
def no_hub(monkeypatch):
    """Any call into huggingface_hub fails the test."""
    import huggingface_hub

    def called(*args, **kwargs):
        raise AssertionError("the hub was asked")

    for name in ("list_repo_files", "snapshot_download", "hf_hub_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, called)


@pytest.mark.parametrize("src", ["weights/model.ckpt", "model.safetensors", "pbe.bin", "w/x.pt", "w/x.pth",
                                 "./weights", "../x", "/no/such/place", "~/no-such-pbe-folder/model", "a/b/c",
                                 "weights\\model", "C:/models/pbe", "name with spaces/x"])
def test_a_missing_path_is_not_found_at_once_without_asking_the_hub(tmp_path, monkeypatch, no_hub, src) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or folder.*the hub was not asked"):
        resolve_checkpoint(src)


def test_a_repo_id_shaped_path_under_an_existing_folder_is_a_path(tmp_path, monkeypatch, no_hub) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    with pytest.raises(CheckpointError, match=r"weights/model: no such file or folder in .*folder weights exists, "
                                              r"model does not.*hub was not asked"):
        resolve_checkpoint("weights/model")


def test_looks_like_path() -> None:
    assert not looks_like_path("Fantasy-Studio/Paint-by-Example") and not looks_like_path("someone/tiny-pbe.v2")
    assert looks_like_path("someone/model.ckpt") and looks_like_path("justaname")


def test_the_missing_path_message_names_the_existing_part(tmp_path, no_hub) -> None:
    with pytest.raises(CheckpointError, match=rf"folder {tmp_path} exists, a/b/c.ckpt does not"):
        resolve_checkpoint(str(tmp_path / "a" / "b" / "c.ckpt"))


# ---- configs for checkpoints off the official path -----------------------------------------------------------------

def test_original_layout_of_another_structure_is_refused_without_a_config() -> None:
    with pytest.raises(CheckpointError) as caught:
        pbe.load(ORIGINAL_CKPT)
    text = str(caught.value)
    assert text.startswith(f"{ORIGINAL_CKPT}: an original-layout checkpoint whose structure is not the official one")
    assert "image_encoder.clip.image_size 32 (official 224)" in text
    assert "attention heads of the UNet and of the CLIP tower" in text and "config=" in text and "--config" in text


def test_original_layout_loads_with_a_hub_folder_or_a_json_as_config(tmp_path) -> None:
    hub = pbe.load(HUB)
    json_config = tmp_path / "config.json"
    json_config.write_text(config_to_json(hub.config))
    for config in (HUB, str(HUB), json_config, hub.config):
        nets = pbe.load(ORIGINAL_CKPT, config=config)
        assert nets.config == hub.config
        for name in ("unet", "vae", "image_encoder"):
            ours, theirs = getattr(nets, name).state_dict(), getattr(hub, name).state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def _original_layout_shapes(config: PaintByExampleConfig) -> dict[str, torch.Size]:
    """The original-layout names and shapes of networks built from ``config``, from the tables (no weights needed)."""
    from weights_convert.convert import our_shapes
    from weights_convert.mapping import expand, expected_source_shape
    from weights_convert.tables import RULES

    shapes = {}
    for network in ("unet", "vae", "image_encoder"):
        ours = our_shapes(network, config)
        rules = RULES["ldm"][network](getattr(config, network))
        # Every name a rule could produce: its prefix alone, or with a parameter name after it.
        candidates = {f"{r.theirs[0]}{suffix}" for r in rules for suffix in ("", ".weight", ".bias")}
        for name, (source, transform) in expand(rules, ours, candidates, origin="table").items():
            shapes[source] = torch.Size(expected_source_shape(ours[name], transform))
    return shapes


def test_the_official_structure_takes_the_official_values_without_a_config() -> None:
    """The one case where the layout's missing values may be assumed: the shapes ARE the official networks."""
    from weights_convert.configs import config_from_ldm

    official = PaintByExampleConfig()
    assert config_from_ldm(_original_layout_shapes(official), None, origin="official") == official


def test_a_clip_tower_other_than_vit_l14_is_refused_without_a_config() -> None:
    """ViT-B/16 (width 768, 12 layers, 12 heads) beside the official UNet and autoencoder: 16 heads would be wrong."""
    from weights_convert.configs import config_from_ldm

    official = PaintByExampleConfig()
    vit_b = dataclasses.replace(official.image_encoder.clip, width=768, layers=12, heads=12, mlp_dim=3072,
                                patch_size=16)
    config = dataclasses.replace(official, image_encoder=dataclasses.replace(official.image_encoder, clip=vit_b))
    shapes = _original_layout_shapes(config)
    with pytest.raises(CheckpointError, match=r"ckpt: .*structure is not the official one \("
                                              r"image_encoder.clip.patch_size 16 \(official 14\); "
                                              r"image_encoder.clip.width 768 \(official 1024\)"):
        config_from_ldm(shapes, None, origin="ckpt")
    assert config_from_ldm(shapes, config, origin="ckpt") == config  # given the config: exactly it


def test_from_pretrained_and_paint_take_a_config(tmp_path, capsys) -> None:
    from PIL import Image

    from pbe.cli import main

    pipe = pbe.PaintByExample.from_pretrained(ORIGINAL_CKPT, config=HUB)
    assert pipe.unet.config == pbe.load(HUB).config.unet
    files = {}
    for name, color in [("image", (200, 40, 40)), ("mask", (255, 255, 255)), ("example", (20, 90, 200))]:
        files[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (32, 32), color).save(files[name])
    argv = ["paint", *(a for name, path in files.items() for a in (f"--{name}", str(path))), "-o",
            str(tmp_path / "out.png"), "--checkpoint", str(ORIGINAL_CKPT), "--steps", "1", "--seed", "0",
            "--device", "cpu", "--dtype", "fp32"]
    assert main(argv) == 1
    assert "structure is not the official one" in capsys.readouterr().err
    assert main([*argv, "--config", str(HUB)]) == 0
    assert "--config" in capsys.readouterr().err  # the printed command repeating the run names it too
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_a_config_contradicting_a_native_file_is_refused(tmp_path) -> None:
    converted = convert(HUB)
    path = tmp_path / "pbe.safetensors"
    save_native(converted.state_dicts, converted.config, path)
    with pytest.raises(CheckpointError, match="describes its own networks.*drop it"):
        pbe.load(path, config=HUB_SMALL)
    assert pbe.load(path, config=HUB).config == converted.config


def test_a_native_file_missing_a_tensor_names_the_file_and_the_tensor(tmp_path) -> None:
    from safetensors.torch import save_file

    converted = convert(HUB_SMALL)
    path = tmp_path / "pbe.safetensors"
    save_native(converted.state_dicts, converted.config, path)
    tensors, metadata = read_safetensors(path)
    del tensors["vae.decoder.conv_out.bias"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "cut.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError,
                       match=r"cut.safetensors: 1 missing tensor\(s\) of the vae: decoder.conv_out.bias"):
        pbe.load(tmp_path / "cut.safetensors")


# ---- atomic writes -------------------------------------------------------------------------------------------------

def test_current_umask_is_read_without_setting_it(monkeypatch) -> None:
    old = os.umask(0o027)
    try:
        if sys.platform.startswith("linux"):
            monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask was called"))
        assert current_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_files_written_atomically_get_the_plain_permissions_under_any_umask(tmp_path) -> None:
    for umask in (0o022, 0o077, 0o002):
        old = os.umask(umask)
        try:
            write_atomically(tmp_path / f"{umask}.bin", lambda tmp: open(tmp, "wb").close())
            (tmp_path / f"{umask}.plain").write_bytes(b"")
        finally:
            os.umask(old)
        written, plain = (tmp_path / f"{umask}.{kind}" for kind in ("bin", "plain"))
        assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_failed_write_removes_what_the_writer_left_beside_its_file(tmp_path) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        (Path(tmp).parent / ".tmpXYZ123").write_bytes(b"what safetensors' Rust writer makes beside its file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "out.safetensors", write)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_write_are_removed_by_the_next_write_unless_their_process_runs(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.png.pbe-partial-{int(dead.stdout)}-abc123"
    running = tmp_path / f".out.png.pbe-partial-{os.getppid()}-def456"  # our parent runs
    other = tmp_path / f".other.png.pbe-partial-{int(dead.stdout)}-abc123"  # another output's: not ours to touch
    for folder in (stale, running, other):
        folder.mkdir()
        (folder / ".tmp123").write_bytes(b"x")
    write_atomically(tmp_path / "out.png", lambda tmp: Path(tmp).write_bytes(b"png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name, "out.png"])


def test_from_pretrained_through_the_hub_cache_in_a_fresh_process(tmp_path) -> None:
    """HF_HUB_OFFLINE must be honoured from the environment the library is imported with."""
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "someone/tiny-pbe", HUB_SMALL)
    code = textwrap.dedent("""
        from pbe import PaintByExample
        pipe = PaintByExample.from_pretrained("someone/tiny-pbe")
        print(type(pipe.scheduler).__name__, pipe.unet.config.channels)
    """)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "PNDMScheduler"


def test_native_load_in_the_file_dtype_is_a_zero_copy_memory_map(tmp_path) -> None:
    converted = convert(HUB_SMALL)
    path = tmp_path / "pbe.safetensors"
    save_native(converted.state_dicts, converted.config, path, dtype=torch.bfloat16)
    before = path.read_bytes()
    nets = pbe.load(path, dtype=torch.bfloat16)
    # Nothing was copied: every parameter lies where the file's header puts its bytes, relative to one mapping of it.
    header_len = int.from_bytes(before[:8], "little")
    header = json.loads(before[8:8 + header_len])
    addresses = {f"{name}.{key}": t.data_ptr() for name in ("unet", "vae", "image_encoder")
                 for key, t in getattr(nets, name).state_dict().items()}
    assert addresses.keys() == header.keys() - {"__metadata__"}
    base = {address - header[key]["data_offsets"][0] for key, address in addresses.items()}
    assert len(base) == 1
    with torch.no_grad():
        nets.unet.conv_in.weight.add_(1.0)  # the mapping is private (copy-on-write): the file never changes
    assert path.read_bytes() == before
    assert pbe.load(path, dtype=torch.float32).unet.conv_in.weight.dtype == torch.float32  # other dtypes: one cast


def test_truncated_native_file_is_a_clear_error(tmp_path) -> None:
    converted = convert(HUB_SMALL)
    path = tmp_path / "pbe.safetensors"
    save_native(converted.state_dicts, converted.config, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="pbe.safetensors"):
        pbe.load(path)


# ---- loading in a narrower dtype: the peak is the narrow weights plus one wide tensor -----------------------------

_PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import torch, pbe
    torch.set_num_threads(1)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    src, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    pbe.load(sys.argv[3], dtype=dtype)  # the same code once on the tiny stand-in: imports and caches settle
    gc.collect()
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from now
    nets = pbe.load(src, dtype=dtype)
    peak = status("VmHWM:")
    narrow = sum(t.numel() * t.element_size() for name in ("unet", "vae", "image_encoder")
                 for t in getattr(nets, name).state_dict().values())
    print(json.dumps({"growth": peak - before, "narrow": narrow}))
""")


@pytest.fixture(scope="module")
def wide_hub(tmp_path_factory) -> Path:
    """A hub-layout stand-in whose float32 UNet (~140 MB) dwarfs the runtime's own allocations, saved by diffusers as
    the hub repo ships it (pickled .bin)."""
    from diffusers import UNet2DConditionModel

    folder = Path(shutil.copytree(HUB_SMALL, tmp_path_factory.mktemp("wide") / "hub"))
    config = json.loads((HUB / "unet" / "config.json").read_text())
    config.update(block_out_channels=[64, 128, 256, 256], norm_num_groups=32, attention_head_dim=8)
    (folder / "unet").mkdir(exist_ok=True)
    for stale in (folder / "unet").iterdir():
        stale.unlink()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_loading_in_a_narrower_dtype_holds_the_narrow_weights_plus_one_wide_tensor(wide_hub, dtype: str) -> None:
    """The issue: a float32 hub folder loaded in bfloat16 peaked at 7.9 GB, the float32 file AND the bfloat16 copies
    (the mapped file's pages stayed resident). Allowed: the narrow weights, the largest float32 tensor, and 32 MiB for
    the loader's own bookkeeping (key maps, the unpickler, allocator slack)."""
    wide = torch.load(wide_hub / "unet" / "diffusion_pytorch_model.bin", weights_only=True, mmap=True)
    largest = max(t.numel() * t.element_size() for t in wide.values())
    wide_bytes = sum(t.numel() * t.element_size() for t in wide.values())
    del wide
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(wide_hub), dtype, str(HUB_SMALL)],
                         capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["narrow"] > wide_bytes // 2 * 0.95  # the UNet is most of the checkpoint
    bound = measured["narrow"] + largest + 32 * 2**20
    assert measured["growth"] <= bound, (f"grew {measured['growth'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB "
                                         f"(narrow weights {measured['narrow'] / 2**20:.0f} MiB, float32 UNet "
                                         f"{wide_bytes / 2**20:.0f} MiB)")
