"""Each network, loaded through each checkpoint layout, reproduces diffusers' reference outputs.

References: tests/fixtures/reference.safetensors, written by scripts/make_reference_tensors.py with diffusers and
transformers (never pbe). float32 must agree to 1e-5 relative to the output's scale (in practice pbe is
bit-identical). bfloat16 keeps 8 significant bits: each op rounds by up to 2^-9 relative and dozens of layers
accumulate that, so bfloat16 must agree with the float32 reference to 2e-2 -- except where the REFERENCE ITSELF, run
in bfloat16 on the same inputs (the ``*_bf16`` fixtures), strays further on these tiny random networks: there pbe may
stray at most 1.25x as far as diffusers does (unet4 case b: diffusers' own bfloat16 error is 4.1e-2). float16 keeps
11 significant bits, three more than bfloat16, so its bound is 2^-3 of bfloat16's (2.5e-3), scaled the same way by
diffusers' own float16 error, computed live (the fixtures hold no float16 outputs).

On another device (PBE_TEST_DEVICE, tests/conftest.py) every dtype is measured the float16 way: diffusers' networks
run live there in that dtype set the yardstick, and float32's floor is conftest.CROSS_DEVICE_FLOAT32 (the references
were made on a CPU). On the CPU the bounds are the ones above.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save_file

import pbe
from pbe.checkpoint import save_native
from weights_convert.convert import convert

from conftest import (
    HUB,
    HUB_SMALL,
    ORIGINAL_CKPT,
    REFERENCE_MARGIN,
    ROUNDING_BOUND,
    CommittedReference,
    ldm_base_config,
    relative_error,
    rounding_bound,
)

FOUR, SMALL = ("unet4", "vae4", "image_encoder"), ("unet2", "vae2", "image_encoder1")  # reference networks by folder
FOLDERS = {FOUR: HUB, SMALL: HUB_SMALL}


def _check(ours: torch.Tensor, reference: CommittedReference, key: str, dtype: torch.dtype, what: object, *,
           device: torch.device, yardstick: dict | None = None, margin: float = REFERENCE_MARGIN) -> None:
    """``ours`` on ``device`` within ``rounding_bound`` of the float32 reference, or within ``margin`` times the
    reference's own error in ``dtype`` (``yardstick``: diffusers' outputs computed live in ``dtype`` on ``device``;
    else for bfloat16 the committed ``*_bf16`` fixtures)."""
    stick = yardstick[key] if yardstick is not None else f"{key}_bf16" if dtype == torch.bfloat16 else None
    assert ours.dtype == dtype and ours.device.type == device.type
    reference.assert_close(key, ours, bound=rounding_bound(dtype, device=device), yardstick=stick, margin=margin,
                           what=what)


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
    four = FOUR
    return {
        "hub": (HUB, four, {}),
        "hub_small": (HUB_SMALL, SMALL, {}),
        "hub_safetensors": (hub_st, four, {}),
        "hub_transformers5": (hub_t5, four, {}),
        "original_ckpt": (ORIGINAL_CKPT, four, {"config": ldm_base_config()}),
        "original_safetensors": (original_safetensors, four, {"config": ldm_base_config()}),
        "native": (native, four, {}),
    }


LAYOUTS = ["hub", "hub_small", "hub_safetensors", "hub_transformers5", "original_ckpt", "original_safetensors", "native"]


@pytest.fixture(scope="module")
def yardsticks(reference, device) -> Callable[[tuple, torch.dtype], dict | None]:
    """``yardsticks(names, dtype)``: diffusers' outputs for the networks ``names`` in ``dtype`` on the test device,
    computed once; None where the committed fixtures are the yardstick (the CPU, float32 and bfloat16)."""
    computed: dict[tuple, dict] = {}

    def get(names: tuple, dtype: torch.dtype) -> dict | None:
        if device.type == "cpu" and dtype != torch.float16:
            return None
        if (names, dtype) not in computed:
            computed[names, dtype] = _diffusers_outputs(reference, names, dtype=dtype, device=device)
        return computed[names, dtype]

    return get


def _timestep(value: torch.Tensor, device: torch.device) -> torch.Tensor | int:
    return value.to(device) if value.ndim else int(value)


def _sample_generator(reference: CommittedReference, vae_name: str) -> torch.Generator:
    """A CPU generator on every device: pbe draws where the generator is, as diffusers does, so seeds match."""
    return torch.Generator().manual_seed(int(reference[f"{vae_name}.sample_seed"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_networks_match_reference(layouts, reference, yardsticks, device, layout: str, dtype: torch.dtype) -> None:
    src, names, kwargs = layouts[layout]
    unet_name, vae_name, encoder_name = names
    nets = pbe.load(src, dtype=dtype, device=device, **kwargs)
    yardstick = yardsticks(names, dtype)
    at = lambda key: reference[key].to(device, dtype)  # noqa: E731

    def check(ours: torch.Tensor, key: str, what: object) -> None:
        _check(ours, reference, key, dtype, (layout, what), device=device, yardstick=yardstick)

    cases = sorted({k.split(".")[1] for k in reference.keys() if k.startswith(f"{unet_name}.")})
    assert cases, unet_name
    for case in cases:
        k = f"{unet_name}.{case}"
        timestep = _timestep(reference[f"{k}.timestep"], device)
        check(nets.unet(at(f"{k}.sample"), timestep, at(f"{k}.context")), f"{k}.out", case)
        if f"{k}.shared_sample" in reference:
            # Guidance layout: given the sample once, pbe fans it out itself and must give diffusers' result.
            check(nets.unet(at(f"{k}.shared_sample"), timestep, at(f"{k}.context")), f"{k}.out", (case, "shared"))

    posterior = nets.vae.encode(at(f"{vae_name}.x"))
    for name in ("mean", "logvar", "std"):
        check(getattr(posterior, name), f"{vae_name}.{name}", name)
    if dtype == torch.float32:  # the noise is drawn in the latent's dtype, so only float32 draws the reference's numbers
        check(posterior.sample(_sample_generator(reference, vae_name)), f"{vae_name}.sample", "sample")
    check(nets.vae.decode(at(f"{vae_name}.z")), f"{vae_name}.decoded", "decoded")

    check(nets.image_encoder(at(f"{encoder_name}.pixel_values")), f"{encoder_name}.out", "encoder")
    # a stored parameter, only cast: the dtype's rounding on every device
    uncond = nets.image_encoder.uncond_embedding
    reference.assert_close(f"{encoder_name}.uncond", uncond, bound=ROUNDING_BOUND[dtype], what=layout)


@torch.no_grad()
def test_unet_shared_sample_gives_the_same_rows_as_a_repeated_one(reference, device) -> None:
    """The fan-out point moves nothing: each row equals the call with the sample repeated.

    Not bit for bit: oneDNN/MKL pick their blocking by batch size, so a batch-1 convolution may sum in another order
    than a batch-3 one (measured 1.1e-6 relative after the whole network); the bound is the float32 parity bound.
    """
    for src, name in ((HUB, "unet4"), (HUB_SMALL, "unet2")):  # first cross-attention at level 1 / after a downsample
        unet = pbe.load(src, device=device).unet
        sample, context = reference[f"{name}.g.shared_sample"].to(device), reference[f"{name}.g.context"].to(device)
        samples = torch.cat([sample, sample.flip(-1)])  # two samples ...
        contexts = torch.cat([context, context.flip(0), context])  # ... and k = 3 contexts each: rows [s0, s1] x 3
        timesteps = torch.tensor([5, 900], device=device)
        shared = unet(samples, timesteps, contexts)
        repeated = unet(samples.repeat(3, 1, 1, 1), timesteps.repeat(3), contexts)
        assert shared.shape[0] == 6
        assert relative_error(shared, repeated) <= rounding_bound(torch.float32, device=device), name


def test_unet_context_batch_must_be_a_multiple_of_the_sample_batch() -> None:
    unet = pbe.load(HUB_SMALL).unet
    context = torch.randn(3, 1, unet.config.context_dim)
    with pytest.raises(ValueError, match=r"context: expected shape \[k \* 2, tokens, 24\].*got \[3, 1, 24\]"):
        unet(torch.randn(2, 9, 8, 8), 5, context)


def _diffusers_outputs(reference: CommittedReference, names: tuple, *, dtype: torch.dtype, device: torch.device
                       ) -> dict[str, torch.Tensor]:
    """diffusers' networks ``names``, loaded from their hub stand-in in ``dtype`` and moved to ``device`` the way its
    users do, on the reference inputs: the yardstick, keyed like the reference outputs."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    unet_name, vae_name, encoder_name = names
    folder = FOLDERS[names]
    at = lambda key: reference[key].to(device, dtype)  # noqa: E731
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).to(device)
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).to(device)
    encoder = PaintByExampleImageEncoder.from_pretrained(folder / "image_encoder", torch_dtype=dtype).to(device)
    out = {}
    for case in sorted({k.split(".")[1] for k in reference.keys() if k.startswith(f"{unet_name}.")}):
        k = f"{unet_name}.{case}"
        timestep = _timestep(reference[f"{k}.timestep"], device)
        out[f"{k}.out"] = unet(at(f"{k}.sample"), timestep, encoder_hidden_states=at(f"{k}.context")).sample
    posterior = vae.encode(at(f"{vae_name}.x")).latent_dist
    out |= {f"{vae_name}.{name}": getattr(posterior, name) for name in ("mean", "logvar", "std")}
    out[f"{vae_name}.sample"] = posterior.sample(_sample_generator(reference, vae_name))
    out[f"{vae_name}.decoded"] = vae.decode(at(f"{vae_name}.z")).sample
    out[f"{encoder_name}.out"] = encoder(at(f"{encoder_name}.pixel_values"))
    return out


