"""LoRA files (pbe.lora_files, weights_convert.lora), the pipeline's LoRA API, ``pbe paint/batch --lora`` and
``pbe merge-lora``, on the tiny hub stand-in.

Foreign files are written by diffusers itself (``StableDiffusionPipeline.save_lora_weights``, which needs no peft)
under diffusers' names, mapped for the test by the converter's table (``weights_convert.mapping.expand``).
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import pbe
from pbe.checkpoint import save_native
from pbe.cli import main
from pbe.lora_files import check_lora_file, load_lora, read_lora, save_lora
from pbe.model.lora import add_lora, lora_layers, lora_state_dict
from pbe.pipeline import PaintByExample
from weights_convert.mapping import expand
from weights_convert.tables import diffusers_unet_rules

from conftest import HUB, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def networks() -> pbe.PaintByExampleNetworks:
    return pbe.load(HUB)


def _adapted(networks: pbe.PaintByExampleNetworks, *, rank: int = 2, alpha: float = 3.0, seed: int = 0,
             targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")) -> torch.nn.Module:
    """A copy of the stand-in's UNet with random (trained-looking) LoRA weights."""
    unet = copy.deepcopy(networks.unet)
    add_lora(unet, rank=rank, alpha=alpha, targets=targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            for weight in (layer.lora_down.weight, layer.lora_up.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return unet


@pytest.fixture(scope="module")
def lora_path(networks, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "adapter.safetensors"
    save_lora(path, _adapted(networks), base="tests/fixtures/hub")
    return path


# ---- pbe's own file ------------------------------------------------------------------------------------------------


def test_save_and_read_round_trip(networks, tmp_path) -> None:
    unet = _adapted(networks, rank=3, alpha=6.0, targets=("to_k", "to_v"))
    path = tmp_path / "lora.safetensors"
    meta = save_lora(path, unet, base="hub", dtype=torch.bfloat16)
    state, read = read_lora(path)
    assert read == meta and (read.rank, read.alpha, read.targets, read.base) == (3, 6.0, ("to_k", "to_v"), "hub")
    assert read.format == "pbe-lora"
    expected = lora_state_dict(unet)
    assert state.keys() == expected.keys() and "mid_attn.cross_attn.to_v.lora_up.weight" in state
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in expected.items())
    # Small: the adapters alone.
    assert path.stat().st_size < 0.2 * sum(t.numel() * 4 for t in networks.unet.state_dict().values())
    with pytest.raises(ValueError, match="save_lora: the UNet carries no LoRA layers"):
        save_lora(tmp_path / "plain.safetensors", networks.unet)
    with pytest.raises(ValueError, match="lora.bin: expected a file name ending in .safetensors"):
        save_lora(tmp_path / "lora.bin", unet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_load_lora_gives_the_same_unet(networks, lora_path) -> None:
    unet = copy.deepcopy(networks.unet)
    meta = load_lora(unet, lora_path, scale=0.5)
    source = _adapted(networks)
    assert lora_state_dict(unet).keys() == lora_state_dict(source).keys()
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(unet).values(), lora_state_dict(source).values()))
    assert {layer.lora_scale for layer in lora_layers(unet).values()} == {0.5}
    assert not any(p.requires_grad for p in unet.parameters())
    assert (meta.rank, meta.alpha) == (2, 3.0)


def _rewritten(path: Path, out: Path, *, tensors=None, metadata=None) -> Path:
    state, meta = read_lora(path)
    base_metadata = {"format": "pbe-lora", "rank": str(meta.rank), "alpha": str(meta.alpha),
                     "targets": ",".join(meta.targets)}
    save_file(tensors(state) if tensors else dict(state), out, metadata={**base_metadata, **(metadata or {})})
    return out


def test_refusals_name_the_file_and_the_keys(networks, lora_path, tmp_path, hub) -> None:
    unet = copy.deepcopy(networks.unet)
    with pytest.raises(pbe.CheckpointError, match="missing.safetensors: no such LoRA file"):
        load_lora(unet, tmp_path / "missing.safetensors")

    native = tmp_path / "checkpoint.safetensors"
    save_native(networks.state_dicts(), networks.config, native)
    with pytest.raises(pbe.CheckpointError, match=r"checkpoint.safetensors: not a LoRA file .*a pbe checkpoint"):
        load_lora(unet, native)
    with pytest.raises(pbe.CheckpointError, match="not a readable safetensors file"):
        load_lora(unet, hub / "unet" / "diffusion_pytorch_model.bin")

    foreign = _rewritten(lora_path, tmp_path / "other.safetensors", tensors=lambda s: {
        k.replace("down.0.attn.0.", "down.3.attn.0."): v for k, v in s.items()})
    with pytest.raises(pbe.CheckpointError, match=r"other.safetensors: does not fit this UNet: 16 key\(s\) name no "
                                                  r"attention projection of the UNet: down.3.attn.0.cross_attn"):
        load_lora(unet, foreign)

    wrong_rank = _rewritten(lora_path, tmp_path / "rank.safetensors", metadata={"rank": "3"})
    with pytest.raises(pbe.CheckpointError, match=r"rank.safetensors: 256 bad tensor\(s\): .*does not have rank 3"):
        load_lora(unet, wrong_rank)
    bad_meta = _rewritten(lora_path, tmp_path / "meta.safetensors", metadata={"alpha": "-1"})
    with pytest.raises(pbe.CheckpointError, match="meta.safetensors: a pbe-lora file with impossible metadata"):
        load_lora(unet, bad_meta)
    misshapen = _rewritten(lora_path, tmp_path / "shape.safetensors", tensors=lambda s: {
        **s, "mid_attn.self_attn.to_q.lora_down.weight": torch.zeros(2, 7)})
    with pytest.raises(pbe.CheckpointError, match=r"misshapen .*mid_attn.self_attn.to_q.lora_down.weight: "
                                                  r"expected \[2, 32\], found \[2, 7\]"):
        load_lora(unet, misshapen)
    assert not lora_layers(unet)  # every refusal left the UNet as it was


def test_a_refused_file_leaves_a_loaded_lora_in_place(networks, lora_path, tmp_path) -> None:
    unet = copy.deepcopy(networks.unet)
    load_lora(unet, lora_path)
    before = {k: v.clone() for k, v in lora_state_dict(unet).items()}
    broken = _rewritten(lora_path, tmp_path / "broken.safetensors", tensors=lambda s: {
        **s, "up.1.attn.0.cross_attn.to_v.lora_up.weight": torch.zeros(9, 2)})
    with pytest.raises(pbe.CheckpointError):
        load_lora(unet, broken)
    assert all(torch.equal(before[k], v) for k, v in lora_state_dict(unet).items())


# ---- diffusers' and peft's files -------------------------------------------------------------------------------------


def _diffusers_names(networks, unet, spelling: str) -> dict[str, torch.Tensor]:
    """``unet``'s LoRA weights under diffusers' names, mapped by the converter's table."""
    from diffusers import UNet2DConditionModel

    theirs = set(UNet2DConditionModel.from_pretrained(HUB / "unet").state_dict())
    ours = {name: tensor.shape for name, tensor in networks.unet.state_dict().items()}
    keymap = expand(diffusers_unet_rules(networks.config.unet), ours, theirs, origin="diffusers unet")
    out = {}
    for path, layer in lora_layers(unet).items():
        module = keymap[f"{path}.weight"][0].removesuffix(".weight")
        if spelling == "peft":
            names = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        else:  # diffusers < 0.21: attention processors, `to_out_lora` for `to_out.0`
            short = path.rpartition(".")[2]
            attention = module.removesuffix(".0").removesuffix(f".{short}")
            names = f"{attention}.processor.{short}_lora.down.weight", f"{attention}.processor.{short}_lora.up.weight"
        out[names[0]], out[names[1]] = layer.lora_down.weight.detach(), layer.lora_up.weight.detach()
    return out


@pytest.mark.parametrize("spelling, metadata", [("peft", {"r": 2, "lora_alpha": 5.0}), ("peft", None),
                                                ("processor", None)])
def test_diffusers_files_read_as_pbe_ones(networks, tmp_path, spelling, metadata) -> None:
    from diffusers import StableDiffusionPipeline

    unet = _adapted(networks, rank=2)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=_diffusers_names(networks, unet, spelling),
                                              unet_lora_adapter_metadata=metadata)
    state, meta = read_lora(tmp_path / "pytorch_lora_weights.safetensors", config=networks.config.unet)
    expected = lora_state_dict(unet)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
    # Without diffusers' adapter metadata, alpha = rank (scale 1), as diffusers and peft read such a file.
    assert (meta.format, meta.rank, meta.alpha) == ("diffusers", 2, 5.0 if metadata else 2.0)
    pipe = PaintByExample(copy.deepcopy(networks.unet), networks.vae, networks.image_encoder)
    pipe.load_lora_weights(tmp_path)  # the folder, as diffusers users pass it
    assert len(lora_layers(pipe.unet)) == len(lora_layers(unet))


