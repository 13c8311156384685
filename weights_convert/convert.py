"""Convert either official Paint by Example layout into pbe's own parameter names, fully checked.

``convert(src)`` takes a hub-layout folder (``Fantasy-Studio/Paint-by-Example``) or an original-layout checkpoint
(``model.ckpt`` or an original-layout ``.safetensors``) and returns the configs, our three state dicts, and a report of
what was mapped and what was skipped on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pbe.checkpoint import config_from_json, is_native, meta_network, read_native
from pbe.errors import CheckpointError
from pbe.model import PaintByExampleConfig

from . import configs
from .mapping import apply, build_keymap, refuse_unexpected
from .readers import read_tensors
from .tables import HUB_CONFIG_FILES, HUB_WEIGHT_FILES, IGNORED, RULES

# Each network's config from its hub config.json.
HUB_CONFIG_READERS = {"unet": configs.unet_config_from_diffusers, "vae": configs.vae_config_from_diffusers,
                      "image_encoder": configs.image_encoder_config_from_transformers}
# The key prefixes of each network in the original layout (its image encoder also owns two top-level tensors).
LDM_PREFIXES = {"unet": ("model.diffusion_model.",), "vae": ("first_stage_model.",),
                "image_encoder": ("cond_stage_model.", "proj_out.", "learnable_vector")}


@dataclass
class Converted:
    config: PaintByExampleConfig
    state_dicts: dict[str, dict[str, torch.Tensor]]  # network name -> our state dict
    layout: str  # "diffusers", "ldm" or "pbe native"
    sources: dict[str, str] = field(default_factory=dict)  # network name -> file it came from
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> why it was skipped

    def report(self) -> str:
        """A one-screen summary: tensors mapped per network, tensors ignored on purpose and why."""
        lines = [f"layout: {self.layout}"]
        for name, sd in self.state_dicts.items():
            count = sum(t.numel() for t in sd.values())
            lines.append(f"  {name:<14} {len(sd):>4} tensors  {count:>12,} parameters  <- {self.sources[name]}")
        reasons: dict[str, list[str]] = {}
        for key, why in self.ignored.items():
            reasons.setdefault(why, []).append(key)
        lines.append(f"ignored on purpose: {len(self.ignored)} tensors")
        for why, keys in reasons.items():
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            lines.append(f"  {len(keys):>3} x {why}: {shown}")
        return "\n".join(lines)


def our_shapes(network: str, config: PaintByExampleConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of one of our networks, from a model built on the meta device (no memory)."""
    return {k: v.shape for k, v in meta_network(network, config).state_dict().items()}