# float16 carries 11 significant bits, so where the two libraries round at different points their errors against
# float32 are of the same size but not the same values: pbe's autoencoder runs channels-last in reduced precision
# (oneDNN's blocked kernels), diffusers' contiguous, and pbe's CPU norms round once from float32 statistics. Measured
# pbe error / diffusers' error over every checked output: 0.87 to 1.44 on an Intel Xeon with AMX, up to 1.28 with
# the kernels capped at AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2). A wrong weight, layout or op moves
# these outputs by 1e-1 or more, far beyond 2x diffusers' own ~2e-3.
FLOAT16_MARGIN = 2.0


@torch.no_grad()
def test_float16_matches_reference(reference, yardsticks, device) -> None:
    """float16 (CPU kernels for half convolutions exist in torch >= 2.1) agrees with the float32 reference about as
    closely as diffusers' own networks in float16 on the same device do (within FLOAT16_MARGIN of their error)."""
    dtype = torch.float16
    yardstick = yardsticks(FOUR, dtype)
    nets = pbe.load(HUB, dtype=dtype, device=device)
    at = lambda key: reference[key].to(device, dtype)  # noqa: E731

    def check(ours: torch.Tensor, key: str, what: object) -> None:
        _check(ours, reference, key, dtype, what, device=device, yardstick=yardstick, margin=FLOAT16_MARGIN)

    for case in sorted({k.split(".")[1] for k in reference.keys() if k.startswith("unet4.")}):
        k = f"unet4.{case}"
        timestep = _timestep(reference[f"{k}.timestep"], device)
        check(nets.unet(at(f"{k}.sample"), timestep, at(f"{k}.context")), f"{k}.out", case)
        if f"{k}.shared_sample" in reference:
            check(nets.unet(at(f"{k}.shared_sample"), timestep, at(f"{k}.context")), f"{k}.out", (case, "shared"))
    posterior = nets.vae.encode(at("vae4.x"))
    for name in ("mean", "logvar", "std"):
        check(getattr(posterior, name), f"vae4.{name}", name)
    check(nets.vae.decode(at("vae4.z")), "vae4.decoded", "decoded")
    check(nets.image_encoder(at("image_encoder.pixel_values")), "image_encoder.out", "encoder")


