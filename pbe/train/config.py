"""The training configuration: one frozen dataclass whose defaults are the paper's recipe.

Yang et al., "Paint by Example" (arXiv 2211.13227), section 4.1, and the official configs/v1.yaml: AdamW at 1e-5
(weight decay 0.01) with a linear warm-up from 1e-6 x lr over 10,000 steps, batch 4 per GPU, 40 epochs,
classifier-free dropout 0.2 per batch, gradient checkpointing, fp32, no EMA, seed 23.

A config is read from a JSON or TOML file (``load_config``) whose keys are the field names (``data`` a nested table of
``DataConfig`` fields), then overridden by flags: ``pbe train --FIELD VALUE`` for every field (``--data-FIELD`` for the
data fields), generated from the dataclass (``config_flags``), so the file, the flags and the dataclass always agree.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..options import OptionError, PaintOptions
from .data import DataConfig

PRECISIONS = ("fp32", "bf16")
INITS = ("paint-by-example", "stable-diffusion")
STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    # ---- what to train from, on what, and where to write
    manifest: Path | None = None  # training data: JSONL/CSV of pictures with object boxes (see pbe.train.data)
    validation_manifest: Path | None = None  # pictures painted every validate_every steps (default: training rows)
    output_dir: Path = Path("pbe-train")  # checkpoints, log.jsonl, validation grids, the final model
    init: str = "paint-by-example"  # "paint-by-example": fine-tune `checkpoint`; "stable-diffusion": the paper's init
    checkpoint: str = "Fantasy-Studio/Paint-by-Example"  # init "paint-by-example": hub id, hub folder, .ckpt, pbe file
    sd_checkpoint: str | None = None  # init "stable-diffusion": a Stable Diffusion 1.x checkpoint (file or folder)
    clip_checkpoint: str | None = None  # init "stable-diffusion": a CLIP ViT-L/14 vision checkpoint
    resume: bool = True  # continue from the latest checkpoint in output_dir, if there is one

    # ---- optimisation (configs/v1.yaml)
    lr: float = 1e-5  # AdamW learning rate after warm-up (base_learning_rate, --scale_lr False)
    weight_decay: float = 0.01  # AdamW weight decay (torch's AdamW default, which the original kept)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (torch's defaults, as the original)
    warmup_steps: int = 10000  # linear warm-up length in optimizer steps (LambdaLinearScheduler warm_up_steps)
    warmup_start: float = 1e-6  # the warm-up starts at this fraction of lr (f_start)
    batch_size: int = 4  # samples per process per micro-batch (4 per GPU in the paper, 8 GPUs)
    grad_accumulation: int = 1  # micro-batches summed into one optimizer step
    epochs: int = 40  # passes over the training data
    max_steps: int | None = None  # stop after this many optimizer steps (default: the epochs decide)
    uncond_prob: float = 0.2  # probability that a whole batch is conditioned on the learned uncond token
    max_grad_norm: float | None = None  # clip the gradients' global norm (the original does not)
    ema_decay: float | None = None  # keep an exponential moving average of the trained weights (the original: none)

    # ---- fine-tuning with LoRA (pbe.model.lora) instead of the whole UNet
    lora_rank: int | None = None  # rank of the LoRA on the UNet's attention projections; None: train everything
    lora_alpha: float | None = None  # LoRA alpha (scale = alpha / rank); None: alpha = rank

    # ---- speed and memory
    precision: str = "fp32"  # "fp32", or "bf16" autocast (weights and optimizer stay float32)
    gradient_checkpointing: bool = True  # recompute the UNet blocks' activations in backward (the original does)
    device: str = "auto"  # auto (cuda:LOCAL_RANK if CUDA is present, else cpu), cpu, cuda, cuda:N
    strategy: str = "auto"  # over several processes: "ddp", "fsdp" (FSDP2), "auto" (ddp), "none" (one process)
    workers: int = 4  # DataLoader worker processes per training process
    seed: int = 23  # seeds the data order, the augmentations and every random draw of the training steps

    # ---- what the run writes and how often (in optimizer steps)
    log_every: int = 10  # one line of log.jsonl (and TensorBoard) every N steps
    checkpoint_every: int = 1000  # a resumable checkpoint every N steps (and at the end)
    validate_every: int = 1000  # a validation grid every N steps (0: never)
    validation_samples: int = 4  # rows painted into each grid
    validation_steps: int = 20  # denoising steps of the validation paintings
    validation_guidance: float = 5.0  # their classifier-free guidance scale
    validation_clip: str | None = None  # a CLIP ViT-B/32 checkpoint (transformers CLIPModel, as pbe eval takes): each
    # validation also logs its paintings' region CLIP score (pbe.evaluation; the paper's metric)
    validation_mixture: Path | None = None  # with validation_clip: a QS mixture (.npz, as pbe eval takes): log QS too

    data: DataConfig = field(default_factory=DataConfig)  # sample construction (pbe.train.data)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accumulation", "epochs", "log_every", "checkpoint_every"):
            _check(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        for name in ("warmup_steps", "validate_every", "validation_samples", "workers"):
            _check(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        _check("seed", self.seed, lambda v: isinstance(v, int) and 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")
        _check("max_steps", self.max_steps, lambda v: v is None or isinstance(v, int) and v >= 1, "an integer >= 1")
        _check("lr", self.lr, lambda v: math.isfinite(v) and v > 0, "a number > 0")
        _check("weight_decay", self.weight_decay, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
        _check("warmup_start", self.warmup_start, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
        _check("adam_betas", self.adam_betas, lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
               "two numbers in [0, 1)")
        _check("uncond_prob", self.uncond_prob, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
        _check("max_grad_norm", self.max_grad_norm, lambda v: v is None or v > 0, "a number > 0")
        _check("ema_decay", self.ema_decay, lambda v: v is None or 0 < v < 1, "a number in (0, 1)")
        _check("lora_rank", self.lora_rank, lambda v: v is None or isinstance(v, int) and v >= 1, "an integer >= 1")
        _check("lora_alpha", self.lora_alpha, lambda v: v is None or math.isfinite(v) and v > 0, "a number > 0")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ValueError("lora_alpha: given without lora_rank; set lora_rank to train a LoRA")
        _check("precision", self.precision, lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}")
        _check("init", self.init, lambda v: v in INITS, f"one of {', '.join(INITS)}")
        _check("strategy", self.strategy, lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}")
        try:  # the painting options' checks, the sampler's step limit included: refused now, not at the first grid
            options = self.validation_options
            options.check_run(options.make_scheduler())
        except OptionError as err:
            raise ValueError(str(err.relabeled(lambda name: f"validation_{name}"))) from None
        if self.init == "stable-diffusion" and (self.sd_checkpoint is None or self.clip_checkpoint is None):
            raise ValueError("init: 'stable-diffusion' needs sd_checkpoint and clip_checkpoint "
                             f"(got {self.sd_checkpoint!r} and {self.clip_checkpoint!r})")
        if self.validation_mixture is not None and self.validation_clip is None:
            raise ValueError("validation_mixture: given without validation_clip (QS scores CLIP features)")
        if self.strategy == "fsdp" and self.lora_rank is not None:
            raise ValueError("strategy: 'fsdp' shards the whole UNet for full fine-tuning; a LoRA trains too few "
                             "weights to need it: use 'ddp' (or 'auto') with lora_rank")

    @property
    def validation_options(self) -> PaintOptions:
        """How the validation grids are painted: the official sampler (PNDM, official config), ``validation_steps``
        steps, guidance ``validation_guidance``."""
        return PaintOptions(steps=self.validation_steps, guidance=self.validation_guidance)

    @property
    def lora_effective_alpha(self) -> float | None:
        """The LoRA alpha in effect: ``lora_alpha``, or the rank (scale 1) when not given."""
        if self.lora_rank is None:
            return None
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)


def _check(name: str, value: Any, ok: Any, expected: str) -> None:
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


# ---- reading a config: file, then flags ---------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(name: str, value: Any, hint: Any) -> Any:
    """``value`` (from JSON, TOML or a flag's text) as the field's type; ValueError naming the field otherwise."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if hint is Path:
            if not isinstance(value, (str, Path)):
                raise ValueError
            return Path(value)
        if typing.get_origin(hint) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            if len(items) != len(args):
                raise ValueError
            return tuple(_convert(name, item, a) for item, a in zip(items, args))
    except (TypeError, ValueError):
        expected = f"{_type_name(hint)}{' or none' if optional else ''}"
        raise ValueError(f"{name}: expected {expected}, got {value!r}") from None
    raise AssertionError(f"{name}: no conversion for {hint}")  # a field type this module does not know yet


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"{len(typing.get_args(hint))} comma-separated numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}[hint]


def _data_config(raw: Any, origin: str) -> DataConfig:
    if isinstance(raw, DataConfig):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"{origin}data: expected a table of data settings, got {raw!r}")
    hints = _hints(DataConfig)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ValueError(f"{origin}data: unknown key(s) {', '.join(unknown)}; known: {', '.join(hints)}")
    return DataConfig(**{k: _convert(f"data.{k}", v, hints[k]) for k, v in raw.items()})


