"""The painting options, defined once: ``pbe paint``, ``pbe batch``, ``pbe serve`` and the pipeline all use these.

* ``PaintOptions``: how one picture is painted (sampler, steps, guidance, eta, paste-back, large pictures).
* ``ModelOptions``: what is loaded to paint with (checkpoint, config, dtype, device, LoRA).

Both are frozen dataclasses that check every value when they are built: an ``OptionError`` names the option, the
expected and the actual value. Each field carries, in one place, its default, its check, its help text, its
command-line flag and its name as a keyword of ``PaintByExample.__call__`` (diffusers' ``num_inference_steps`` for
``steps``, ...). From that one table come the command-line flags (``add_arguments``), the options read back from them
(``from_arguments``), the flags of the command that repeats a run (``flags``), the pipeline's keywords
(``pipeline_keywords``) and the schema the web page builds its controls from (``describe``).

Two checks need more than the value: whether the sampler can run that many steps (and DDIM's largest ``eta`` for
them) depends on the sampler's config, which comes with the checkpoint (``PaintOptions.check_run``); whether a device
exists and a dtype runs on it is asked of the machine (``ModelOptions.resolved``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from . import devices, regions
from .checkpoint import DTYPES
from .loading import DEFAULT_REPO
from .schedulers import SCHEDULERS, Scheduler, make_scheduler

Check = Callable[[Any], Any]  # returns the value, normalised (7.0 -> 7 for an int); raises ValueError("expected ...")


class OptionError(ValueError):
    """A painting option with a bad value: ``name`` (the option as the caller's user knows it: ``steps`` for the
    options object, ``--steps`` on the command line, ``num_inference_steps`` in the pipeline) and ``problem``
    ("expected ..., got ..."); or, with ``needs``, an option set without the one it applies with."""

    def __init__(self, name: str, problem: str = "", *, needs: str | None = None) -> None:
        super().__init__(f"{name} only applies with {needs}" if needs else f"{name}: {problem}")
        self.name, self.problem, self.needs = name, problem, needs

    def relabeled(self, label: Callable[[str], str]) -> OptionError:
        """The same error with every option named by ``label(field name)``."""
        return OptionError(label(self.name), self.problem, needs=self.needs and label(self.needs))


# ---- the checks ------------------------------------------------------------------------------------------------------


def _integer(minimum: int, *, multiple: int = 1, what: str = "an integer") -> Check:
    def check(value: Any) -> int:
        whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value < minimum or int(value) % multiple:
            raise ValueError(f"expected {what}, got {value!r}")
        return int(value)
    return check


def _number(*, minimum: float | None = None, what: str = "a finite number") -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
                minimum is not None and value < minimum):
            raise ValueError(f"expected {what}, got {value!r}")
        return float(value)
    return check


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _choice(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()
    return check


def _path(value: Any) -> Path | None:
    if value is None or isinstance(value, Path):
        return value
    if isinstance(value, str) and value:
        return Path(value)
    raise ValueError(f"expected a path, got {value!r}")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty text, got {value!r}")
    return value


def option(default: Any, check: Check, help: str, *, keyword: str | None = None, choices: tuple[str, ...] = (),
           minimum: float | None = None, only_with: str | None = None) -> Any:
    """A field of an options class: its default, its check and its help. ``keyword``: its name as a keyword of
    ``PaintByExample`` (default: the field's name); ``only_with``: the option it applies with (set without it, it is
    refused; the repeat command names it only with it); ``choices``/``minimum``: for the schema and argparse."""
    return field(default=default, metadata={"check": check, "help": help, "keyword": keyword, "choices": choices,
                                            "minimum": minimum, "only_with": only_with})


class _Options:
    """What PaintOptions and ModelOptions share: checking on construction, and the forms the table takes."""

    FLAGS: ClassVar[Mapping[str, str]] = {}  # a field's command-line flag, when it is not --field-name

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            try:
                object.__setattr__(self, spec.name, spec.metadata["check"](getattr(self, spec.name)))
            except ValueError as err:
                raise OptionError(spec.name, str(err)) from None
        for spec in dataclasses.fields(self):
            need = spec.metadata["only_with"]
            if need and getattr(self, spec.name) != spec.default and not getattr(self, need):
                raise OptionError(spec.name, needs=need)

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of the field ``name``."""
        return cls.FLAGS.get(name, "--" + name.replace("_", "-"))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field to ``parser`` (dest: the field's name), with its default and help."""
        for spec in dataclasses.fields(cls):
            meta, flag = spec.metadata, cls.flag(spec.name)
            default_text = "" if spec.default is None else f" (default {_shown(spec.default)})"
            if meta["check"] is _flag:
                parser.add_argument(flag, dest=spec.name, action="store_true", help=meta["help"])
                continue
            kind = Path if meta["check"] is _path else str if spec.default is None else type(spec.default)
            parser.add_argument(flag, dest=spec.name, type=kind, default=spec.default, choices=meta["choices"] or None,
                                help=meta["help"] + default_text)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, **changes: Any) -> Any:
        """The options parsed by ``add_arguments`` (with ``changes``); an OptionError names the flag."""
        values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(cls)} | changes
        try:
            return cls(**values)
        except OptionError as err:
            raise err.relabeled(cls.flag) from None

    def flags(self) -> list[str]:
        """This object as command-line flags: every value written out (defaults too, so the command repeats the run
        whatever later defaults become), a flag that applies only with another one only with it."""
        words: list[str] = []
        for spec in dataclasses.fields(self):
            value, need = getattr(self, spec.name), spec.metadata["only_with"]
            if value is None or value is False or (need and not getattr(self, need)):
                continue
            words += [self.flag(spec.name)] if value is True else [self.flag(spec.name), _shown(value)]
        return words

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """The schema of every field, as JSON: name, type, default, choices, minimum, flag, help."""
        kinds = {_flag: "boolean", _path: "path", _text: "string"}
        out = []
        for spec in dataclasses.fields(cls):
            meta = spec.metadata
            kind = kinds.get(meta["check"]) or (
                "string" if meta["choices"] else "integer" if isinstance(spec.default, int) else "number")
            out.append({"name": spec.name, "type": kind, "default": _json(spec.default),
                        "choices": list(meta["choices"]) or None, "minimum": meta["minimum"],
                        "only_with": meta["only_with"], "flag": cls.flag(spec.name), "help": meta["help"]})
        return out

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (checked like a new object)."""
        return dataclasses.replace(self, **changes)


def _shown(value: Any) -> str:
    """A value as a command-line word that reads back to the same value (floats: shortest exact form)."""
    return repr(value) if isinstance(value, float) else str(value)


def _json(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


# ---- how one picture is painted --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaintOptions(_Options):
    """How one picture is painted; every value checked when the object is built (``OptionError``).

    ``check_run(scheduler)`` adds the checks that need the sampler's config (the step counts it can run, DDIM's
    largest ``eta``). ``pipeline_keywords()`` gives the options as ``PaintByExample.__call__`` keywords.
    """

    scheduler: str = option("pndm", _choice(tuple(SCHEDULERS)), "sampler", choices=tuple(SCHEDULERS))
    steps: int = option(50, _integer(1, what="a positive integer"), "denoising steps",
                        keyword="num_inference_steps", minimum=1)
    guidance: float = option(5.0, _number(), "classifier-free guidance scale; 1 or less turns guidance off",
                             keyword="guidance_scale")
    # DDIM's sigma_t = eta * sqrt(...) is a standard deviation: a negative eta would drop the step's noise yet still
    # shrink its direction term (diffusers computes that without a word).
    eta: float = option(0.0, _number(minimum=0, what="a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like)"),
                        "DDIM's noise per step (the other samplers ignore it)", minimum=0)
    keep_unmasked: bool = option(False, _flag, "paste the input back outside the mask (the model alone shifts its "
                                               "colours slightly)")
    mask_blur: float = option(0.0, _number(minimum=0, what="a radius >= 0"),
                              "with keep-unmasked: feather the seam by this many pixels (0: hard edge)",
                              minimum=0, only_with="keep_unmasked")
    hd_strategy: str = option("crop", _choice(regions.STRATEGIES),
                              "pictures larger than hd-trigger: crop (paint each mask region in a box around it, "
                              "scaled to resolution), resize (paint the whole picture scaled to resolution) or "
                              "original (paint it at its own size: slow, and at a scale the model never saw); crop "
                              "and resize paste the painted part back through the mask", choices=regions.STRATEGIES)
    resolution: int = option(512, _integer(8, multiple=8, what="a positive multiple of 8 (pixels)"),
                             "working size of the longer side with crop and resize, a multiple of 8", minimum=8)
    hd_trigger: int = option(800, _integer(1, what="a positive number of pixels"),
                             "pictures whose longer side is at most this many pixels are painted whole, at their "
                             "own size", minimum=1)
    hd_margin: int = option(128, _integer(0, what="a number of pixels >= 0"),
                            "with crop: pixels of context around each mask region", minimum=0)

    def make_scheduler(self, config: Mapping[str, Any] | None = None) -> Scheduler:
        """The sampler these options name, built from a checkpoint's scheduler config (default: the official one)."""
        return make_scheduler(self.scheduler, config)

    def check_run(self, scheduler: Scheduler, *, label: Callable[[str], str] = str) -> None:
        """Refuse, with an OptionError, a step count ``scheduler`` (with its config) cannot run and an ``eta`` past
        the largest one DDIM can take with that many steps (beyond it diffusers gives NaN). ``label`` turns a field
        name into the caller's name for it (``PaintOptions.flag`` on the command line)."""
        try:
            scheduler.check_steps(self.steps, name="steps")
        except ValueError as err:
            raise OptionError(label("steps"), str(err).partition(": ")[2]) from None
        max_eta = scheduler.start(self.steps).max_eta
        if self.eta > max_eta:
            raise OptionError(label("eta"), f"expected at most {max_eta:.4f} for {scheduler.diffusers_name} with "
                                            f"{self.steps} steps (beyond it a step's noise outweighs its whole noise "
                                            f"budget: the square root of a negative number, NaN), got {self.eta!r}")

    @classmethod
    def keyword(cls, name: str) -> str:
        """The ``PaintByExample.__call__`` keyword of the field ``name`` (``num_inference_steps`` for ``steps``)."""
        return next(spec for spec in dataclasses.fields(cls) if spec.name == name).metadata["keyword"] or name

    def pipeline_keywords(self) -> dict[str, Any]:
        """The options as keywords of ``PaintByExample.__call__`` (``num_inference_steps=``, ...)."""
        return {self.keyword(spec.name): getattr(self, spec.name) for spec in dataclasses.fields(self)}

    @classmethod
    def from_pipeline_keywords(cls, **keywords: Any) -> PaintOptions:
        """The options from ``PaintByExample.__call__``'s keywords; an OptionError names the keyword."""
        names = {cls.keyword(spec.name): spec.name for spec in dataclasses.fields(cls)}
        unknown = sorted(keywords.keys() - names.keys())
        if unknown:
            raise TypeError(f"from_pipeline_keywords: unknown keywords {', '.join(unknown)}; expected some of "
                            f"{', '.join(names)}")
        try:
            return cls(**{names[key]: value for key, value in keywords.items()})
        except OptionError as err:
            raise err.relabeled(cls.keyword) from None


