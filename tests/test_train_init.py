"""pbe.train.init: the paper's initialisation from Stable Diffusion 1.x and CLIP, against diffusers and transformers.

The stand-ins are built as users build them: a diffusers SD UNet (the tiny hub UNet's config with 4 input channels)
and autoencoder saved with ``save_pretrained``, the same weights in the original single-file layout (written from the
shared LDM <-> diffusers table exactly as scripts/make_reference_tensors.py writes original/model.ckpt, plus text
encoder keys, DDPM buffers and an EMA copy), and a transformers CLIPVisionModel / CLIPModel with the tiny CLIP tower.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pbe.errors import CheckpointError
from pbe.train.init import networks_from_stable_diffusion
from weights_convert.convert import hub_folder_config
from weights_convert.init_sources import convert_clip_vision, convert_stable_diffusion

from conftest import FIXTURES, HUB, ORIGINAL_CKPT, load_script, relative_error

TOLERANCE = 1e-5  # float32, same CPU: conftest.ROUNDING_BOUND[torch.float32]
SD_SEED, CLIP_SEED = 41, 43  # weight seeds of the stand-ins (randomised: default init hides mapping bugs)


@pytest.fixture(scope="module")
def config():
    """The tiny Paint by Example structure the stand-ins fit (read from the hub stand-in's config.json files)."""
    return hub_folder_config(HUB)


@pytest.fixture(scope="module")
def sd_networks():
    """Stable Diffusion 1.x stand-ins: the tiny hub UNet's config with SD's 4 input channels, the tiny autoencoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    script = load_script("make_reference_tensors")
    unet = UNet2DConditionModel.from_config({**UNet2DConditionModel.load_config(HUB / "unet"), "in_channels": 4})
    script.randomise_(unet, SD_SEED)
    vae = AutoencoderKL.from_pretrained(HUB / "vae")
    return unet.eval(), vae.eval()


@pytest.fixture(scope="module")
def clip_vision():
    """A transformers CLIPVisionModel with the tiny CLIP tower of the hub stand-in's image encoder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig.from_pretrained(HUB / "image_encoder"))
    load_script("make_reference_tensors").randomise_(model, CLIP_SEED)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sd_networks, clip_vision) -> dict[str, Path]:
    """The stand-ins on disk, in every layout the initialisation reads."""
    from transformers import CLIPConfig, CLIPModel

    script = load_script("make_reference_tensors")
    root = tmp_path_factory.mktemp("init")
    unet, vae = sd_networks
    unet.save_pretrained(root / "sd" / "unet")  # safetensors
    vae.save_pretrained(root / "sd" / "vae", safe_serialization=False)  # pickled .bin, as older SD repos ship

    table = script.read_table(FIXTURES / "ldm_to_diffusers_unet_vae.tsv")
    original = script.original_unet_vae_state_dict(unet, vae, table)
    text = "cond_stage_model.transformer.text_model."
    original |= {f"{text}embeddings.token_embedding.weight": torch.randn(49, 8),
                 f"{text}embeddings.position_ids": torch.arange(7)[None],
                 f"{text}encoder.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
                 f"{text}final_layer_norm.weight": torch.ones(8)}
    original |= script.ddpm_buffers()
    # An EMA copy that differs from the weights (v1-5-pruned.ckpt holds both): the non-EMA ones must be taken.
    original |= {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 1 for k, v in original.items()
                 if k.startswith("model.diffusion_model.")}
    original |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5, dtype=torch.int32)}
    torch.save({"state_dict": original, "global_step": 470000}, root / "sd.ckpt")
    save_file({k: v.contiguous() for k, v in original.items()}, root / "sd.safetensors")

    clip_vision.save_pretrained(root / "clip_vision")
    tiny_text = {"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "vocab_size": 49, "max_position_embeddings": 7, "bos_token_id": 0, "eos_token_id": 1,
                 "pad_token_id": 1}
    clip_model = CLIPModel(CLIPConfig(text_config=tiny_text, vision_config=clip_vision.config.to_dict(),
                                      projection_dim=6))
    clip_model.vision_model.load_state_dict(clip_vision.state_dict())
    clip_model.save_pretrained(root / "clip_model")
    return {"sd_folder": root / "sd", "sd_ckpt": root / "sd.ckpt", "sd_safetensors": root / "sd.safetensors",
            "clip_vision": root / "clip_vision", "clip_model": root / "clip_model",
            "clip_vision_file": root / "clip_vision" / "model.safetensors", "root": root}


SD_LAYOUTS = ["sd_folder", "sd_ckpt", "sd_safetensors"]
CLIP_LAYOUTS = ["clip_vision", "clip_model", "clip_vision_file"]


