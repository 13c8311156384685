"""Noise schedulers (samplers) for Paint by Example, each equal to the diffusers 0.42.1 class it is named after.

| name              | diffusers class                   | model calls per step |
|-------------------|-----------------------------------|----------------------|
| `pndm` (official) | PNDMScheduler                     | 1 (+1 for the first) |
| `ddim`            | DDIMScheduler                     | 1                    |
| `lms`             | LMSDiscreteScheduler              | 1                    |
| `euler`           | EulerDiscreteScheduler            | 1                    |
| `euler-ancestral` | EulerAncestralDiscreteScheduler   | 1                    |
| `dpmpp-2m`        | DPMSolverMultistepScheduler       | 1                    |
| `dpmpp-2m-karras` | the same, `use_karras_sigmas=True`| 1                    |
| `unipc`           | UniPCMultistepScheduler           | 1                    |

A scheduler holds its configuration only; a run holds what one generation accumulates. Driving one yourself:

    sched = make_scheduler("dpmpp-2m")             # built from the official PNDM config, as diffusers' from_config
    run = sched.start(20)
    x = randn(shape, generator=g, device=device, dtype=dtype) * run.init_noise_sigma
    for t in run.timesteps:
        eps = unet(run.scale_model_input(x, t), t, context)
        x = run.step(eps, t, x, generator=g)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .alpha import DDIMScheduler, PNDMScheduler
from .base import Run, Scheduler, SchedulerConfig
from .multistep import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from .sigma import EulerAncestralScheduler, EulerScheduler, LMSScheduler

__all__ = [
    "OFFICIAL_CONFIG", "SCHEDULERS", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralScheduler",
    "EulerScheduler", "LMSScheduler", "PNDMScheduler", "Run", "Scheduler", "SchedulerConfig",
    "UniPCMultistepScheduler", "from_config", "make_scheduler",
]

# The official Fantasy-Studio/Paint-by-Example scheduler/scheduler_config.json as diffusers loads it: the file does not
# hold timestep_spacing, so diffusers lists it in `_use_default_values` and every class built from this config takes
# its own default for it (PNDM and DDIM "leading"; LMS, Euler, DPM-Solver and UniPC "linspace").
OFFICIAL_CONFIG: Mapping[str, Any] = SchedulerConfig(
    _class_name="PNDMScheduler",
    _diffusers_version="0.8.0",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    _use_default_values=["timestep_spacing"],
)

# pbe's name -> (class, config overrides applied on top of the source config)
SCHEDULERS: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "lms": (LMSScheduler, {}),
    "euler": (EulerScheduler, {}),
    "euler-ancestral": (EulerAncestralScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}
_BY_DIFFUSERS_NAME = {cls.diffusers_name: cls for cls, _ in SCHEDULERS.values()}


def make_scheduler(name: str, config: Mapping[str, Any] | None = None) -> Scheduler:
    """The sampler called `name` (see SCHEDULERS, any case) built from another scheduler's config as diffusers'
    `Cls.from_config(config)` builds it: keys absent from `config` or listed in its `_use_default_values` take the
    class's own default. `config` defaults to the official Paint by Example PNDM config (OFFICIAL_CONFIG)."""
    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown name {name!r}; valid names: {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[key]
    return cls.from_config(OFFICIAL_CONFIG if config is None else config, **overrides)


def from_config(config: Mapping[str, Any]) -> Scheduler:
    """The scheduler a saved diffusers config names in `_class_name` (the contents of a `scheduler_config.json`)."""
    class_name = config.get("_class_name")
    if class_name not in _BY_DIFFUSERS_NAME:
        raise ValueError(f"config['_class_name']: expected one of {', '.join(_BY_DIFFUSERS_NAME)}, got {class_name!r}")
    return _BY_DIFFUSERS_NAME[class_name].from_config(config)
