"""LoRA files of diffusers and peft for the UNet -> pbe's LoRA names, every key checked.

A file written by diffusers' ``save_lora_weights`` (peft names: ``unet.down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B``) or by older diffusers (``...attn1.processor.
to_q_lora.down.weight`` / ``up``, ``...to_q.lora.down.weight``) holds the same low-rank pairs as pbe's own
(``down.0.attn.0.self_attn.to_q.lora_down.weight`` / ``lora_up``). The names of the projections come from the
converter's table (``tables.diffusers_unet_rules``), the spellings of a pair from ``tables.DIFFUSERS_LORA_PAIRS``.
"""

from __future__ import annotations

import json

import torch

from pbe.errors import CheckpointError
from pbe.model.config import UNetConfig
from pbe.model.lora import lora_sites

from .mapping import expand
from .tables import (DIFFUSERS_LORA_METADATA_KEY, DIFFUSERS_LORA_PAIRS, DIFFUSERS_LORA_PREFIX,
                     DIFFUSERS_LORA_TEXT_ENCODER_PREFIXES, diffusers_unet_rules)


class _AnySpelling(set):
    """A source that holds every key: ``expand`` then takes each rule's first spelling (the UNet's rules have one)."""

    def __contains__(self, key: object) -> bool:
        return True


def is_diffusers_lora(keys: list[str] | set[str]) -> bool:
    """Whether ``keys`` look like a diffusers/peft LoRA file (any key ends like one of the pairs' spellings)."""
    endings = tuple(spelling.rpartition("}")[2] for pair in DIFFUSERS_LORA_PAIRS for spelling in pair)
    return any(key.endswith(endings) for key in keys)


def diffusers_lora_names(config: UNetConfig) -> dict[str, str]:
    """Every diffusers/peft spelling of a LoRA weight (without the ``unet.`` prefix) -> our LoRA key."""
    from pbe.checkpoint import meta_network  # below this package, imported where needed
    from pbe.model import PaintByExampleConfig

    unet = meta_network("unet", PaintByExampleConfig(unet=config))
    ours = {k: v.shape for k, v in unet.state_dict().items()}
    keymap = expand(diffusers_unet_rules(config), ours, _AnySpelling(), origin="diffusers unet")
    names = {}
    for path in lora_sites(unet):
        module = keymap[f"{path}.weight"][0].removesuffix(".weight")
        short = path.rpartition(".")[2]
        attention = module.removesuffix(".0").removesuffix(f".{short}")
        for down, up in DIFFUSERS_LORA_PAIRS:
            fill = {"module": module, "attention": attention, "name": short}
            names[down.format(**fill)] = f"{path}.lora_down.weight"
            names[up.format(**fill)] = f"{path}.lora_up.weight"
    return names


def diffusers_lora_alpha(metadata: dict[str, str], *, rank: int, origin: str) -> float:
    """The alpha of a diffusers LoRA file: ``lora_alpha`` of the adapter config diffusers stores in the metadata,
    else the rank (diffusers' and peft's convention without it: scale 1)."""
    raw = metadata.get(DIFFUSERS_LORA_METADATA_KEY)
    if not raw:
        return float(rank)
    try:
        config = json.loads(raw)
        found = config.get(f"{DIFFUSERS_LORA_PREFIX}lora_alpha", config.get("lora_alpha"))
        stored_rank = config.get(f"{DIFFUSERS_LORA_PREFIX}r", config.get("r", rank))
    except (ValueError, AttributeError):
        raise CheckpointError(f"{origin}: unreadable {DIFFUSERS_LORA_METADATA_KEY} metadata") from None
    if stored_rank != rank:
        raise CheckpointError(f"{origin}: its metadata says rank {stored_rank} but its weights have rank {rank}")
    return float(rank if found is None else found)


def convert_diffusers_lora(state: dict[str, torch.Tensor], config: UNetConfig, *,
                           origin: str) -> dict[str, torch.Tensor]:
    """A diffusers/peft LoRA state dict of the UNet -> pbe's LoRA keys (``{path}.lora_down.weight`` / ``lora_up``).

    Raises ``CheckpointError`` naming ``origin`` and the keys: text-encoder entries (Paint by Example has none), keys
    that name no attention projection of a UNet of ``config``, the same weight given twice in two spellings.
    """
    text = [k for k in state if k.startswith(DIFFUSERS_LORA_TEXT_ENCODER_PREFIXES)]
    if text:
        raise CheckpointError(f"{origin}: holds {len(text)} text-encoder LoRA weight(s) ({min(text)}, ...): "
                              "Paint by Example has no text encoder; only UNet LoRA files apply")
    names = diffusers_lora_names(config)
    out: dict[str, torch.Tensor] = {}
    unknown, twice = [], []
    for key, tensor in state.items():
        ours = names.get(key.removeprefix(DIFFUSERS_LORA_PREFIX))
        if ours is None:
            unknown.append(key)
        elif ours in out:
            twice.append(key)
        else:
            out[ours] = tensor
    if unknown:
        shown = ", ".join(sorted(unknown)[:3]) + (", ..." if len(unknown) > 3 else "")
        raise CheckpointError(f"{origin}: {len(unknown)} key(s) name no attention projection of this UNet: {shown}")
    if twice:
        raise CheckpointError(f"{origin}: LoRA weights given twice under two spellings: {', '.join(sorted(twice)[:3])}")
    return out