# ---- what is loaded --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOptions(_Options):
    """What is loaded to paint with; ``resolved()`` settles ``auto`` device and dtype and checks they exist here."""

    checkpoint: str = option(DEFAULT_REPO, _text, "hub repo id, hub-layout folder, original model.ckpt or pbe "
                                                  ".safetensors")
    config: Path | None = option(None, _path, "the networks' config, for an original-layout checkpoint of a "
                                              "non-official structure: a pbe config JSON or a hub-layout folder (its "
                                              "unet/, vae/, image_encoder/ config.json)")
    dtype: str = option("auto", _choice(("auto", *sorted(DTYPES))),
                        "network precision; auto: fp16 on a GPU, bf16 on a CPU with bfloat16 instructions "
                        "(AVX-512-BF16, AMX), fp32 on other CPUs", choices=("auto", *sorted(DTYPES)))
    device: str = option("auto", _text, "auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps; "
                                        "under torchrun, auto and cuda mean cuda:LOCAL_RANK")
    lora: Path | None = option(None, _path, "a LoRA file for the UNet: pbe's (pbe train) or diffusers'/peft's "
                                            "(pytorch_lora_weights.safetensors)")
    lora_scale: float = option(1.0, _number(), "with lora: its strength, 1 = as trained, 0 = the base model",
                               only_with="lora")

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) and isinstance(self.checkpoint, Path):
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        super().__post_init__()

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype (``resolved()`` first: ``auto`` has none)."""
        return DTYPES[self.dtype]

    def resolved(self) -> tuple[ModelOptions, str]:
        """``auto`` device and dtype replaced by what they mean on this machine, with the device checked to exist
        and the dtype to run there (OptionError), and the line that says which run it is."""
        try:
            device = devices.resolve_device(self.device)
        except (RuntimeError, ValueError):
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):
            raise OptionError("device", f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OptionError("device", f"no CUDA device is available here (PyTorch {torch.__version__}), got "
                                        f"{self.device!r}")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise OptionError("device", f"only {torch.cuda.device_count()} CUDA device(s) here, got {self.device!r}")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise OptionError("device", f"MPS is not available here, got {self.device!r}")
        choice = f"device {device}{' (auto)' if self.device == 'auto' else ''}"
        if self.dtype == "auto":
            dtype = next(name for name, value in DTYPES.items() if value == devices.default_dtype(device))
            choice += f", dtype {dtype} (auto: the fast precision on {device.type})"
        else:
            dtype = self.dtype
            try:
                devices.check_precision(device, DTYPES[dtype], refuse=True, way_out="use --dtype fp32 (or auto)")
            except ValueError as err:
                raise OptionError("dtype", f"{err}") from None
            choice += f", dtype {dtype}"
        return self.replace(device=str(device), dtype=dtype), choice
