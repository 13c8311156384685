"""Each network, loaded through each checkpoint layout, reproduces diffusers' reference outputs.

References: tests/fixtures/reference.safetensors, written by scripts/make_reference_tensors.py with diffusers and
transformers (never pbe). float32 must agree to 1e-5 relative to the output's scale (in practice pbe is
bit-identical). bfloat16 keeps 8 significant bits: each op rounds by up to 2^-9 relative and dozens of layers
accumulate that, so bfloat16 must agree with the float32 reference to 2e-2 -- except where the REFERENCE ITSELF, run
in bfloat16 on the same inputs (the ``*_bf16`` fixtures), strays further on these tiny random networks: there pbe may
stray at most 1.25x as far as diffusers does (unet4 case b: diffusers' own bfloat16 error is 4.1e-2). float16 keeps
11 significant bits, three more than bfloat16, so its bound is 2^-3 of bfloat16's (2.5e-3), scaled the same way by
diffusers' own float16 error, computed live (the fixtures hold no float16 outputs).
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

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2.5e-3}


def _check(ours: torch.Tensor, reference: dict, key: str, dtype: torch.dtype, what: tuple,
           *, reference_float16: dict | None = None) -> None:
    """``ours`` within TOLERANCE[dtype] of the float32 reference, or within 1.25x the reference's own error in ``dtype``
    (bfloat16: the committed ``*_bf16`` fixtures; float16: ``reference_float16``, diffusers' outputs computed live)."""
    tol = TOLERANCE[dtype]
    if dtype == torch.bfloat16:
        tol = max(tol, 1.25 * relative_error(reference[f"{key}_bf16"], reference[key]))
    if dtype == torch.float16:
        tol = max(tol, 1.25 * relative_error(reference_float16[key], reference[key]))
    assert ours.dtype == dtype
    assert relative_error(ours, reference[key]) <= tol, (what, relative_error(ours, reference[key]), tol)


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

    cases = sorted({k.split(".")[1] for k in reference if k.startswith(f"{unet_name}.")})
    assert cases, unet_name
    for case in cases:
        r = lambda name: reference[f"{unet_name}.{case}.{name}"]  # noqa: E731
        timestep = r("timestep") if r("timestep").ndim else int(r("timestep"))
        out = nets.unet(r("sample").to(dtype), timestep, r("context").to(dtype))
        _check(out, reference, f"{unet_name}.{case}.out", dtype, (layout, case))
        if f"{unet_name}.{case}.shared_sample" in reference:
            # Guidance layout: given the sample once, pbe fans it out itself and must give diffusers' result.
            out = nets.unet(r("shared_sample").to(dtype), timestep, r("context").to(dtype))
            _check(out, reference, f"{unet_name}.{case}.out", dtype, (layout, case, "shared"))

    posterior = nets.vae.encode(reference[f"{vae_name}.x"].to(dtype))
    for name in ("mean", "logvar", "std"):
        _check(getattr(posterior, name), reference, f"{vae_name}.{name}", dtype, (layout, name))
    if dtype == torch.float32:  # the noise is drawn in the latent's dtype, so only float32 draws the reference's numbers
        sample = posterior.sample(torch.Generator().manual_seed(int(reference[f"{vae_name}.sample_seed"])))
        _check(sample, reference, f"{vae_name}.sample", dtype, layout)
    _check(nets.vae.decode(reference[f"{vae_name}.z"].to(dtype)), reference, f"{vae_name}.decoded", dtype, layout)

    out = nets.image_encoder(reference[f"{encoder_name}.pixel_values"].to(dtype))
    _check(out, reference, f"{encoder_name}.out", dtype, layout)
    assert relative_error(nets.image_encoder.uncond_embedding, reference[f"{encoder_name}.uncond"]) <= TOLERANCE[dtype]


@torch.no_grad()
def test_unet_shared_sample_gives_the_same_rows_as_a_repeated_one(reference) -> None:
    """The fan-out point moves nothing: each row equals the call with the sample repeated.

    Not bit for bit: oneDNN/MKL pick their blocking by batch size, so a batch-1 convolution may sum in another order
    than a batch-3 one (measured 1.1e-6 relative after the whole network); the bound is the float32 parity bound.
    """
    for src, name in ((HUB, "unet4"), (HUB_SMALL, "unet2")):  # first cross-attention at level 1 / after a downsample
        unet = pbe.load(src).unet
        sample, context = reference[f"{name}.g.shared_sample"], reference[f"{name}.g.context"]
        samples = torch.cat([sample, sample.flip(-1)])  # two samples ...
        contexts = torch.cat([context, context.flip(0), context])  # ... and k = 3 contexts each: rows [s0, s1] x 3
        shared = unet(samples, torch.tensor([5, 900]), contexts)
        repeated = unet(samples.repeat(3, 1, 1, 1), torch.tensor([5, 900]).repeat(3), contexts)
        assert shared.shape[0] == 6
        assert relative_error(shared, repeated) <= TOLERANCE[torch.float32], name


def test_unet_context_batch_must_be_a_multiple_of_the_sample_batch() -> None:
    unet = pbe.load(HUB_SMALL).unet
    context = torch.randn(3, 1, unet.config.context_dim)
    with pytest.raises(ValueError, match=r"context: expected shape \[k \* 2, tokens, 24\].*got \[3, 1, 24\]"):
        unet(torch.randn(2, 9, 8, 8), 5, context)


def _diffusers_float16_outputs(reference: dict) -> dict[str, torch.Tensor]:
    """diffusers' networks, loaded from the hub stand-in in float16 the way its users load them, on the reference
    inputs: the float16 yardstick, keyed like the reference outputs."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    half = lambda key: reference[key].to(torch.float16)  # noqa: E731
    unet = diffusers.UNet2DConditionModel.from_pretrained(HUB / "unet", torch_dtype=torch.float16)
    vae = diffusers.AutoencoderKL.from_pretrained(HUB / "vae", torch_dtype=torch.float16)
    encoder = PaintByExampleImageEncoder.from_pretrained(HUB / "image_encoder", torch_dtype=torch.float16)
    out = {}
    for case in sorted({k.split(".")[1] for k in reference if k.startswith("unet4.")}):
        k = f"unet4.{case}"
        timestep = reference[f"{k}.timestep"] if reference[f"{k}.timestep"].ndim else int(reference[f"{k}.timestep"])
        out[f"{k}.out"] = unet(half(f"{k}.sample"), timestep, encoder_hidden_states=half(f"{k}.context")).sample
    posterior = vae.encode(half("vae4.x")).latent_dist
    out |= {f"vae4.{name}": getattr(posterior, name) for name in ("mean", "logvar", "std")}
    out["vae4.decoded"] = vae.decode(half("vae4.z")).sample
    out["image_encoder.out"] = encoder(half("image_encoder.pixel_values"))
    return out


@torch.no_grad()
def test_float16_matches_reference(reference) -> None:
    """float16 (CPU kernels for half convolutions exist in torch >= 2.1) agrees with the float32 reference as closely
    as diffusers' own networks in float16 do."""
    reference_float16 = _diffusers_float16_outputs(reference)
    dtype = torch.float16
    nets = pbe.load(HUB, dtype=dtype)

    def check(ours: torch.Tensor, key: str, what: object) -> None:
        _check(ours, reference, key, dtype, what, reference_float16=reference_float16)

    cases = sorted({k.split(".")[1] for k in reference if k.startswith("unet4.")})
    for case in cases:
        r = lambda name: reference[f"unet4.{case}.{name}"]  # noqa: E731
        timestep = r("timestep") if r("timestep").ndim else int(r("timestep"))
        check(nets.unet(r("sample").to(dtype), timestep, r("context").to(dtype)), f"unet4.{case}.out", case)
        if f"unet4.{case}.shared_sample" in reference:
            check(nets.unet(r("shared_sample").to(dtype), timestep, r("context").to(dtype)), f"unet4.{case}.out",
                  (case, "shared"))
    posterior = nets.vae.encode(reference["vae4.x"].to(dtype))
    for name in ("mean", "logvar", "std"):
        check(getattr(posterior, name), f"vae4.{name}", name)
    check(nets.vae.decode(reference["vae4.z"].to(dtype)), "vae4.decoded", "decoded")
    check(nets.image_encoder(reference["image_encoder.pixel_values"].to(dtype)), "image_encoder.out", "encoder")


def test_parameters_are_frozen_and_in_eval_mode() -> None:
    nets = pbe.load(HUB_SMALL)
    for net in (nets.unet, nets.vae, nets.image_encoder):
        assert not net.training
        assert not any(p.requires_grad for p in net.parameters())
