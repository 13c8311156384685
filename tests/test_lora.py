"""LoRA on the UNet's attention projections (pbe.model.lora), on the tiny hub stand-in.

No peft here: correctness is proven by the merge identity (the adapted UNet equals the UNet whose weights were merged,
W + s * up @ down) and against diffusers' UNet2DConditionModel, loaded from the stand-in with ``from_pretrained``,
whose to_q/to_k/to_v/to_out.0 weights received the same deltas (names mapped by weights_convert's tables). Contexts
of one token (Paint by Example's case: the cross-attention's one-token shortcut) and of three tokens (the full
attention) are both covered, each with the classifier-free-guidance fan-out (one sample, two context rows). The
parity tests run pbe on the suite's device (PBE_TEST_DEVICE, tests/conftest.py) against diffusers' float32 CPU output.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pbe
from pbe.model.lora import (LoRALinear, add_lora, load_lora_state_dict, lora_layers, lora_state_dict, merge_lora,
                            remove_lora, set_lora_scale)
from pbe.model.unet import UNet
from weights_convert.mapping import expand
from weights_convert.tables import diffusers_unet_rules

from conftest import HUB, ROUNDING_BOUND, reference_bound, relative_error, rounding_bound

# One sample, two context rows ([uncond, cond]): the guided batch layout the UNet fans out.
CONTEXT_TOKENS = [1, 3]
# float32 rounding: the merged weight rounds W + delta once where the adapter adds two products (project bound).
FLOAT32 = ROUNDING_BOUND[torch.float32]


@pytest.fixture(scope="module")
def networks() -> pbe.PaintByExampleNetworks:
    return pbe.load(HUB)


def _unet(networks: pbe.PaintByExampleNetworks) -> UNet:
    return copy.deepcopy(networks.unet)


def _inputs(unet: UNet, tokens: int, *, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(tokens)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator).to(dtype)
    context = torch.randn(2, tokens, unet.config.context_dim, generator=generator).to(dtype)
    return sample, context


def _randomise(unet: torch.nn.Module, *, seed: int = 0, std: float = 0.1) -> None:
    """Non-zero LoRA weights everywhere (a trained adapter's stand-in: it moves the tiny UNet's output by 20-40%)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            for weight in (layer.lora_down.weight, layer.lora_up.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)