def config_from_dict(raw: dict[str, Any], *, base: TrainConfig | None = None, origin: str = "") -> TrainConfig:
    """``base`` (default: the paper's recipe) with the fields in ``raw`` replaced; ``data`` may be a dict of some
    DataConfig fields (the others keep ``base``'s). Unknown keys are refused by name (a misspelt key would silently
    train something else)."""
    base = base or TrainConfig()
    hints = _hints(TrainConfig)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ValueError(f"{origin}unknown key(s) {', '.join(unknown)}; known: {', '.join(hints)}")
    values = {}
    for name, value in raw.items():
        if name == "data":
            if isinstance(value, dict):  # the data fields not given keep base's values
                value = dataclasses.asdict(base.data) | value
            values[name] = _data_config(value, origin)
        else:
            values[name] = _convert(name, value, hints[name])
    return dataclasses.replace(base, **values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw settings of a JSON (``.json``) or TOML (``.toml``) file; ValueError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    try:
        if path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raise ValueError(f"{path}: expected a .json or .toml config file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()} ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    return raw


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The paper's recipe, replaced by the settings of ``path`` (JSON or TOML; None: none), then by ``overrides``
    (field name -> value; ``"data.FIELD"`` or a ``data`` dict for the data fields). Unknown keys and bad values are
    refused with a ValueError naming them."""
    config = TrainConfig()
    if path is not None:
        config = config_from_dict(read_config_file(path), origin=f"{path}: ")
    overrides = dict(overrides or {})
    data = {k.removeprefix("data."): overrides.pop(k) for k in list(overrides) if k.startswith("data.")}
    if data:
        overrides["data"] = {**overrides.get("data", {}), **data}
    return config_from_dict(overrides, base=config) if overrides else config


# ---- the flags of `pbe train` -------------------------------------------------------------------------------------


def config_flags() -> dict[str, tuple[str, Any, Any]]:
    """Every config field as a ``pbe train`` flag: ``--FIELD`` (underscores as dashes), ``--data-FIELD`` for the data
    fields. Returns flag -> (dotted field name, type hint, default)."""
    flags = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "data":
            for d in dataclasses.fields(DataConfig):
                flags[f"--data-{d.name.replace('_', '-')}"] = (f"data.{d.name}", _hints(DataConfig)[d.name],
                                                               getattr(DataConfig(), d.name))
        else:
            flags[f"--{f.name.replace('_', '-')}"] = (f.name, _hints(TrainConfig)[f.name],
                                                     getattr(TrainConfig(), f.name))
    return flags


def convert_flag(name: str, text: str) -> Any:
    """A flag's text as its field's type (ValueError naming the field otherwise)."""
    owner, _, field_name = name.rpartition(".")
    hints = _hints(DataConfig if owner == "data" else TrainConfig)
    return _convert(name, text, hints[field_name])


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class's source (``name: type = default  # comment``): the flags' help."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen application): help without the comments
        return {}
    found = re.findall(r"^    (\w+): [^#\n]+#\s*(.+)$", source, flags=re.MULTILINE)
    return dict(found)


def describe(name: str, hint: Any, default: Any) -> str:
    """A flag's help: the field's comment, its type and default."""
    owner, _, field_name = name.rpartition(".")
    comment = field_comments(DataConfig if owner == "data" else TrainConfig).get(field_name, "")
    args = typing.get_args(hint)
    inner = next((a for a in args if a is not type(None)), hint) if type(None) in args else hint
    default_text = ",".join(map(str, default)) if isinstance(default, tuple) else default
    kind = "" if inner is bool else f"{_type_name(inner)}{' or none' if type(None) in args else ''}, "
    return f"{comment} ({kind}default {default_text})".replace("%", "%%")
