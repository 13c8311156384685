"""Expand a rule table into an exact key map, check it, and apply it.

The checks are the point: every parameter of ours is filled exactly once, every source tensor is consumed exactly once
(a fused q/k/v tensor exactly by its three chunks) or is on the explicit ignore list, and every shape matches.
Anything else is a ``CheckpointError`` that says which keys, how many, and in which file.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from pbe.checkpoint import cast_tensors
from pbe.errors import CheckpointError

from .tables import Rule, Transform


@dataclass(frozen=True)
class KeyMap:
    """Our parameter name -> (source key, transform), plus what the source holds that we skip on purpose."""

    pairs: dict[str, tuple[str, Transform]]
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> reason


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def expand(rules: list[Rule], ours: dict[str, torch.Size], source_keys: set[str], *, origin: str) -> dict[str, tuple[str, Transform]]:
    """Map each of our parameter names to exactly one source key via the rule whose ``ours`` prefix is longest.

    ``ours`` maps our parameter names to shapes (a meta-device model's state dict gives them); ``source_keys`` decides
    between alternative spellings. Raises ``CheckpointError`` naming ``origin`` for missing keys.
    """
    by_prefix = {r.ours: r for r in rules}
    if len(by_prefix) != len(rules):
        raise AssertionError("duplicate rule for one of our modules")  # a bug in tables.py, not in the checkpoint
    pairs: dict[str, tuple[str, Transform]] = {}
    missing = []
    for name in ours:
        # Longest prefix at a module boundary: "clip.layers.1.norm1" must not match "clip.layers.1".
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            r = by_prefix.get(".".join(parts[:cut]))
            if r is not None:
                break
        else:
            raise AssertionError(f"no rule covers our parameter {name!r}")  # a bug in tables.py
        suffix = ".".join(parts[cut:])
        candidates = [f"{t}.{suffix}" if suffix else t for t in r.theirs]
        found = next((c for c in candidates if c in source_keys), None)
        if found is None:
            missing.append(candidates[0])
        else:
            pairs[name] = (found, r.transform)
    if missing:
        raise CheckpointError(f"{origin}: missing keys: {_listing(missing)}")
    return pairs


def refuse_unexpected(keys: list[str], *, origin: str) -> None:
    """Raise ``CheckpointError`` listing ``keys`` if there are any: source tensors no rule and no ignore entry claims."""
    if keys:
        raise CheckpointError(f"{origin}: unexpected keys (not part of Paint by Example): {_listing(keys)}")


def check_consumed(keymap: KeyMap, source_shapes: dict[str, torch.Size], *, origin: str) -> None:
    """Every source tensor is used exactly once (a fused q/k/v by exactly its three chunks) or ignored on purpose."""
    uses: dict[str, list[Transform]] = defaultdict(list)
    for src, transform in keymap.pairs.values():
        uses[src].append(transform)
    refuse_unexpected([k for k in source_shapes if k not in uses and k not in keymap.ignored], origin=origin)
    chunks = {Transform.QKV_CHUNK_0, Transform.QKV_CHUNK_1, Transform.QKV_CHUNK_2}
    for src, transforms in uses.items():
        if len(transforms) != 1 and sorted(t.value for t in transforms) != sorted(t.value for t in chunks):
            raise AssertionError(f"{src} is used {len(transforms)} times")  # a bug in tables.py


def transform_tensor(tensor: torch.Tensor, transform: Transform) -> torch.Tensor:
    if transform is Transform.COPY:
        return tensor
    if transform is Transform.CONV1X1_TO_LINEAR:
        # Biases pass through; weights drop their 1x1 kernel dimensions.
        return tensor[:, :, 0, 0] if tensor.ndim == 4 else tensor
    index = {Transform.QKV_CHUNK_0: 0, Transform.QKV_CHUNK_1: 1, Transform.QKV_CHUNK_2: 2}[transform]
    return tensor.chunk(3, dim=0)[index]


def expected_source_shape(shape: torch.Size, transform: Transform) -> tuple[int, ...]:
    """The shape the source tensor must have for a target parameter of ``shape``."""
    if transform is Transform.CONV1X1_TO_LINEAR and len(shape) == 2:
        return (*shape, 1, 1)
    if transform in (Transform.QKV_CHUNK_0, Transform.QKV_CHUNK_1, Transform.QKV_CHUNK_2):
        return (3 * shape[0], *shape[1:])
    return tuple(shape)


def check_shapes(keymap: KeyMap, ours: dict[str, torch.Size], source_shapes: dict[str, torch.Size], *, origin: str) -> None:
    wrong = []
    for name, (src, transform) in keymap.pairs.items():
        want = expected_source_shape(ours[name], transform)
        if tuple(source_shapes[src]) != want:
            wrong.append(f"{src}: expected {list(want)}, found {list(source_shapes[src])}")
    if wrong:
        raise CheckpointError(f"{origin}: {len(wrong)} shape mismatches: " + "; ".join(wrong[:5]) + ("; ..." if len(wrong) > 5 else ""))


def build_keymap(
    rules: list[Rule],
    ours: dict[str, torch.Size],
    source_shapes: dict[str, torch.Size],
    ignored: dict[str, str],
    *,
    origin: str,
) -> KeyMap:
    """Expand and fully check a table against one source; the returned map is exact."""
    pairs = expand(rules, ours, set(source_shapes), origin=origin)
    keymap = KeyMap(pairs, {k: why for k, why in ignored.items() if k in source_shapes})
    check_consumed(keymap, source_shapes, origin=origin)
    check_shapes(keymap, ours, source_shapes, origin=origin)
    return keymap


def apply(keymap: KeyMap, source: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict from the source tensors (cast to ``dtype`` when given)."""
    renamed = {name: transform_tensor(source[src], transform) for name, (src, transform) in keymap.pairs.items()}
    return cast_tensors(renamed, dtype=dtype)