def test_foreign_files_are_refused_by_name(networks, tmp_path) -> None:
    weight = torch.zeros(2, 8)
    for name, keys, message in [
        ("text.safetensors", {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": weight},
         "text-encoder LoRA weight.*Paint by Example has no text encoder"),
        ("stray.safetensors", {"unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
                               weight}, r"1 key\(s\) name no attention projection of this UNet: unet.down_blocks.7"),
        ("twice.safetensors", {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": weight,
                               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
                               weight.clone()}, "given twice under two spellings"),
    ]:
        save_file(keys, tmp_path / name)
        with pytest.raises(pbe.CheckpointError, match=f"{name}: .*{message}"):
            read_lora(tmp_path / name, config=networks.config.unet)


# ---- the pipeline ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pictures() -> tuple[Image.Image, Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    mask = Image.new("L", (48, 40), 0)
    ImageDraw.Draw(mask).rectangle([(16, 8), (39, 31)], fill=255)
    return Image.new("RGB", (30, 26), (200, 30, 30)), image, mask


def _paint(pipe: PaintByExample, pictures) -> torch.Tensor:
    return pipe(*pictures, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                progress=False).images


def test_pipeline_lora_api(lora_path, pictures) -> None:
    base = _paint(PaintByExample.from_pretrained(HUB), pictures)
    pipe = PaintByExample.from_pretrained(HUB, lora=lora_path, lora_scale=0.8)
    adapted = _paint(pipe, pictures)
    assert (adapted - base).abs().max() > 1e-2

    fused = PaintByExample.from_pretrained(HUB)
    fused.load_lora_weights(lora_path)
    fused.fuse_lora(lora_scale=0.8)
    assert not lora_layers(fused.unet)
    assert relative_error(_paint(fused, pictures), adapted) < 1e-5

    pipe.set_lora_scale(0.0)
    assert torch.equal(_paint(pipe, pictures), base)
    pipe.unload_lora_weights()
    assert not lora_layers(pipe.unet) and torch.equal(_paint(pipe, pictures), base)
    with pytest.raises(ValueError, match="set_lora_scale: the UNet carries no LoRA layers"):
        pipe.set_lora_scale(1.0)
    with pytest.raises(ValueError, match="fuse_lora: no LoRA is loaded"):
        pipe.fuse_lora()


def test_from_pretrained_checks_the_lora_file_before_loading(tmp_path, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(pbe.pipeline, "load", no_loading)
    with pytest.raises(pbe.CheckpointError, match="nope.safetensors: no such LoRA file"):
        PaintByExample.from_pretrained(HUB, lora=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="scale: expected a finite number, got nan"):
        check_lora_file(tmp_path, scale=float("nan"))


# ---- the commands ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(pictures, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = {"example": folder / "example.png", "image": folder / "image.png", "mask": folder / "mask.png"}
    for picture, path in zip(pictures, paths.values()):
        picture.save(path)
    return paths


def _paint_args(inputs, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["paint", "--image", str(inputs["image"]), "--mask", str(inputs["mask"]), "--example",
            str(inputs["example"]), "-o", str(out), "--checkpoint", str(checkpoint), "--steps", "2", "--seed", "3",
            "--dtype", "fp32", "--device", "cpu", *extra]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_paint_with_lora_equals_paint_with_the_merged_checkpoint(hub, lora_path, inputs, tmp_path, capsys) -> None:
    merged = tmp_path / "merged.safetensors"
    assert main(["merge-lora", str(hub), str(lora_path), "-o", str(merged), "--scale", "0.7"]) == 0
    assert f"wrote {merged}" in capsys.readouterr().err

    assert main(_paint_args(inputs, tmp_path / "lora.png", hub, "--lora", str(lora_path), "--lora-scale", "0.7")) == 0
    err = capsys.readouterr().err
    repeat = shlex.split(err.split("to repeat this run: ")[1].splitlines()[0])
    assert repeat[repeat.index("--lora") + 1] == str(lora_path) and repeat[repeat.index("--lora-scale") + 1] == "0.7"
    assert main(_paint_args(inputs, tmp_path / "merged.png", merged)) == 0
    assert main(_paint_args(inputs, tmp_path / "base.png", hub)) == 0
    capsys.readouterr()
    with_lora, with_merged = _pixels(tmp_path / "lora.png"), _pixels(tmp_path / "merged.png")
    # Float rounding (the merged weight rounds once, the adapter adds two products) may move a pixel by one level.
    assert np.abs(with_lora - with_merged).max() <= 1
    assert np.abs(with_lora - _pixels(tmp_path / "base.png")).max() > 10

    # The same through the API, before the rounding to 8 bits.
    lora_pipe = PaintByExample.from_pretrained(hub, lora=lora_path, lora_scale=0.7)
    merged_pipe = PaintByExample.from_pretrained(merged)
    pictures = [Image.open(inputs[name]) for name in ("example", "image", "mask")]
    assert relative_error(_paint(lora_pipe, pictures), _paint(merged_pipe, pictures)) < 1e-5


def test_batch_takes_the_lora_options(hub, lora_path, inputs, tmp_path, capsys) -> None:
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({name: str(path) for name, path in inputs.items()}) + "\n")
    args = ["batch", str(manifest), "-o", str(tmp_path / "out"), "--checkpoint", str(hub), "--steps", "2",
            "--dtype", "fp32", "--device", "cpu", "--lora", str(lora_path), "--lora-scale", "0.7", "--seed", "3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"--lora {lora_path} --lora-scale 0.7" in err  # the repeat command
    assert main(_paint_args(inputs, tmp_path / "one.png", hub, "--lora", str(lora_path), "--lora-scale", "0.7")) == 0
    assert np.array_equal(_pixels(tmp_path / "out" / "image.png"), _pixels(tmp_path / "one.png"))


@pytest.mark.parametrize("extra, status, message", [
    (["--lora", "{tmp}/missing.safetensors"], 1, "--lora {tmp}/missing.safetensors: no such LoRA file"),
    (["--lora", "{hub}/unet/config.json"], 1, "not a readable safetensors file"),
    (["--lora-scale", "0.5"], 2, "--lora-scale only applies with --lora"),
    (["--lora", "{lora}", "--lora-scale", "inf"], 2, "--lora-scale: expected a finite number, got inf"),
])
def test_paint_refuses_bad_lora_options_before_loading(hub, lora_path, inputs, tmp_path, capsys, monkeypatch, extra,
                                                       status, message) -> None:
    monkeypatch.setattr(pbe.cli, "_load_pipeline", lambda args: pytest.fail("the model was loaded"))
    fill = {"tmp": tmp_path, "hub": hub, "lora": lora_path}
    extra = [e.format(**fill) for e in extra]
    assert main(_paint_args(inputs, tmp_path / "out.png", hub, *extra)) == status
    assert message.format(**fill) in capsys.readouterr().err


def test_merge_lora_refusals_leave_nothing_behind(hub, lora_path, networks, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"keep me")
    assert main(["merge-lora", str(hub), str(lora_path), "-o", str(out)]) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["merge-lora", str(hub), str(lora_path), "-o", str(lora_path), "--overwrite"]) == 2
    assert "would overwrite the input LORA" in capsys.readouterr().err
    assert main(["merge-lora", str(hub), str(tmp_path / "no.safetensors"), "-o", str(out)]) == 1
    assert "LORA " in capsys.readouterr().err
    assert main(["merge-lora", str(hub), str(lora_path), "-o", str(tmp_path / "merged.bin")]) == 2
    assert "expected a file name ending in .safetensors" in capsys.readouterr().err

    # A LoRA that does not fit the checkpoint is found once it loads: OUT is left as it was, no partial file.
    other = tmp_path / "other.safetensors"
    save_file({"down.5.attn.0.self_attn.to_q.lora_down.weight": torch.zeros(2, 8),
               "down.5.attn.0.self_attn.to_q.lora_up.weight": torch.zeros(8, 2)}, other,
              metadata={"format": "pbe-lora", "rank": "2", "alpha": "2.0", "targets": "to_q"})
    assert main(["merge-lora", str(hub), str(other), "-o", str(out), "--overwrite"]) == 1
    assert "does not fit this UNet" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "merged.safetensors", "other.safetensors"]

    assert main(["merge-lora", str(hub), str(lora_path), "-o", str(out), "--overwrite", "--dtype", "bf16"]) == 0
    merged = pbe.load(out)
    assert merged.unet.time_embed[0].weight.dtype == torch.float32  # pbe.load casts to float32 by default
    assert "bf16" in capsys.readouterr().err
