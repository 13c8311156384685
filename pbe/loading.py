"""Load the three networks from anything Paint by Example ships in, or from pbe's native file.

``pbe.load(src)`` accepts:
1. a folder in the hub layout of ``Fantasy-Studio/Paint-by-Example`` (``.bin`` or ``.safetensors`` weights),
2. the original release ``model.ckpt`` (or an original-layout ``.safetensors``),
3. a pbe native ``.safetensors`` (see ``pbe.checkpoint``).
Networks are built on the meta device and receive the checkpoint's tensors directly (cast once to ``dtype``), so no
randomly initialised copy is ever made. Loading is strict: every parameter is filled exactly once, and every error is
a ``CheckpointError`` naming the file. An original-layout checkpoint of a non-official structure needs ``config=``
(see ``load``). ``resolve_checkpoint`` adds hub repo ids, and never sends what looks like a path to the hub.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from weights_convert.convert import check_same_config, convert, read_config
from weights_convert.tables import HUB_CONFIG_FILES, HUB_OTHER_FILES, HUB_WEIGHT_FILES

from .checkpoint import NETWORK_NAMES, cast_tensors, is_native, meta_network, read_native
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
                  dtype: torch.dtype, device: str | torch.device, origin: str = "checkpoint") -> nn.Module:
    """One network, built on the meta device and filled strictly with ``state_dict`` cast to ``dtype``.

    Raises ``CheckpointError`` naming ``origin`` (the file) for missing, unexpected or misshapen tensors.
    """
    model = meta_network(name, config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = [f"{k}: expected {list(shape)}, found {list(state_dict[k].shape)}" for k, shape in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != shape]
    for what, keys in [("missing", missing), ("unexpected", unexpected), ("misshapen", wrong)]:
        if keys:
            raise CheckpointError(f"{origin}: {len(keys)} {what} tensor(s) of the {name}: "
                                  f"{'; '.join(keys[:5])}{'; ...' if len(keys) > 5 else ''}")
    tensors = cast_tensors(state_dict, dtype=dtype, device=device)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load(
    src: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: PaintByExampleConfig | str | Path | None = None,
) -> PaintByExampleNetworks:
    """The UNet, autoencoder and image encoder from a hub folder, an original checkpoint or a native file.

    ``config`` (a ``PaintByExampleConfig``, a pbe config JSON file or a hub-layout folder whose ``unet/``, ``vae/``
    and ``image_encoder/`` hold config.json files) matters for original-layout checkpoints, whose head counts and
    GroupNorm groups cannot be read from the weights: the structure is read from the tensors' shapes, the rest taken
    from ``config``. Without it the official values are used only if the structure is the official one; any other
    structure is refused (never silently wrong networks). A hub folder or native file describes itself: a ``config``
    given with one must match it. Raises ``pbe.CheckpointError`` (a ``ValueError``) naming the file and the problem.
    """
    path = Path(src).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if config is not None and not isinstance(config, PaintByExampleConfig):
        config = read_config(config, name="config=")
    if path.is_file() and is_native(path):
        found, state_dicts = read_native(path)
        check_same_config(config, found, origin=str(path))
        config = found
    else:
        converted = convert(path, base=config)
        config, state_dicts = converted.config, converted.state_dicts
    networks = {name: build_network(name, config, state_dicts[name], dtype=dtype, device=device, origin=str(path))
                for name in NETWORK_NAMES}
    return PaintByExampleNetworks(**networks, config=config)


DEFAULT_REPO = "Fantasy-Studio/Paint-by-Example"
# Extensions of checkpoint (and config) files: a `src` ending in one is a path, never a hub repo id.
PATH_SUFFIXES = (".ckpt", ".safetensors", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".json", ".sft")
# What the hub accepts as a repo id: `namespace/name`, letters, digits, '-', '_' and '.'.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_path(src: str | Path) -> bool:
    """Whether ``src`` can only mean a local path: a checkpoint extension, a leading ``.``, ``/`` or ``~``, a Windows
    drive or backslash, anything but ``namespace/name``, or a first part that is an existing folder."""
    text = str(src)
    if text.startswith((".", "/", "~")) or "\\" in text or re.match(r"[A-Za-z]:", text):
        return True
    if Path(text).suffix.lower() in PATH_SUFFIXES or not _REPO_ID.fullmatch(text):
        return True
    return Path(text).parent.is_dir()  # `weights/model` beside an existing `weights/` folder


def _not_found(path: Path) -> CheckpointError:
    """The error for a missing local checkpoint: which part of the path is missing."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    where = f" (folder {parent} exists, {path.relative_to(parent)} does not)" if str(parent) not in ("", ".") else ""
    cwd = f" in {os.getcwd()}" if not path.is_absolute() else ""
    return CheckpointError(f"{path}: no such file or folder{cwd}{where}; it names a local path, so the hub was "
                           f"not asked (a hub repo id looks like {DEFAULT_REPO})")


def resolve_checkpoint(src: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local path as-is; otherwise a hub repo id, downloaded into the Hugging Face cache (only the files needed).

    Anything that looks like a path (``looks_like_path``) and does not exist is ``CheckpointError`` "no such file"
    at once, without asking the hub. With no network (or ``HF_HUB_OFFLINE=1``) a previously cached copy is used.
    Raises ``CheckpointError`` with what to do when neither works. ``cache_dir`` overrides the Hugging Face cache
    folder (default: ``HF_HUB_CACHE``).
    """
    path = Path(src).expanduser()
    if path.exists():
        return path
    if looks_like_path(src):
        raise _not_found(path)
    repo_id = str(src)
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