def test_parameters_are_frozen_and_in_eval_mode() -> None:
    nets = pbe.load(HUB_SMALL)
    for net in (nets.unet, nets.vae, nets.image_encoder):
        assert not net.training
        assert not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autoencoder_keeps_one_memory_layout_throughout(dtype: torch.dtype) -> None:
    """float32 runs in diffusers' contiguous layout everywhere (so its conv kernels and bits), reduced precision
    channels-last everywhere (oneDNN's fast layout). A single layer that hands on the other layout (an attention output
    whose strides read as channels-last) switches every later convolution's kernel: 1.7e-5 off diffusers at 512x512."""
    vae = pbe.load(HUB, dtype=dtype).vae
    layout = torch.contiguous_format if dtype == torch.float32 else torch.channels_last
    wrong: list[str] = []

    def check(name: str) -> Callable:
        def hook(module, inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[1:]) > 1:
                if not output.is_contiguous(memory_format=layout):
                    wrong.append(f"{name}: strides {output.stride()}")
        return hook

    for name, module in vae.named_modules():
        if name:
            module.register_forward_hook(check(name))
    with torch.no_grad():
        vae.decode(torch.randn(1, vae.config.latent_channels, 8, 8, dtype=dtype))
        vae.encode(torch.randn(1, 3, 64, 64, dtype=dtype))
    assert not wrong, wrong