@pytest.fixture(scope="module")
def initialised(checkpoints, config):
    """networks_from_stable_diffusion for every SD layout (CLIP as a CLIPVisionModel folder), computed once."""
    return {layout: networks_from_stable_diffusion(checkpoints[layout], checkpoints["clip_vision"], config=config)
            for layout in SD_LAYOUTS}


def _fingerprint(tensor: torch.Tensor) -> tuple[int, str]:
    """A tensor's values, whatever its name and shape (LDM keeps the autoencoder's attention as 1x1 convolutions)."""
    values = tensor.detach().float().contiguous().flatten()
    return values.numel(), hashlib.sha256(values.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("layout", SD_LAYOUTS)
def test_conv_in_takes_sd_weights_for_the_latent_and_zeros_for_the_new_channels(initialised, sd_networks,
                                                                                 layout) -> None:
    conv_in, sd_conv_in = initialised[layout].unet.conv_in, sd_networks[0].conv_in
    assert conv_in.weight.shape[1] == 9 and sd_conv_in.weight.shape[1] == 4
    assert torch.equal(conv_in.weight[:, :4], sd_conv_in.weight)
    assert torch.equal(conv_in.weight[:, 4:], torch.zeros_like(conv_in.weight[:, 4:]))
    assert torch.equal(conv_in.bias, sd_conv_in.bias)


@pytest.mark.parametrize("layout", SD_LAYOUTS)
def test_every_unet_and_autoencoder_tensor_is_sd_s_used_once(initialised, sd_networks, layout) -> None:
    # Compared by value, independently of any name mapping: each SD tensor appears exactly once in pbe's networks.
    nets = initialised[layout]
    ours = {**{f"unet.{k}": v for k, v in nets.unet.state_dict().items()},
            **{f"vae.{k}": v for k, v in nets.vae.state_dict().items()}}
    ours["unet.conv_in.weight"] = ours["unet.conv_in.weight"][:, :4]  # the SD part (the zeros are checked above)
    theirs = [*sd_networks[0].state_dict().values(), *sd_networks[1].state_dict().values()]
    assert Counter(map(_fingerprint, ours.values())) == Counter(map(_fingerprint, theirs))
    assert len(ours) == len(theirs)


@pytest.mark.parametrize("layout", SD_LAYOUTS)
def test_the_widened_unet_computes_sd_s_function_of_the_noisy_latent(initialised, sd_networks, layout) -> None:
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 9, 8, 8, generator=generator)
    sample[:, 4:] = 10 * torch.randn(2, 5, 8, 8, generator=generator)  # anything at all in the new channels
    context = torch.randn(2, 1, 24, generator=generator)
    timestep = torch.tensor([981, 21])
    with torch.no_grad():
        ours = initialised[layout].unet(sample, timestep, context)
        reference = sd_networks[0](sample[:, :4], timestep, encoder_hidden_states=context).sample
    assert relative_error(ours, reference) < TOLERANCE


def test_the_autoencoder_is_sd_s(initialised, sd_networks) -> None:
    x = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1
    vae = sd_networks[1]
    with torch.no_grad():
        reference_mean = vae.encode(x).latent_dist.mean
        reference_decoded = vae.decode(reference_mean).sample
        for nets in initialised.values():
            mean = nets.vae.encode(x).mean
            assert relative_error(mean, reference_mean) < TOLERANCE
            assert relative_error(nets.vae.decode(reference_mean), reference_decoded) < TOLERANCE


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_the_clip_tower_gives_transformers_pooler_output(checkpoints, config, clip_vision, layout) -> None:
    nets = networks_from_stable_diffusion(checkpoints["sd_folder"], checkpoints[layout], config=config)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = clip_vision(pixel_values=pixels).pooler_output
        assert relative_error(nets.image_encoder.clip(pixels), reference) < TOLERANCE


