"""Read tensors from ``.safetensors``, pickled ``.bin`` and PyTorch Lightning ``.ckpt`` files, safely.

The format is told by the file's first bytes, never by its extension, and a file of no supported format is named for
what it is (empty, a Git LFS pointer, an HTML page, text...). Safetensors files are read by
``pbe.checkpoint.read_safetensors``, the one safetensors reader (pbe's native file is safetensors too). Pickles are
read with torch's ``weights_only`` unpickler, which never runs pickled code. A Lightning checkpoint also pickles
objects of classes that are not importable here (callbacks, hyper-parameter namespaces); each such class is replaced
by an inert stand-in before loading, so its objects load as empty shells and are then dropped. A pickle that names a
function that runs code or touches the system (``os.system``, ``eval``, ``subprocess.*``...) is refused outright,
named in the message; nothing of it runs.
"""

from __future__ import annotations

import _compat_pickle
import json
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch

from pbe.checkpoint import read_safetensors
from pbe.errors import CheckpointError

# Modules whose functions a checkpoint has no business calling: a pickle naming one of them is an attempt to run code.
# (The classes Lightning pickles -- callbacks, paths, partials -- are loaded as inert stand-ins instead.)
CODE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "shutil", "socket", "importlib", "runpy", "code",
    "codeop", "pty", "ctypes", "marshal", "pickle", "_pickle", "webbrowser", "multiprocessing", "pdb", "commands",
    "popen2",
})
# The built-in functions that run code or reach into objects (the usual pickle exploit primitives).
CODE_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "delattr", "globals",
                           "locals", "vars", "input", "breakpoint", "execfile"})
# How the platform modules are better known.
_MODULE_ALIASES = {"posix": "os", "nt": "os", "__builtin__": "builtins", "_io": "io", "_pickle": "pickle"}


def _inert_class(qualified_name: str) -> type:
    """A do-nothing class standing in for an unimportable pickled one."""
    module, _, name = qualified_name.rpartition(".")

    def init(self: object, *args: object, **kwargs: object) -> None:
        pass

    def setstate(self: object, state: object) -> None:
        pass

    return type(name, (), {"__module__": module, "__init__": init, "__setstate__": setstate, "__reduce__": None})


def _refuse_code(path: Path, globals_: list[str]) -> None:
    """``CheckpointError`` if any of the pickle's globals (``module.name``) is a function that runs code."""
    calls = []
    for qualified in globals_:
        module, _, name = qualified.rpartition(".")
        # Pickles of protocol < 3 spell some names as Python 2 did (subprocess.call as commands.call): say what runs.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        top = module.partition(".")[0]
        if top in CODE_MODULES or top in ("builtins", "__builtin__") and name in CODE_BUILTINS:
            calls.append(f"{_MODULE_ALIASES.get(top, top)}{module[len(top):]}.{name}")
    if calls:
        raise CheckpointError(f"{path}: refused to run code from the checkpoint (it calls {', '.join(calls)}); "
                              f"nothing was run. A checkpoint holds tensors only: get it from a trusted source")


def _loaded_state_dict(path: Path, obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a zip-format pickled checkpoint: a plain state dict, or Lightning's ``{"state_dict": ...}``."""
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: a zip archive but not a readable PyTorch checkpoint (truncated, or another "
                              f"kind of zip: {str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    _refuse_code(path, unknown)
    try:
        stand_ins = [(_inert_class(name), name) for name in unknown]
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: a PyTorch checkpoint that cannot be read "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return _loaded_state_dict(path, obj)


_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE")  # opcodes that push a str


def pickle_globals(path: Path, *, max_pickles: int = 5) -> list[str]:
    """The ``module.name`` globals a (non-zip) pickle file names, read from its opcodes without running any.

    A legacy ``torch.save`` file is up to five pickles in a row followed by raw tensor bytes; scanning stops at the
    first thing that is not a pickle.
    """
    found: list[str] = []
    with open(path, "rb") as f:
        for _ in range(max_pickles):
            strings: list[str] = []  # string arguments seen, for STACK_GLOBAL (protocol 4+: module and name pushed)
            memo: dict[int, str] = {}
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        found.append(arg.replace(" ", "."))
                    elif isinstance(arg, str) and op.name in _STRING_OPS:
                        strings.append(arg)
                    elif op.name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                        memo[arg] = strings[-1]
                    elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                        strings.append(memo[arg])
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
            except (ValueError, EOFError, UnicodeDecodeError):  # not (or no longer) a pickle
                break
    return found


def read_legacy_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a legacy (non-zip, before PyTorch 1.6) ``torch.save`` file."""
    _refuse_code(path, pickle_globals(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, i.e. running the file's code: name what it wanted instead.
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
        what = f"it pickles {names[0]}, which a weights-only reader does not load" if names else "an unreadable pickle"
        raise CheckpointError(f"{path}: a legacy (non-zip) PyTorch pickle that cannot be read safely ({what}); "
                              f"re-save its state dict with a recent torch.save, or convert it to .safetensors"
                              ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: a pickle, but not a readable torch.save file (truncated, or pickled by "
                              f"something else: {first})") from None
    return _loaded_state_dict(path, obj)


def sniff_format(path: Path, head: bytes, size: int) -> str:
    """What ``head`` (the first bytes of a file of ``size`` bytes) says the file is: "zip", "pickle", "safetensors",
    or, for anything unsupported, a description naming what it is."""
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode, protocols 2 to 5
        return "pickle"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 8 + header_len <= size:
            return "safetensors"
        if head[8:9] == b"{":
            return (f"a truncated safetensors file (its header says {header_len:,} header bytes, the file has "
                    f"{size:,} bytes in all)")
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (fetch it with `git lfs pull`, or download the file directly)"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML page, not a checkpoint (a download that saved an error or login page?)"
    if text.startswith((b"{", b"[")):
        try:
            json.loads(path.read_text())
            return "a JSON file, not a checkpoint (a config? pass it with --config / config=)"
        except (ValueError, UnicodeDecodeError, OSError):
            pass
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive (unpack it first)"
    snippet = None
    for cut in range(4):  # the 64 bytes read may end inside a multi-byte character
        try:
            snippet = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if snippet is not None and all(c.isprintable() or c.isspace() for c in snippet):
        first = snippet.strip().splitlines()[0][:40] if snippet.strip() else ""
        return f"a text file, not a checkpoint (it starts {first!r})"
    return f"not a checkpoint format pbe knows (not safetensors, not a PyTorch pickle; it starts {head[:8].hex(' ')})"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of any supported file, chosen by content, not by extension."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(64)
    kind = sniff_format(path, head, path.stat().st_size)
    if kind == "zip":
        return read_pickle(path)
    if kind == "pickle":
        return read_legacy_pickle(path)
    if kind == "safetensors":
        return read_safetensors(path)[0]
    raise CheckpointError(f"{path}: {kind}")
