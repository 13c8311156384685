"""LoRA files: pbe's own small safetensors file of a UNet's low-rank adapters, and diffusers'/peft's, read alike.

pbe's file holds the pairs ``{path}.lora_down.weight`` [rank, in] and ``{path}.lora_up.weight`` [out, rank] under
pbe's module paths (``down.0.attn.0.self_attn.to_q``), with the metadata ``format`` "pbe-lora", ``rank``, ``alpha``,
``targets`` (the adapted projections) and ``base`` (the checkpoint it was trained on, informative). Written
atomically. A diffusers/peft UNet LoRA file (``save_lora_weights``: ``unet.…attn1.to_q.lora_A.weight``, or the older
``…processor.to_q_lora.down.weight``) is read through ``weights_convert.lora``, its names mapped by the converter's
table. Every error is a ``CheckpointError`` naming the file. ``merge_into_checkpoint`` folds a LoRA file into a
checkpoint and writes pbe's native file (``pbe merge-lora``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from weights_convert.lora import convert_diffusers_lora, diffusers_lora_alpha, is_diffusers_lora

from .checkpoint import read_safetensors, save_native
from .errors import CheckpointError
from .files import write_atomically
from .loading import load
from .model.config import PaintByExampleConfig, UNetConfig
from .model.lora import (TARGETS, check_lora_scale, check_lora_state_dict, load_lora_state_dict, lora_layers,
                         lora_state_dict, merge_lora, remove_lora, set_lora_scale)

FORMAT = "pbe-lora"
FORMAT_VERSION = "1"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes in a folder


@dataclass(frozen=True)
class LoRAMeta:
    """What a LoRA file says about its adapters."""

    rank: int  # the inner dimension of every pair
    alpha: float  # the update is scaled by alpha / rank
    targets: tuple[str, ...]  # the adapted projections of each attention (to_q, to_k, to_v, to_out)
    base: str = ""  # the checkpoint the adapters were trained on, if the writer said (informative only)
    format: str = FORMAT  # "pbe-lora", or "diffusers" for a diffusers/peft file


def save_lora(path: str | Path, unet: nn.Module, *, base: str = "", dtype: torch.dtype | None = None) -> LoRAMeta:
    """Write the LoRA layers of ``unet`` to ``path`` (a ``.safetensors`` file), atomically; returns what it wrote.

    ``base``: the checkpoint they were trained on, recorded for the reader. ``dtype``: the written tensors' dtype
    (default: the adapters' own). Raises ``ValueError`` for a UNet without LoRA layers or with mixed ranks/alphas.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_lora: {path}: expected a file name ending in .safetensors")
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("save_lora: the UNet carries no LoRA layers")
    shapes = {(layer.rank, layer.alpha) for layer in layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"save_lora: the LoRA layers mix ranks/alphas {sorted(shapes)}; one file holds one of each")
    (rank, alpha), = shapes
    meta = LoRAMeta(rank, float(alpha), tuple(t for t in TARGETS if any(p.endswith(f".{t}") for p in layers)), base)
    tensors = {k: v.to("cpu", dtype or v.dtype).contiguous() for k, v in lora_state_dict(unet).items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "rank": str(meta.rank), "alpha": repr(meta.alpha),
                "targets": ",".join(meta.targets), "base": base}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return meta


def lora_file(path: str | Path, *, weight_name: str | None = None) -> Path:
    """``path`` itself, or for a folder its ``weight_name`` (default diffusers' ``pytorch_lora_weights.safetensors``).

    Raises ``CheckpointError`` when that file does not exist.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / (weight_name or DIFFUSERS_WEIGHT_NAME)
    elif weight_name is not None:
        raise CheckpointError(f"{path}: weight_name={weight_name!r} applies to a folder, and this is not one")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The tensors (memory-mapped, nothing read yet), metadata and format ("pbe-lora" or "diffusers") of a LoRA
    file; ``CheckpointError`` for anything else."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") == FORMAT:
        return tensors, metadata, FORMAT
    if is_diffusers_lora(tensors):
        return tensors, metadata, "diffusers"
    what = "a pbe checkpoint (give it as --checkpoint)" if metadata.get("format") == "pbe" else \
        f"first keys: {', '.join(sorted(tensors)[:3]) or 'none'}"
    raise CheckpointError(f"{path}: not a LoRA file (no {FORMAT} metadata and no diffusers/peft LoRA keys; {what})")


def check_lora_file(path: str | Path, *, scale: float = 1.0) -> str:
    """The cheap checks of a LoRA file, made before a checkpoint loads: it exists, it is a LoRA file, ``scale`` is
    finite. Returns its format. Whether it fits the UNet is known only once the UNet is loaded (``load_lora``)."""
    check_lora_scale(scale)
    return _read(lora_file(path))[2]


def read_lora(path: str | Path, *, config: UNetConfig = UNetConfig()) -> tuple[dict[str, torch.Tensor], LoRAMeta]:
    """The LoRA weights of a pbe or diffusers/peft LoRA file under pbe's names, and what the file says about them.

    ``config``: the UNet the file is meant for, used to name a diffusers/peft file's weights (default: the official
    UNet). Whether the weights fit a given UNet is checked when they are loaded (``load_lora``). Raises
    ``CheckpointError`` naming the file: missing, unreadable, not a LoRA file (a checkpoint, say), inconsistent
    metadata or shapes.
    """
    path = lora_file(path)
    tensors, metadata, found = _read(path)
    if found == FORMAT:
        state, meta = tensors, _pbe_meta(metadata, origin=str(path))
    else:
        state = convert_diffusers_lora(tensors, config, origin=str(path))
        down = [v for k, v in state.items() if k.endswith(".lora_down.weight")]
        rank = down[0].shape[0] if down else 0
        alpha = diffusers_lora_alpha(metadata, rank=rank, origin=str(path))
        targets = tuple(t for t in TARGETS if any(k.endswith(f".{t}.lora_down.weight") for k in state))
        meta = LoRAMeta(rank, alpha, targets, format="diffusers")
    _check_pairs(state, meta, origin=str(path))
    return state, meta


def _pbe_meta(metadata: dict[str, str], *, origin: str) -> LoRAMeta:
    try:
        rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
        targets = tuple(metadata["targets"].split(","))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{origin}: a {FORMAT} file with unreadable metadata ({err!r})") from None
    if rank < 1 or not math.isfinite(alpha) or alpha <= 0 or not set(targets) <= set(TARGETS):
        raise CheckpointError(f"{origin}: a {FORMAT} file with impossible metadata: rank {rank}, alpha {alpha}, "
                              f"targets {','.join(targets)}")
    return LoRAMeta(rank, alpha, targets, metadata.get("base", ""))


def _check_pairs(state: dict[str, torch.Tensor], meta: LoRAMeta, *, origin: str) -> None:
    """Every key a LoRA weight of rank ``meta.rank`` (the UNet-specific checks come when it is loaded)."""
    wrong = []
    for key, tensor in state.items():
        if key.endswith(".lora_down.weight"):
            rank = tensor.shape[0] if tensor.dim() == 2 else None
        elif key.endswith(".lora_up.weight"):
            rank = tensor.shape[1] if tensor.dim() == 2 else None
        else:
            wrong.append(f"{key}: not a LoRA weight")
            continue
        if rank != meta.rank:
            wrong.append(f"{key}: shape {list(tensor.shape)} does not have rank {meta.rank}")
    if wrong:
        raise CheckpointError(f"{origin}: {len(wrong)} bad tensor(s): {'; '.join(sorted(wrong)[:3])}"
                              f"{'; ...' if len(wrong) > 3 else ''}")
    if not state:
        raise CheckpointError(f"{origin}: holds no LoRA weights")


def load_lora(unet: nn.Module, path: str | Path, *, scale: float = 1.0) -> LoRAMeta:
    """Adapt ``unet`` in place with the LoRA file ``path`` (pbe's or diffusers'/peft's) at strength ``scale``.

    A UNet that already carries LoRA layers loses them first (one adapter at a time). The weights take the base
    layers' dtype and device and do not require gradients. Raises ``CheckpointError`` naming the file and the keys
    that do not fit this UNet (the UNet is then left as it was).
    """
    check_lora_scale(scale)
    state, meta = read_lora(path, config=unet.config)
    try:  # checked before anything changes, so a refused file leaves the UNet as it was
        check_lora_state_dict(unet, state, rank=meta.rank)
    except ValueError as err:
        raise CheckpointError(f"{path}: does not fit this UNet: {err}") from None
    remove_lora(unet)
    load_lora_state_dict(unet, state, rank=meta.rank, alpha=meta.alpha)
    for layer in lora_layers(unet).values():
        layer.lora_down.requires_grad_(False)
        layer.lora_up.requires_grad_(False)
    set_lora_scale(unet, scale)
    return meta


def merge_into_checkpoint(
    checkpoint: str | Path,
    lora: str | Path,
    out: str | Path,
    *,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    config: PaintByExampleConfig | str | Path | None = None,
) -> LoRAMeta:
    """Write ``out``: pbe's native checkpoint of ``checkpoint`` (anything ``pbe.load`` takes) with the LoRA file
    ``lora`` folded into its UNet at strength ``scale`` (summed in float32), tensors in ``dtype`` (default float32).

    Written atomically: a failure leaves ``out`` as it was. Returns what the LoRA file said about itself.
    """
    networks = load(checkpoint, config=config)  # float32, whatever the file holds: the merge sums in float32
    meta = load_lora(networks.unet, lora, scale=scale)
    merge_lora(networks.unet)
    save_native(networks.state_dicts(), networks.config, out, dtype=dtype)
    return meta