def test_mapper_norm_projection_and_uncond_token_are_fresh_and_depend_on_the_seed_only(checkpoints, config) -> None:
    def head(seed: int) -> dict[str, torch.Tensor]:
        nets = networks_from_stable_diffusion(checkpoints["sd_folder"], checkpoints["clip_model"], config=config,
                                              seed=seed)
        return {k: v for k, v in nets.image_encoder.state_dict().items() if not k.startswith("clip.")}

    first, again, other = head(23), head(23), head(24)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    def is_norm(key: str) -> bool:  # pbe's LayerNorms beyond CLIP: mapper.{i}.norm1 / norm2, final_norm
        return key.rpartition(".")[0].rpartition(".")[2] in ("norm1", "norm2", "final_norm")

    drawn = [k for k in first if not is_norm(k)]
    assert drawn and all(not torch.equal(first[k], other[k]) for k in drawn)
    # The paper's learnable_vector: torch.randn, here from the seed's generator.
    expected = torch.randn(1, 1, config.image_encoder.embed_dim, generator=torch.Generator().manual_seed(23))
    assert torch.equal(first["uncond_embedding"], expected)
    for key, value in first.items():
        if is_norm(key):  # 1 and 0, as nn.LayerNorm starts
            assert torch.equal(value, torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value))
        elif key != "uncond_embedding":  # nn.Linear's init: kaiming-uniform, a = sqrt(5): U(+-1/sqrt(fan_in))
            fan_in = first[key.replace(".bias", ".weight")].shape[1]
            bound = math.sqrt(2 / (1 + 5)) * math.sqrt(3 / fan_in)
            assert value.abs().max() <= bound and value.abs().max() > 0.5 * bound, key
    weights = torch.cat([v.flatten() for k, v in first.items() if k.startswith("mapper.") and k.endswith("fc1.weight")])
    bound = 1 / math.sqrt(config.image_encoder.clip.width)
    assert abs(weights.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)  # uniform, not normal


def test_networks_come_in_the_asked_dtype(checkpoints, config) -> None:
    nets = networks_from_stable_diffusion(checkpoints["sd_ckpt"], checkpoints["clip_vision"], config=config,
                                          dtype=torch.bfloat16)
    for network in (nets.unet, nets.vae, nets.image_encoder):
        assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
    assert nets.config == config


def test_the_sd_file_s_text_encoder_ema_copy_and_ddpm_buffers_are_skipped_on_purpose(checkpoints, config) -> None:
    converted = convert_stable_diffusion(checkpoints["sd_ckpt"], config=config)
    reasons = converted.ignored
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in reasons)
    assert "betas" in reasons and "model_ema.decay" in reasons and "model_ema.num_updates" in reasons
    assert "model_ema.diffusion_modelconv_inweight" not in reasons  # no such LitEma name: the names are exact
    assert "model_ema.diffusion_modelinput_blocks00weight" in reasons
    assert all(why for why in reasons.values())
    unet_and_vae = sum(len(sd) for sd in converted.state_dicts.values())
    assert unet_and_vae + len(reasons) == len(torch.load(checkpoints["sd_ckpt"], weights_only=True)["state_dict"])


def test_the_clip_text_tower_and_projections_are_skipped_on_purpose(checkpoints, config) -> None:
    converted = convert_clip_vision(checkpoints["clip_model"], config=config)
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= converted.ignored.keys()
    assert any(k.startswith("text_model.") for k in converted.ignored)
    assert all(k.startswith("clip.") for k in converted.state_dicts["image_encoder"])


# ---- refusals --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [ORIGINAL_CKPT, HUB], ids=["original", "hub"])
def test_a_paint_by_example_checkpoint_given_as_sd_is_named(checkpoints, config, source) -> None:
    with pytest.raises(CheckpointError, match=r"sd_checkpoint .*UNet takes 9 input channels: a Paint by Example "
                                              r"checkpoint, not Stable Diffusion 1\.x"):
        networks_from_stable_diffusion(source, checkpoints["clip_vision"], config=config)


def test_a_file_without_unet_keys_is_refused(checkpoints, config, tmp_path) -> None:
    only_vae = {k: v for k, v in torch.load(checkpoints["sd_ckpt"], weights_only=True)["state_dict"].items()
                if k.startswith("first_stage_model.")}
    save_file(only_vae, tmp_path / "vae_only.safetensors")
    with pytest.raises(CheckpointError, match=r"sd_checkpoint .*vae_only\.safetensors: no Stable Diffusion UNet"):
        networks_from_stable_diffusion(tmp_path / "vae_only.safetensors", checkpoints["clip_vision"], config=config)


def test_an_unexpected_tensor_in_the_sd_file_is_refused(checkpoints, config, tmp_path) -> None:
    state = torch.load(checkpoints["sd_ckpt"], weights_only=True)["state_dict"]
    save_file({**state, "model_ema.something_else": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys .*model_ema\.something_else"):
        networks_from_stable_diffusion(tmp_path / "extra.safetensors", checkpoints["clip_vision"], config=config)


def test_sd_networks_of_another_structure_than_the_config_are_refused(checkpoints, config) -> None:
    wider = dataclasses.replace(config, unet=dataclasses.replace(config.unet, channels=(16, 16, 32, 32)))
    with pytest.raises(CheckpointError, match=r"sd_checkpoint .*unet\.channels \(8, 16, 32, 32\) \(config "
                                              r"\(16, 16, 32, 32\)\)"):
        networks_from_stable_diffusion(checkpoints["sd_folder"], checkpoints["clip_vision"], config=wider)
    with pytest.raises(CheckpointError, match=r"sd_checkpoint .*sd\.ckpt: unexpected keys .*skip_connection.*"
                                              r"checked against the config's unet"):
        networks_from_stable_diffusion(checkpoints["sd_ckpt"], checkpoints["clip_vision"], config=wider)


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_a_clip_tower_of_another_size_is_named(checkpoints, config, tmp_path, as_file) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    small = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=20, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=32, patch_size=4))
    small.save_pretrained(tmp_path / "small")
    source = tmp_path / "small" / "model.safetensors" if as_file else tmp_path / "small"
    with pytest.raises(CheckpointError, match=r"clip_checkpoint .*a CLIP vision tower of another size than the "
                                              r"config's \(width 16 \(config 32\); layers 3 \(config 9\); mlp_dim 20 "
                                              r"\(config 37\)\)"):
        networks_from_stable_diffusion(checkpoints["sd_folder"], source, config=config)


