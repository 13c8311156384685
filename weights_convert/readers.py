"""Read tensors from ``.safetensors``, pickled ``.bin`` and PyTorch Lightning ``.ckpt`` files, safely.

Safetensors files are read by ``pbe.checkpoint.read_safetensors``, the one safetensors reader (pbe's native file
is safetensors too). Pickles are read with torch's ``weights_only`` unpickler, which never runs pickled code. A Lightning checkpoint also
pickles objects of classes that are not importable here (callbacks, hyper-parameter namespaces); each such class is
replaced by an inert stand-in before loading, so its objects load as empty shells and are then dropped.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from pbe.checkpoint import read_safetensors
from pbe.errors import CheckpointError


def _inert_class(qualified_name: str) -> type:
    """A do-nothing class standing in for an unimportable pickled one."""
    module, _, name = qualified_name.rpartition(".")

    def init(self: object, *args: object, **kwargs: object) -> None:
        pass

    def setstate(self: object, state: object) -> None:
        pass

    return type(name, (), {"__module__": module, "__init__": init, "__setstate__": setstate, "__reduce__": None})


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint: a plain state dict, or Lightning's ``{"state_dict": ...}``."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (truncated, or not a zip-format torch.save file)")
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        stand_ins = [(_inert_class(name), name) for name in unknown]
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({str(err).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of any supported file, chosen by content, not by extension."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return read_pickle(path)
    return read_safetensors(path)[0]
