"""Low-rank adaptation (LoRA) of the UNet's attention projections, in plain PyTorch.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685): a frozen linear layer ``W x + b``
learns a low-rank update, ``y = W x + b + lora_scale * (alpha / rank) * up(down(x))``, where ``down`` is [rank, in]
(Kaiming-uniform, as peft and diffusers initialise it) and ``up`` is [out, rank] (zeros, so a fresh adapter changes
nothing). Fine-tuning practice for Stable Diffusion (diffusers' LoRA examples) adapts ``to_q``, ``to_k``, ``to_v`` and
``to_out`` of every UNet attention; that is the default here.

Every fast path of the UNet goes through the projections as modules (``CrossAttention.one_token`` calls
``to_out(to_v(context))``), so an adapted projection is adapted wherever it is used. A ``LoRALinear`` holds its
frozen layer as ``base`` and has no ``weight`` of its own: code that read ``.weight`` directly would fail loudly rather
than silently skip the update.

File I/O lives outside ``pbe.model`` (``pbe.lora_files``); this module imports torch only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Attention

TARGETS = ("to_q", "to_k", "to_v", "to_out")  # the projections of an Attention that can carry LoRA


class LoRALinear(nn.Module):
    """``base(x) + lora_scale * (alpha / rank) * lora_up(lora_down(x))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_scale = 1.0  # the user's strength at inference (diffusers' `scale`); 0 = the base layer alone
        factory = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # peft's and diffusers' init
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.lora_scale == 0:
            return out
        # LoRA weights may be kept in another dtype than the base (float32 adapters on a bfloat16 UNet).
        delta = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return out + (self.lora_scale * self.scale) * delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``lora_scale * (alpha / rank) * up @ down``, [out, in], computed in float32: what merging adds to W."""
        return (self.lora_scale * self.scale) * (self.lora_up.weight.float() @ self.lora_down.weight.float())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, lora_scale={self.lora_scale}"


def _check_rank_alpha(rank: int, alpha: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a positive finite number, got {alpha!r}")


def _check_targets(targets: tuple[str, ...] | list[str]) -> None:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"targets: expected a non-empty subset of {', '.join(TARGETS)}, got {list(targets)}")


def lora_layers(unet: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` of ``unet``, by module path (``down.0.attn.0.self_attn.to_q``)."""
    return {name: module for name, module in unet.named_modules() if isinstance(module, LoRALinear)}


def lora_sites(unet: nn.Module, targets: tuple[str, ...] | list[str] = TARGETS) -> dict[str, nn.Module]:
    """The projections named in ``targets`` of every attention of ``unet``, by module path (wrapped or not)."""
    return {f"{name}.{target}": getattr(module, target) for name, module in unet.named_modules()
            if isinstance(module, Attention) for target in targets}


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def add_lora(
    unet: nn.Module,
    *,
    rank: int = 4,
    alpha: float = 4.0,
    targets: tuple[str, ...] | list[str] = TARGETS,
    dtype: torch.dtype | None = None,
) -> list[nn.Parameter]:
    """Wrap the ``targets`` projections of every attention of ``unet`` in a ``LoRALinear``, in place.

    Returns the new (trainable) parameters, down then up per layer. The base weights keep their ``requires_grad``: a
    trainer that froze the UNet trains only these. ``dtype``: the adapters' dtype (default: each base layer's).
    Refuses (ValueError) a UNet that already carries LoRA: merge it (``merge_lora``) or remove it first.
    """
    _check_rank_alpha(rank, alpha)
    _check_targets(targets)
    if lora_layers(unet):
        raise ValueError("add_lora: this UNet already carries LoRA layers; merge_lora or remove_lora first")
    sites = lora_sites(unet, targets)
    if not sites:
        raise ValueError(f"add_lora: {type(unet).__name__} has no attention layers to adapt")
    parameters: list[nn.Parameter] = []
    for path, linear in sites.items():
        layer = LoRALinear(linear, rank=rank, alpha=alpha, dtype=dtype)
        _replace(unet, path, layer)
        parameters += [layer.lora_down.weight, layer.lora_up.weight]
    return parameters


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``unet`` alone: ``{path}.lora_down.weight`` [rank, in] and ``{path}.lora_up.weight``
    [out, rank] for every adapted projection (pbe's module paths)."""
    state = {}
    for path, layer in lora_layers(unet).items():
        state[f"{path}.lora_down.weight"] = layer.lora_down.weight.detach()
        state[f"{path}.lora_up.weight"] = layer.lora_up.weight.detach()
    return state


def check_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor], *, rank: int) -> dict[str, nn.Module]:
    """The projections ``state`` adapts, by path, after checking it against ``unet``; ValueError naming the keys that
    name no attention projection of ``unet``, lack their pair, or have the wrong shape for ``rank``."""
    sites = lora_sites(unet)
    paths: dict[str, set[str]] = {}
    unknown = []
    for key in state:
        path, _, part = key.rpartition(".lora_")
        if part not in ("down.weight", "up.weight") or path not in sites:
            unknown.append(key)
        else:
            paths.setdefault(path, set()).add(part)
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) name no attention projection of the UNet: {_listing(unknown)}")
    unpaired = [f"{p}.lora_{'up' if parts == {'down.weight'} else 'down'}.weight"
                for p, parts in paths.items() if len(parts) != 2]
    if unpaired:
        raise ValueError(f"{len(unpaired)} LoRA weight(s) missing: {_listing(unpaired)}")
    wrong = []
    for path in paths:
        linear = sites[path].base if isinstance(sites[path], LoRALinear) else sites[path]
        for part, shape in (("down", (rank, linear.in_features)), ("up", (linear.out_features, rank))):
            found = tuple(state[f"{path}.lora_{part}.weight"].shape)
            if found != shape:
                wrong.append(f"{path}.lora_{part}.weight: expected {list(shape)}, found {list(found)}")
    if wrong:
        raise ValueError(f"{len(wrong)} misshapen LoRA weight(s) for rank {rank}: {_listing(wrong)}")
    if not paths:
        raise ValueError("no LoRA weights given")
    return {path: sites[path] for path in paths}


