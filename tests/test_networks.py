"""Each network, loaded through each checkpoint layout, reproduces diffusers' reference outputs.

References: tests/fixtures/reference.safetensors, written by scripts/make_reference_tensors.py with diffusers and
transformers (never pbe). float32 must agree to 1e-5 relative to the output's scale; bfloat16 (8 significant bits,
relative rounding 2^-9 per op, accumulated over dozens of layers) to 2e-2.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

import pbe
from pbe.checkpoint import save_native
from weights_convert.convert import convert

from conftest import HUB, HUB_SMALL, ORIGINAL_CKPT, ldm_base_config, relative_error

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _bin_to_safetensors(folder, names):
    for sub, bin_name, st_name in names:
        tensors = torch.load(folder / sub / bin_name, weights_only=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / sub / st_name)
        (folder / sub / bin_name).unlink()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, original_safetensors) -> dict[str, tuple]:
    """Every way the tiny stand-in can reach pbe.load: (source, which reference networks, load kwargs)."""
    tmp = tmp_path_factory.mktemp("layouts")
    # The hub repo's optional safetensors variant (same names, .safetensors files).
    hub_st = tmp / "hub_safetensors"
    shutil.copytree(HUB, hub_st)
    _bin_to_safetensors(hub_st, [("unet", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
                                 ("vae", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
                                 ("image_encoder", "pytorch_model.bin", "model.safetensors")])
    # transformers 5 writes the image encoder's CLIP keys without `vision_model.` (and no position_ids buffer).
    hub_t5 = tmp / "hub_transformers5"
    shutil.copytree(HUB, hub_t5)
    path = hub_t5 / "image_encoder" / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state = {k.replace("model.vision_model.", "model.", 1): v for k, v in state.items() if not k.endswith("position_ids")}
    torch.save(state, path)
    # pbe's native file, written by the converter from the hub folder.
    native = tmp / "native.safetensors"
    converted = convert(HUB)
    save_native(converted.state_dicts, converted.config, native)
    four = ("unet4", "vae4", "image_encoder")
    return {
        "hub": (HUB, four, {}),
        "hub_small": (HUB_SMALL, ("unet2", "vae2", "image_encoder1"), {}),
        "hub_safetensors": (hub_st, four, {}),
        "hub_transformers5": (hub_t5, four, {}),
        "original_ckpt": (ORIGINAL_CKPT, four, {"config": ldm_base_config()}),
        "original_safetensors": (original_safetensors, four, {"config": ldm_base_config()}),
        "native": (native, four, {}),
    }


LAYOUTS = ["hub", "hub_small", "hub_safetensors", "hub_transformers5", "original_ckpt", "original_safetensors", "native"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_networks_match_reference(layouts, reference, layout: str, dtype: torch.dtype) -> None:
    src, (unet_name, vae_name, encoder_name), kwargs = layouts[layout]
    nets = pbe.load(src, dtype=dtype, **kwargs)
    tol = TOLERANCE[dtype]

    cases = sorted({k.split(".")[1] for k in reference if k.startswith(f"{unet_name}.")})
    assert cases, unet_name
    for case in cases:
        r = lambda name: reference[f"{unet_name}.{case}.{name}"]  # noqa: E731
        timestep = r("timestep") if r("timestep").ndim else int(r("timestep"))
        out = nets.unet(r("sample").to(dtype), timestep, r("context").to(dtype))
        assert out.dtype == dtype
        assert relative_error(out, r("out")) <= tol, (layout, case)

    r = lambda name: reference[f"{vae_name}.{name}"]  # noqa: E731
    posterior = nets.vae.encode(r("x").to(dtype))
    for name in ("mean", "logvar", "std"):
        assert relative_error(getattr(posterior, name), r(name)) <= tol, (layout, name)
    if dtype == torch.float32:  # the noise is drawn in the latent's dtype, so only float32 draws the reference's numbers
        sample = posterior.sample(torch.Generator().manual_seed(int(r("sample_seed"))))
        assert relative_error(sample, r("sample")) <= tol, layout
    decoded = nets.vae.decode(r("z").to(dtype))
    assert decoded.dtype == dtype
    assert relative_error(decoded, r("decoded")) <= tol, layout

    r = lambda name: reference[f"{encoder_name}.{name}"]  # noqa: E731
    assert relative_error(nets.image_encoder(r("pixel_values").to(dtype)), r("out")) <= tol, layout
    assert relative_error(nets.image_encoder.uncond_embedding, r("uncond")) <= tol, layout


@torch.no_grad()
def test_float16_runs_where_supported() -> None:
    """float16 runs without dtype errors (CPU kernels for half convolutions exist in torch >= 2.1)."""
    nets = pbe.load(HUB_SMALL, dtype=torch.float16)
    sample = torch.randn(1, 9, 8, 8, dtype=torch.float16)
    context = torch.randn(1, 1, nets.config.unet.context_dim, dtype=torch.float16)
    assert nets.unet(sample, 10, context).dtype == torch.float16
    latent = nets.vae.encode(torch.rand(1, 3, 16, 16, dtype=torch.float16) * 2 - 1).sample()
    assert nets.vae.decode(latent).dtype == torch.float16
    size = nets.config.image_encoder.clip.image_size
    assert nets.image_encoder(torch.randn(1, 3, size, size, dtype=torch.float16)).dtype == torch.float16


def test_parameters_are_frozen_and_in_eval_mode() -> None:
    nets = pbe.load(HUB_SMALL)
    for net in (nets.unet, nets.vae, nets.image_encoder):
        assert not net.training
        assert not any(p.requires_grad for p in net.parameters())