@torch.no_grad()
def _run(unet: torch.nn.Module, sample: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return unet(sample, torch.tensor(500.0), context)


def test_add_lora_wraps_every_attention_projection_and_returns_the_new_parameters(networks) -> None:
    unet = _unet(networks)
    parameters = add_lora(unet, rank=2, alpha=3.0)
    layers = lora_layers(unet)
    # tiny stand-in: 3 down levels x 2 + mid 1 + 3 up levels x 3 = 16 transformers, 2 attentions each, 4 projections
    assert len(layers) == 16 * 2 * 4
    assert {path.rpartition(".")[2] for path in layers} == {"to_q", "to_k", "to_v", "to_out"}
    assert "down.0.attn.0.cross_attn.to_v" in layers and "mid_attn.self_attn.to_out" in layers
    assert len(parameters) == 2 * len(layers)
    layer = layers["down.0.attn.0.cross_attn.to_k"]
    assert layer.lora_down.weight.shape == (2, unet.config.context_dim)
    assert layer.lora_up.weight.shape == (8, 2) and not layer.lora_up.weight.any() and layer.lora_down.weight.any()
    assert layer.scale == 1.5
    with pytest.raises(ValueError, match="already carries LoRA"):
        add_lora(unet)


def test_targets_choose_the_projections(networks) -> None:
    unet = _unet(networks)
    add_lora(unet, targets=("to_k", "to_v"))
    assert {path.rpartition(".")[2] for path in lora_layers(unet)} == {"to_k", "to_v"}


@pytest.mark.parametrize("bad, message", [({"rank": 0}, "rank: expected a positive integer, got 0"),
                                          ({"alpha": float("nan")}, "alpha: expected a positive finite number"),
                                          ({"targets": ("to_q", "proj_in")}, "targets: expected a non-empty subset")])
def test_bad_arguments_are_refused(networks, bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        add_lora(_unet(networks), **bad)


@pytest.mark.parametrize("tokens", CONTEXT_TOKENS)
def test_a_fresh_adapter_leaves_the_output_bit_identical(networks, tokens) -> None:
    unet = _unet(networks)
    sample, context = _inputs(unet, tokens)
    before = _run(unet, sample, context)
    add_lora(unet, rank=4, alpha=8.0)
    assert torch.equal(_run(unet, sample, context), before)


@pytest.mark.parametrize("tokens", CONTEXT_TOKENS)
def test_adapted_unet_equals_the_merged_one_and_scale_zero_the_base(networks, tokens) -> None:
    unet = _unet(networks)
    sample, context = _inputs(unet, tokens)
    base = _run(unet, sample, context)
    add_lora(unet, rank=3, alpha=6.0)
    _randomise(unet)
    adapted = _run(unet, sample, context)
    assert relative_error(adapted, base) > 1e-2  # the adapter does change the output

    merged = copy.deepcopy(unet)
    merge_lora(merged)
    assert not lora_layers(merged) and type(merged.mid_attn.cross_attn.to_v) is torch.nn.Linear
    assert relative_error(_run(merged, sample, context), adapted) < FLOAT32

    set_lora_scale(unet, 0.5)
    half = copy.deepcopy(unet)
    merge_lora(half)
    assert relative_error(_run(unet, sample, context), _run(half, sample, context)) < FLOAT32
    assert relative_error(_run(half, sample, context), adapted) > 1e-3

    set_lora_scale(unet, 0.0)
    assert torch.equal(_run(unet, sample, context), base)
    remove_lora(unet)
    assert not lora_layers(unet) and torch.equal(_run(unet, sample, context), base)


def _diffusers_with_deltas(networks: pbe.PaintByExampleNetworks, adapted: UNet, *, dtype: torch.dtype = torch.float32):
    """diffusers' UNet2DConditionModel from the stand-in, its to_q/to_k/to_v/to_out.0 weights plus the deltas of
    ``adapted``'s LoRA layers (merged in float32), then cast to ``dtype``."""
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(HUB / "unet").eval()
    # Our projection `{path}.weight` -> diffusers' key, through the converter's own table.
    theirs = reference.state_dict()
    ours = {name: tensor.shape for name, tensor in networks.unet.state_dict().items()}
    keymap = expand(diffusers_unet_rules(adapted.config), ours, set(theirs), origin="diffusers unet")
    deltas = {keymap[f"{path}.weight"][0]: layer.delta_weight() for path, layer in lora_layers(adapted).items()}
    assert len(deltas) == len(lora_layers(adapted)) and all(
        key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")) for key in deltas)
    with torch.no_grad():
        for key, delta in deltas.items():
            theirs[key].add_(delta)
    return reference.to(dtype)


@torch.no_grad()
def _run_diffusers(reference, sample: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    batch = context.shape[0] // sample.shape[0]
    return reference(sample.repeat(batch, 1, 1, 1), torch.tensor(500.0), encoder_hidden_states=context).sample


@pytest.mark.parametrize("tokens", CONTEXT_TOKENS)
def test_adapted_unet_equals_diffusers_unet_with_the_deltas_added(networks, tokens, device) -> None:
    unet = _unet(networks)
    add_lora(unet, rank=2, alpha=5.0)
    _randomise(unet, seed=1)
    set_lora_scale(unet, 0.75)
    sample, context = _inputs(unet, tokens)
    expected = _run_diffusers(_diffusers_with_deltas(networks, unet), sample, context)  # float32, on the CPU
    ours = _run(unet.to(device), sample.to(device), context.to(device))
    assert relative_error(ours, expected) < rounding_bound(torch.float32, device=device)


def test_only_lora_parameters_train_when_the_base_is_frozen(networks) -> None:
    unet = _unet(networks).requires_grad_(False)
    parameters = add_lora(unet, rank=2)
    _randomise(unet)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in parameters}
    for tokens in CONTEXT_TOKENS:
        sample, context = _inputs(unet, tokens)
        unet(sample, torch.tensor(500.0), context).square().mean().backward()
    assert all(p.grad is None for name, p in unet.named_parameters() if ".lora_" not in name)
    grads = {name: p.grad for name, p in unet.named_parameters() if ".lora_" in name}
    assert len(grads) == len(parameters) and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_base_dtype_and_merges_alike(networks, dtype, device) -> None:
    unet = _unet(networks)
    add_lora(unet, rank=2)
    _randomise(unet)
    sample, context = _inputs(unet, 3)
    exact = _diffusers_with_deltas(networks, unet)
    expected = _run_diffusers(exact, sample, context)  # float32, on the CPU
    # As far as diffusers' UNet with the merged weights strays from that in this dtype on this device
    # (conftest.parity_tolerance).
    sample, context = sample.to(device, dtype), context.to(device, dtype)
    bound = reference_bound(rounding_bound(dtype, device=device),
                            relative_error(_run_diffusers(exact.to(device, dtype), sample, context), expected))

    unet.to(device, dtype)
    assert {layer.lora_up.weight.dtype for layer in lora_layers(unet).values()} == {dtype}
    adapted = _run(unet, sample, context)
    assert adapted.dtype == dtype
    assert relative_error(adapted, expected) < bound
    merge_lora(unet)
    assert relative_error(_run(unet, sample, context), expected) < bound


def test_float32_adapters_on_a_bfloat16_unet(networks) -> None:
    unet = _unet(networks).to(torch.bfloat16)
    add_lora(unet, rank=2, dtype=torch.float32)
    _randomise(unet, std=0.1)
    layer = lora_layers(unet)["up.1.attn.0.self_attn.to_q"]
    assert layer.lora_down.weight.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    sample, context = _inputs(unet, 3, dtype=torch.bfloat16)
    assert _run(unet, sample, context).dtype == torch.bfloat16


def test_meta_device(networks) -> None:
    with torch.device("meta"):
        unet = UNet(networks.config.unet)
    add_lora(unet, rank=4)
    state = lora_state_dict(unet)
    assert all(t.device.type == "meta" for t in state.values())
    sample, context = (t.to("meta") for t in _inputs(unet, 1))
    assert _run(unet, sample, context).shape == (2, 4, 8, 8)
    merge_lora(unet)
    assert not lora_layers(unet)


def test_state_dict_round_trip_and_refusals(networks) -> None:
    unet = _unet(networks)
    add_lora(unet, rank=2, alpha=2.0, targets=("to_q", "to_v"))
    _randomise(unet)
    state = lora_state_dict(unet)
    assert "down.0.attn.0.self_attn.to_q.lora_down.weight" in state and len(state) == 2 * 64
    sample, context = _inputs(unet, 3)

    fresh = _unet(networks)
    load_lora_state_dict(fresh, state, rank=2, alpha=2.0)
    assert set(lora_layers(fresh)) == set(lora_layers(unet))
    assert torch.equal(_run(fresh, sample, context), _run(unet, sample, context))
    load_lora_state_dict(fresh, state, rank=2, alpha=2.0)  # the same layers again: the weights are replaced
    with pytest.raises(ValueError, match="already carries other LoRA layers"):
        load_lora_state_dict(fresh, state, rank=2, alpha=4.0)

    with pytest.raises(ValueError, match=r"1 key\(s\) name no attention projection of the UNet: down.9.attn"):
        load_lora_state_dict(_unet(networks), {**state, "down.9.attn.0.self_attn.to_q.lora_down.weight":
                                               state["down.0.attn.0.self_attn.to_q.lora_down.weight"]}, rank=2, alpha=2)
    missing = {k: v for k, v in state.items() if k != "mid_attn.cross_attn.to_v.lora_up.weight"}
    with pytest.raises(ValueError, match="1 LoRA weight.s. missing: mid_attn.cross_attn.to_v.lora_up.weight"):
        load_lora_state_dict(_unet(networks), missing, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match=r"misshapen LoRA weight\(s\) for rank 3: .*expected \[3, 8\], found \[2, 8\]"):
        load_lora_state_dict(_unet(networks), state, rank=3, alpha=2.0)


def test_a_lora_layer_has_no_weight_of_its_own(networks) -> None:
    # Code that read `.weight` of an adapted projection directly would skip the update: it must fail instead.
    unet = _unet(networks)
    add_lora(unet)
    assert isinstance(unet.mid_attn.cross_attn.to_v, LoRALinear)
    with pytest.raises(AttributeError):
        unet.mid_attn.cross_attn.to_v.weight  # noqa: B018
