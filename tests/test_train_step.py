"""One training step equals the same step written with diffusers' modules: loss and every gradient, fp32.

The reference is built as diffusers users build it: UNet2DConditionModel, AutoencoderKL and
PaintByExampleImageEncoder ``from_pretrained`` the tiny hub stand-in, the noise schedule from
``DDPMScheduler.from_config`` of the hub's scheduler config and its ``add_noise``. Both sides are fed the same batch
and the same draws (``pbe.train.step.draw``); parameters are paired through the converter's checked tables.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import pbe
from pbe.train import step
from tests.conftest import HUB, relative_error
from weights_convert.mapping import build_keymap
from weights_convert.tables import RULES

BATCH, RESOLUTION = 2, 64  # the stand-in autoencoder has 4 levels: 64 px -> 8x8 latents


def _batch(generator: torch.Generator, reference_size: int) -> dict[str, torch.Tensor]:
    keep_mask = torch.ones(BATCH, 1, RESOLUTION, RESOLUTION)
    keep_mask[0, :, 8:40, 12:52] = 0  # a box to repaint
    keep_mask[1, :, 20:61, 3:30] = 0
    return {"image": torch.rand(BATCH, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1,
            "keep_mask": keep_mask,
            "reference": torch.randn(BATCH, 3, reference_size, reference_size, generator=generator)}


def _reference_modules():  # noqa: ANN202 (diffusers is imported lazily)
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    unet = UNet2DConditionModel.from_pretrained(HUB / "unet")
    vae = AutoencoderKL.from_pretrained(HUB / "vae").requires_grad_(False)
    encoder = PaintByExampleImageEncoder.from_pretrained(HUB / "image_encoder")
    encoder.model.requires_grad_(False)  # the CLIP tower is frozen; mapper, norm, projection and uncond train
    scheduler = DDPMScheduler.from_config(PNDMScheduler.from_pretrained(HUB, subfolder="scheduler").config)
    return unet, vae, encoder, scheduler


def _reference_loss(modules, batch: dict[str, torch.Tensor], draws: step.Draws) -> torch.Tensor:  # noqa: ANN001
    """The paper's training step written with diffusers' modules (ldm/models/diffusion/ddpm.py's semantics)."""
    unet, vae, encoder, scheduler = modules
    scale = vae.config.scaling_factor
    with torch.no_grad():
        posterior = vae.encode(batch["image"]).latent_dist
        z0 = (posterior.mean + posterior.std * draws.image_noise) * scale
        posterior = vae.encode(batch["image"] * batch["keep_mask"]).latent_dist
        z_masked = (posterior.mean + posterior.std * draws.masked_noise) * scale
    # torchvision 0.12's Resize([h, w]) on a tensor: bilinear, half-pixel centres, no antialiasing.
    latent_mask = F.interpolate(batch["keep_mask"], size=z0.shape[-2:], mode="bilinear", align_corners=False)
    context, uncond = encoder(batch["reference"], return_uncond_vector=True)
    if draws.drop:
        context = uncond.repeat(context.shape[0], 1, 1)  # ddpm.py: self.learnable_vector.repeat(x.shape[0], 1, 1)
    x_t = scheduler.add_noise(z0, draws.noise, draws.timesteps)
    eps = unet(torch.cat([x_t, z_masked, latent_mask], dim=1), draws.timesteps, encoder_hidden_states=context).sample
    return F.mse_loss(eps, draws.noise)


def _pairs(networks: pbe.PaintByExampleNetworks, modules) -> dict[str, str]:  # noqa: ANN001
    """pbe's parameter name (``unet.*``, ``image_encoder.*``) -> diffusers' (same prefixes), through the checked
    converter tables (every parameter on both sides paired exactly once)."""
    pairs = {}
    for name, theirs in [("unet", modules[0]), ("image_encoder", modules[2])]:
        ours = {k: p.shape for k, p in getattr(networks, name).named_parameters()}
        source = {k: p.shape for k, p in theirs.named_parameters()}
        rules = RULES["diffusers"][name](getattr(networks.config, name))
        keymap = build_keymap(rules, ours, source, {}, origin=f"diffusers {name}")
        pairs.update({f"{name}.{k}": f"{name}.{src}" for k, (src, _) in keymap.pairs.items()})
    return pairs


@pytest.fixture(scope="module")
def both():  # noqa: ANN201
    torch.manual_seed(0)
    networks = pbe.load(HUB)
    trained = [p for _, p in step.trained_parameters(networks)]
    step.freeze_for_training(networks, trained)
    return networks, _reference_modules()


@pytest.mark.parametrize("drop", [False, True], ids=["conditioned", "uncond-dropout"])
def test_one_step_equals_the_diffusers_reference(both, drop: bool) -> None:  # noqa: ANN001
    networks, modules = both
    generator = torch.Generator().manual_seed(7)
    batch = _batch(generator, networks.config.image_encoder.clip.image_size)
    draws = step.draw(BATCH, generator, latent_shape=(4, RESOLUTION // 8, RESOLUTION // 8), uncond_prob=0.2)
    draws = dataclasses.replace(draws, drop=drop, timesteps=torch.tensor([17, 903]))

    for module in (networks.unet, networks.image_encoder, modules[0], modules[2]):
        module.zero_grad(set_to_none=True)
    ours = step.loss(networks, batch, draws)
    ours.backward()
    theirs = _reference_loss(modules, batch, draws)
    theirs.backward()
    assert relative_error(ours, theirs) <= 1e-5, (ours.item(), theirs.item())

    their_params = {f"unet.{k}": p for k, p in modules[0].named_parameters()}
    their_params |= {f"image_encoder.{k}": p for k, p in modules[2].named_parameters()}
    our_params = dict(step.trained_parameters(networks))
    pairs = _pairs(networks, modules)
    # "Relative" is to the scale of the gradient, its largest entry over all parameters: several tensors' gradients
    # are zero in exact arithmetic (a per-channel bias before a one-channel-per-group GroupNorm, attention over one
    # token) and only rounding is left of them on either side, and small bias gradients are sums of thousands of
    # terms. Measured: 2.0e-6 at most (4e-8 for exact-zero ones); the mistakes tried (a nearest-resized mask, t + 1,
    # an unscaled masked latent, the dropout ignored) move the loss or a gradient by 5e-5 to 4e-2.
    scale = max(p.grad.abs().max().item() for p in their_params.values() if p.grad is not None)
    checked = 0
    for ours_name, theirs_name in pairs.items():
        theirs_grad = their_params[theirs_name].grad
        if ours_name not in our_params:  # frozen in pbe: the CLIP tower, and the no-gradient cross-attention parts
            if ours_name.startswith("image_encoder.clip."):
                assert theirs_grad is None
            else:  # softmax over one key is 1: diffusers' gradient there is zero up to rounding
                assert any(part in f".{ours_name}" for part in step.NO_GRADIENT)
                assert theirs_grad.abs().max().item() <= 1e-6 * scale, ours_name
            continue
        our_grad = our_params[ours_name].grad
        assert our_grad is not None, f"{ours_name} received no gradient"
        their_grad = torch.zeros_like(our_grad) if theirs_grad is None else theirs_grad
        error = (our_grad - their_grad).abs().max().item()
        assert error <= 1e-5 * scale, (ours_name, error / scale)
        checked += 1
    assert checked == len(our_params)  # every trained parameter of pbe was compared


def test_the_draws_split_into_rows_as_one_batch() -> None:
    """Micro-batches and processes take rows of one batch's draws: the same numbers as the whole batch's."""
    draws = step.draw(4, torch.Generator().manual_seed(3), latent_shape=(4, 2, 2), uncond_prob=0.5)
    halves = [draws.rows(0, 2), draws.rows(2, 4)]
    for name in ("timesteps", "image_noise", "masked_noise", "noise"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(draws, name))
    assert all(h.drop == draws.drop for h in halves)


def test_the_dropout_is_drawn_once_per_batch_with_its_probability() -> None:
    generator = torch.Generator().manual_seed(0)
    drops = [step.draw(3, generator, latent_shape=(4, 1, 1), uncond_prob=0.2).drop for _ in range(2000)]
    assert 0.17 < sum(drops) / len(drops) < 0.23
    assert not any(step.draw(1, generator, latent_shape=(4, 1, 1), uncond_prob=0.0).drop for _ in range(100))


def test_gradient_checkpointing_changes_no_gradient(both) -> None:  # noqa: ANN001
    networks, _ = both
    generator = torch.Generator().manual_seed(11)
    batch = _batch(generator, networks.config.image_encoder.clip.image_size)
    draws = step.draw(BATCH, generator, latent_shape=(4, RESOLUTION // 8, RESOLUTION // 8), uncond_prob=0.0)
    grads, calls = [], []
    runs: list[int] = []  # each run of one res block's forward: once without checkpointing, again in backward with it
    hook = networks.unet.down[1].res[0].register_forward_hook(lambda *args: runs.append(1))
    for checkpointing in (False, True):
        networks.unet.gradient_checkpointing = checkpointing
        networks.unet.zero_grad(set_to_none=True)
        networks.image_encoder.zero_grad(set_to_none=True)
        runs.clear()
        step.loss(networks, batch, draws).backward()
        grads.append({k: p.grad.clone() for k, p in step.trained_parameters(networks)})
        calls.append(len(runs))
    hook.remove()
    networks.unet.gradient_checkpointing = False
    assert calls == [1, 2]  # recomputed in backward: checkpointing was on
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
