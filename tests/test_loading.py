"""pbe.load and the native format; PaintByExample.from_pretrained through a hub cache on disk (no network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pbe
from pbe.checkpoint import CheckpointError, config_from_json, config_to_json, read_native, save_native
from pbe.loading import resolve_checkpoint
from pbe.model import AutoencoderKL, ImageEncoder, PaintByExampleConfig, UNet
from weights_convert.convert import convert

from conftest import HUB, HUB_SMALL


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
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # readable like any file, not mkstemp's private mode


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