def _listing(items: list[str], limit: int = 5) -> str:
    return "; ".join(sorted(items)[:limit]) + ("; ..." if len(items) > limit else "")


def load_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor], *, rank: int, alpha: float) -> None:
    """Adapt ``unet`` with the LoRA weights ``state`` (keys as ``lora_state_dict`` writes them), in place.

    Exactly the projections ``state`` names are adapted, strictly (see ``check_lora_state_dict``); the weights take
    the base layers' dtype and device. A UNet that already carries LoRA must carry it on exactly those projections
    with this rank and alpha (the weights are then replaced); otherwise ValueError (``remove_lora`` first).
    """
    _check_rank_alpha(rank, alpha)
    sites = check_lora_state_dict(unet, state, rank=rank)
    existing = lora_layers(unet)
    if existing and (existing.keys() != sites.keys()
                     or any((layer.rank, layer.alpha) != (rank, alpha) for layer in existing.values())):
        raise ValueError("load_lora_state_dict: this UNet already carries other LoRA layers; remove_lora first")
    for path, module in sites.items():
        layer = module if isinstance(module, LoRALinear) else LoRALinear(module, rank=rank, alpha=alpha)
        with torch.no_grad():
            layer.lora_down.weight.copy_(state[f"{path}.lora_down.weight"])
            layer.lora_up.weight.copy_(state[f"{path}.lora_up.weight"])
        _replace(unet, path, layer)


def check_lora_scale(scale: float) -> None:
    """ValueError unless ``scale`` is a finite number (negative ones subtract the update: allowed)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")


def set_lora_scale(unet: nn.Module, scale: float) -> None:
    """Set the strength of every LoRA layer of ``unet`` (1 = as trained, 0 = the base model); ValueError if none."""
    check_lora_scale(scale)
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("set_lora_scale: the UNet carries no LoRA layers (load some first)")
    for layer in layers.values():
        layer.lora_scale = float(scale)


@torch.no_grad()
def merge_lora(unet: nn.Module) -> None:
    """Fold every LoRA layer into its base, ``W <- W + lora_scale * (alpha / rank) * up @ down`` (summed in float32,
    rounded once to W's dtype), and put the base layer back in its place: the UNet's structure is plain again."""
    for path, layer in lora_layers(unet).items():
        weight = layer.base.weight
        weight.copy_((weight.float() + layer.delta_weight().to(weight.device)).to(weight.dtype))
        _replace(unet, path, layer.base)


def remove_lora(unet: nn.Module) -> None:
    """Drop every LoRA layer of ``unet`` unmerged: the base layers return unchanged."""
    for path, layer in lora_layers(unet).items():
        _replace(unet, path, layer.base)
