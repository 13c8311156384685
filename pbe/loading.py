"""Load the three networks from anything Paint by Example ships in, or from pbe's native file.

``pbe.load(src)`` accepts:
1. a folder in the hub layout of ``Fantasy-Studio/Paint-by-Example`` (``.bin`` or ``.safetensors`` weights),
2. the original release ``model.ckpt`` (or an original-layout ``.safetensors``),
3. a pbe native ``.safetensors`` (see ``pbe.checkpoint``).
Networks are built on the meta device and receive the checkpoint's tensors directly (cast once to ``dtype``), so no
randomly initialised copy is ever made. Loading is strict: every parameter is filled exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from weights_convert.convert import convert
from weights_convert.tables import HUB_CONFIG_FILES, HUB_OTHER_FILES, HUB_WEIGHT_FILES

from .checkpoint import NETWORK_NAMES, is_native, meta_network, read_native
from .errors import CheckpointError
from .model import AutoencoderKL, ImageEncoder, PaintByExampleConfig, UNet


@dataclass
class PaintByExampleNetworks:
    """The three networks of Paint by Example and the configs they were built from."""

    unet: UNet
    vae: AutoencoderKL
    image_encoder: ImageEncoder
    config: PaintByExampleConfig

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: getattr(self, name).state_dict() for name in NETWORK_NAMES}


def build_network(name: str, config: PaintByExampleConfig, state_dict: dict[str, torch.Tensor], *,
                  dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """One network, built on the meta device and filled strictly with ``state_dict`` cast to ``dtype``."""
    model = meta_network(name, config)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load(
    src: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: PaintByExampleConfig | None = None,
) -> PaintByExampleNetworks:
    """The UNet, autoencoder and image encoder from a hub folder, an original checkpoint or a native file.

    ``config`` matters only for original-layout checkpoints, whose head counts and GroupNorm groups cannot be read
    from the weights: the structure is read from the tensors' shapes, the rest taken from ``config`` (default: the
    official values). Raises ``pbe.CheckpointError`` (a ``ValueError``) naming the file and the problem.
    """
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file() and is_native(path):
        config, state_dicts = read_native(path)
    else:
        converted = convert(path, base=config)
        config, state_dicts = converted.config, converted.state_dicts
    networks = {name: build_network(name, config, state_dicts[name], dtype=dtype, device=device) for name in NETWORK_NAMES}
    return PaintByExampleNetworks(**networks, config=config)


DEFAULT_REPO = "Fantasy-Studio/Paint-by-Example"


def resolve_checkpoint(src: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local path as-is; otherwise a hub repo id, downloaded into the Hugging Face cache (only the files needed).

    With no network (or ``HF_HUB_OFFLINE=1``) a previously cached copy is used. Raises ``CheckpointError`` with what
    to do when neither works. ``cache_dir`` overrides the Hugging Face cache folder (default: ``HF_HUB_CACHE``).
    """
    path = Path(src)
    if path.exists():
        return path
    repo_id = str(src)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise CheckpointError(f"{src}: no such file or folder (and not a hub repo id like {DEFAULT_REPO})")
    import huggingface_hub  # only hub loading needs it
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        files = set(huggingface_hub.list_repo_files(repo_id, revision=revision))  # network
        # The configs, and per network ONE weights file (the first present: safetensors when there is one).
        wanted = [f for f in (*HUB_OTHER_FILES, *HUB_CONFIG_FILES.values()) if f in files]
        wanted += [next((f for f in names if f in files), names[-1]) for names in HUB_WEIGHT_FILES.values()]
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=wanted,
                                                       cache_dir=cache_dir))
    except Exception as online_error:  # offline mode, no network, HTTP errors: all mean "try the cache"
        try:  # offline, or the hub is unreachable: a cached snapshot will do
            return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True,
                                                           cache_dir=cache_dir))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise CheckpointError(
                f"{repo_id}: cannot reach the Hugging Face hub and no cached copy was found "
                f"({type(online_error).__name__}). Download the checkpoint elsewhere and point --checkpoint (or "
                f"from_pretrained) at the local hub-layout folder, model.ckpt or a pbe .safetensors file"
            ) from None