def convert_network(network: str, config: PaintByExampleConfig, layout: str, source: dict[str, torch.Tensor],
                    ignored: dict[str, str], origin: str,
                    dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One network of ``layout`` in our names (checked by ``mapping.build_keymap``), and the source keys it skipped."""
    shapes = {k: v.shape for k, v in source.items()}
    rules = RULES[layout][network](getattr(config, network))
    keymap = build_keymap(rules, our_shapes(network, config), shapes, ignored, origin=origin)
    return apply(keymap, source, dtype=dtype), keymap.ignored


def _check_paint_by_example(config: PaintByExampleConfig, origin: str) -> None:
    expected = 2 * config.vae.latent_channels + 1
    if config.unet.in_channels != expected:
        raise CheckpointError(
            f"{origin}: the UNet takes {config.unet.in_channels} input channels, Paint by Example needs {expected} "
            f"(noisy latent + masked-image latent + mask); this looks like a "
            f"{'text-to-image ' if config.unet.in_channels == config.vae.latent_channels else ''}Stable Diffusion checkpoint"
        )
    if config.unet.context_dim != config.image_encoder.embed_dim:
        raise CheckpointError(f"{origin}: the UNet attends to {config.unet.context_dim}-wide tokens but the image "
                              f"encoder makes {config.image_encoder.embed_dim}-wide ones")


def read_json(path: Path) -> dict:
    """A config.json; ``CheckpointError`` naming the file if it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a hub-layout folder needs it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def hub_folder_config(folder: Path) -> PaintByExampleConfig:
    """The configs of a hub-layout folder: its ``unet/``, ``vae/`` and ``image_encoder/`` config.json files."""
    found = {}
    for network, name in HUB_CONFIG_FILES.items():
        path = folder / name
        try:
            found[network] = HUB_CONFIG_READERS[network](read_json(path), origin=str(path))
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as err:  # a missing key, or values the network cannot be built from
            raise CheckpointError(f"{path}: not a usable {network} config ({type(err).__name__}: {err})") from None
    return PaintByExampleConfig(**found)


def read_config(path: str | Path, *, name: str = "config") -> PaintByExampleConfig:
    """A config given by the user (``--config`` / ``config=``): a pbe config JSON, or a hub-layout folder.

    Raises ``CheckpointError`` naming the argument (``name``), the path and what it holds instead.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not all((path / name).is_file() for name in HUB_CONFIG_FILES.values()):
            raise CheckpointError(f"{name} {path}: a folder without {' and '.join(HUB_CONFIG_FILES.values())}; "
                                  f"expected a hub-layout folder or a pbe config JSON file")
        return hub_folder_config(path)
    try:
        return config_from_json(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{name} {path}: no such file or folder") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{name} {path}: cannot be read ({err})") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{name} {path}: not a pbe config JSON (the schema that `pbe convert` stores; "
                              f"{type(err).__name__}: {err}); a hub-layout folder is accepted too") from None


def check_same_config(given: PaintByExampleConfig | None, found: PaintByExampleConfig, *, origin: str) -> None:
    """A checkpoint that describes itself (hub folder, native file) is used with its own config: a different given
    config is refused rather than silently ignored."""
    if given is not None and given != found:
        differences = "; ".join(configs.structure_differences(given, found, label="the file's")[:4])
        raise CheckpointError(f"{origin}: describes its own networks, and the given config differs ({differences}); "
                              f"a config is needed only for an original-layout checkpoint: drop it")


def convert_hub_folder(folder: Path, *, dtype: torch.dtype | None = None,
                       base: PaintByExampleConfig | None = None) -> Converted:
    """A folder laid out like the hub repo ``Fantasy-Studio/Paint-by-Example``.

    ``base``, when given, must equal the folder's own configs (see ``check_same_config``).
    """
    folder = Path(folder)
    if not (folder / "image_encoder").is_dir():
        what = "a Stable Diffusion folder (it has a text encoder)" if (folder / "text_encoder").is_dir() else "no image_encoder/ folder"
        raise CheckpointError(f"{folder}: not a Paint by Example hub folder: {what}")
    config = hub_folder_config(folder)
    check_same_config(base, config, origin=str(folder))
    _check_paint_by_example(config, str(folder))
    result = Converted(config, {}, "diffusers")
    for network, names in HUB_WEIGHT_FILES.items():
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            raise CheckpointError(f"{folder / network}: no weights file (looked for {' or '.join(names)})")
        ignored = dict(IGNORED["diffusers"].get(network, []))
        result.state_dicts[network], skipped = convert_network(network, config, "diffusers", read_tensors(path), ignored, str(path), dtype)
        result.sources[network] = str(path)
        result.ignored.update(skipped)
    return result


def convert_ldm_state_dict(source: dict[str, torch.Tensor], *, origin: str, base: PaintByExampleConfig | None = None,
                           dtype: torch.dtype | None = None) -> Converted:
    """An original-layout state dict (``model.ckpt``'s ``state_dict``), structure read from its shapes.

    Head counts and GroupNorm groups cannot be read from weights: they come from ``base``; without it from the official
    config, if the structure is the official one (see ``configs.config_from_ldm``).
    """
    if any(k.startswith("cond_stage_model.transformer.text_model.") for k in source):
        raise CheckpointError(f"{origin}: has CLIP text-encoder keys: a Stable Diffusion checkpoint, not Paint by Example")
    shapes = {k: v.shape for k, v in source.items()}
    config = configs.config_from_ldm(shapes, base, origin=origin)
    _check_paint_by_example(config, origin)
    common_ignored = dict(IGNORED["ldm"]["all"])
    claimed = tuple(prefix for prefixes in LDM_PREFIXES.values() for prefix in prefixes)
    refuse_unexpected([k for k in source if not k.startswith(claimed) and k not in common_ignored], origin=origin)
    result = Converted(config, {}, "ldm", ignored={k: v for k, v in common_ignored.items() if k in source})
    for network, prefixes in LDM_PREFIXES.items():
        part = {k: v for k, v in source.items() if k.startswith(prefixes)}
        result.state_dicts[network], skipped = convert_network(network, config, "ldm", part, common_ignored, origin, dtype)
        result.sources[network] = origin
        result.ignored.update(skipped)
    return result


def convert_native(path: Path, *, base: PaintByExampleConfig | None = None,
                   dtype: torch.dtype | None = None) -> Converted:
    """A pbe native file, already in our names: its configs and tensors as they are (cast to ``dtype`` if given), so
    that ``pbe convert`` can re-save it, e.g. in another dtype. ``base`` (if given) must equal its own config."""
    config, state_dicts = read_native(path)
    check_same_config(base, config, origin=str(path))
    if dtype is not None:
        state_dicts = {network: {k: t.to(dtype) if t.is_floating_point() else t for k, t in sd.items()}
                       for network, sd in state_dicts.items()}
    return Converted(config, state_dicts, "pbe native", sources=dict.fromkeys(state_dicts, str(path)))


def convert(src: str | Path, *, base: PaintByExampleConfig | None = None, dtype: torch.dtype | None = None) -> Converted:
    """Either official layout -> our names. ``src``: a hub-layout folder, or an original-layout ``.ckpt`` or
    ``.safetensors``; a pbe native ``.safetensors`` is taken as it is (``convert_native``).

    ``base``: the config of an original-layout checkpoint's networks (``read_config`` reads one from a file); needed
    unless its structure is the official one. A hub folder has its own, which ``base`` (if given) must equal.
    """
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return convert_hub_folder(path, dtype=dtype, base=base)
    if is_native(path):
        return convert_native(path, base=base, dtype=dtype)
    source = read_tensors(path)
    if any(k.startswith("model.diffusion_model.") for k in source):
        return convert_ldm_state_dict(source, origin=str(path), base=base, dtype=dtype)
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "model.vision_model.", "mapper.")) for k in source):
        raise CheckpointError(f"{path}: a single component in diffusers layout; pass the whole hub folder instead")
    raise CheckpointError(f"{path}: unknown layout (neither the hub folder nor the original model.ckpt layout); "
                          f"first keys: {', '.join(sorted(source)[:3]) or 'none'}")