def test_the_official_config_names_vit_l_14(checkpoints) -> None:
    with pytest.raises(CheckpointError, match=r"width 32 \(config 1024\).*Paint by Example uses CLIP ViT-L/14"):
        networks_from_stable_diffusion(checkpoints["sd_folder"], checkpoints["clip_vision"])


@pytest.mark.parametrize("argument", ["sd_checkpoint", "clip_checkpoint"])
def test_a_missing_path_is_named_before_anything_is_read(checkpoints, config, argument, tmp_path,
                                                          monkeypatch) -> None:
    paths = {"sd_checkpoint": checkpoints["sd_folder"], "clip_checkpoint": checkpoints["clip_vision"]}
    paths[argument] = tmp_path / "nope"

    def no_reading(path: Path) -> None:
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr("weights_convert.init_sources.read_tensors", no_reading)
    with pytest.raises(CheckpointError, match=rf"{argument} .*nope: no such file or folder"):
        networks_from_stable_diffusion(paths["sd_checkpoint"], paths["clip_checkpoint"], config=config)


# ---- the official sizes, on the meta device (shapes only: no memory, no weights) -----------------------------------------

def _meta(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def test_an_official_size_sd_1_x_file_maps_completely(monkeypatch, tmp_path) -> None:
    import json

    from pbe.model import PaintByExampleConfig

    # v1-5-pruned.ckpt's UNet/VAE names and shapes: the shared table's (conv_in takes the latent alone in SD), its
    # EMA copy, text encoder and DDPM buffers.
    rows = [line.split("\t") for line in (FIXTURES / "ldm_to_diffusers_unet_vae.tsv").read_text().splitlines()
            if not line.startswith("#")]
    shapes = {original: json.loads(shape) for _, original, shape in rows}
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = [320, 4, 3, 3]
    unet_keys = [k for k in shapes if k.startswith("model.diffusion_model.")]
    shapes |= {"model_ema." + k.removeprefix("model.").replace(".", ""): shapes[k] for k in unet_keys}
    shapes |= {"model_ema.decay": [], "model_ema.num_updates": [], "betas": [1000], "alphas_cumprod": [1000],
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768]}
    (tmp_path / "v1-5-pruned.ckpt").touch()
    monkeypatch.setattr("weights_convert.init_sources.read_tensors", lambda path: _meta(shapes))
    converted = convert_stable_diffusion(tmp_path / "v1-5-pruned.ckpt", config=PaintByExampleConfig())
    assert len(converted.state_dicts["unet"]) == 686 and len(converted.state_dicts["vae"]) == 248
    assert converted.state_dicts["unet"]["conv_in.weight"].shape == (320, 4, 3, 3)
    assert len(converted.ignored) == len(unet_keys) + 5


def test_openai_clip_vit_large_patch14_maps_completely(monkeypatch, tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    from pbe.model import PaintByExampleConfig

    # openai/clip-vit-large-patch14: a CLIPModel with the ViT-L/14 vision tower (and a 12-layer text tower).
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "patch_size": 14, "image_size": 224, "projection_dim": 768}
    clip_config = CLIPConfig(vision_config=vision, projection_dim=768)
    with torch.device("meta"):
        model = CLIPModel(clip_config)
    clip_config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()
    monkeypatch.setattr("weights_convert.init_sources.read_tensors",
                        lambda path: _meta({k: list(v.shape) for k, v in model.state_dict().items()}))
    converted = convert_clip_vision(tmp_path, config=PaintByExampleConfig())
    # class and position embeddings, patch conv, two LayerNorms; 16 tensors per layer.
    assert len(converted.state_dicts["image_encoder"]) == 3 + 2 * 2 + 24 * 16
    assert len(converted.ignored) == sum(not k.startswith("vision_model.") for k in model.state_dict())
    assert converted.state_dicts["image_encoder"]["clip.patch_embed.weight"].shape == (1024, 3, 14, 14)
