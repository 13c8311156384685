"""What every scheduler shares: diffusers-style configs, the training noise schedule, timestep spacing, sigmas.

A scheduler object holds its configuration only. `scheduler.start(n)` returns a `Run`: the timesteps of one
generation of n steps and what that generation accumulates (step index, multistep history), so one scheduler can
serve any number of generations at once, from any number of threads.

Notation: alpha_bar_t = prod_{s <= t} (1 - beta_s) (diffusers' `alphas_cumprod`), x_t = sqrt(alpha_bar_t) x_0 +
sqrt(1 - alpha_bar_t) eps, and sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise-to-signal ratio of Karras
et al. (arXiv 2206.00364), in which x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from ..model.noise import Generators, randn

Timestep = int | float | torch.Tensor  # a python number or a 0-d tensor taken from `run.timesteps`
S = TypeVar("S", bound="Scheduler")

_SCHEDULE_DEFAULTS = {  # diffusers' defaults for the training schedule, shared by every class
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


class SchedulerConfig(dict):
    """A read-only diffusers scheduler config: `config["beta_end"]` or `config.beta_end`.

    Holds `_class_name`, every key of the class's diffusers `__init__`, `_use_default_values` (the keys that were not
    given, as diffusers records them) and any other key of the source config (kept, as diffusers keeps them, for
    building a compatible scheduler from this config later).
    """

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a scheduler config is read-only; build a new scheduler with from_config({**config, ...})")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]


class Scheduler:
    """Base class: a diffusers-compatible config, the training schedule, and `start` for a run.

    Subclasses declare `DEFAULTS` (their diffusers class's `__init__` defaults, in the same order) and `IMPLEMENTED`
    (keys whose other values pbe refuses, with the values it implements), and build a `Run`.

    Attributes:
        config: the full config (a `SchedulerConfig`).
        alphas_cumprod: alpha_bar_t for t = 0 .. T-1, float32 on the CPU.
        order: model evaluations per step, 1 for every sampler here (diffusers' meaning, for progress bars).
    """

    name: ClassVar[str]  # pbe's name: "pndm", "dpmpp-2m", ...
    diffusers_name: ClassVar[str]  # the diffusers class this equals
    DEFAULTS: ClassVar[dict[str, Any]]
    IMPLEMENTED: ClassVar[dict[str, tuple[Any, ...]]]
    order: ClassVar[int] = 1

    def __init__(self, **config: Any) -> None:
        """Build from diffusers `__init__` keyword arguments; keys not given take the diffusers class's default."""
        self.config = self._make_config(config, hidden={})
        self.alphas_cumprod = alphas_cumprod(self.config)

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any], **overrides: Any) -> S:
        """Build from another scheduler's config exactly as diffusers 0.42.1's `Cls.from_config(config, **overrides)`:
        a key of this class present in `config` and not listed in `config["_use_default_values"]` is carried over, every
        other key takes THIS class's default, and `overrides` win."""
        used_defaults = set(config.get("_use_default_values", ()))
        source = {k: v for k, v in config.items() if k not in used_defaults and k != "_use_default_values"}
        given = {k: v for k, v in source.items() if k in cls.DEFAULTS} | overrides
        hidden = {k: v for k, v in source.items() if k not in given}
        self = cls.__new__(cls)
        self.config = cls._make_config(given, hidden=hidden)
        self.alphas_cumprod = alphas_cumprod(self.config)
        return self

    @classmethod
    def _make_config(cls, given: Mapping[str, Any], *, hidden: Mapping[str, Any]) -> SchedulerConfig:
        unknown = sorted(set(given) - set(cls.DEFAULTS))
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown config keys {unknown}; valid keys: {', '.join(cls.DEFAULTS)}")
        values = {**cls.DEFAULTS, **given}
        for key, implemented in cls.IMPLEMENTED.items():
            if not any(_same(values[key], value) for value in implemented):
                raise ValueError(f"{cls.__name__}: config key {key!r} = {values[key]!r} is not implemented; "
                                 f"pbe implements {key} = {' or '.join(map(repr, implemented))}")
        if values["trained_betas"] is not None and len(values["trained_betas"]) != values["num_train_timesteps"]:
            raise ValueError(f"{cls.__name__}: trained_betas has {len(values['trained_betas'])} values, expected "
                             f"num_train_timesteps = {values['num_train_timesteps']}")
        used_defaults = [key for key in cls.DEFAULTS if key not in given]
        extra = {k: v for k, v in hidden.items() if k != "_class_name"}
        return SchedulerConfig(_class_name=cls.diffusers_name, **extra, **values,
                               **({"_use_default_values": used_defaults} if used_defaults else {}))

    def start(self, num_inference_steps: int) -> Run:
        """A new run (one generation) of `num_inference_steps` steps: its timesteps and its own state."""
        return self._start(self.check_steps(num_inference_steps))

    def check_steps(self, num_inference_steps: int, *, name: str = "num_inference_steps") -> int:
        """`num_inference_steps` as an int if this sampler, with its config, can run that many steps; else a one-line
        ValueError naming `name` (the CLI passes "--steps"), the value and the step counts it can run.

        Allowed: 1 to num_train_timesteps (diffusers refuses more), except counts for which diffusers would evaluate
        the model at a timestep outside 0 .. T-1 (it crashes, or silently indexes from the end: 1000 steps with
        "leading" spacing and steps_offset 1; "trailing" spacing's extra timestep -1 for some counts), and, for the
        samplers that divide by differences of noise levels (LMS, DPM-Solver, UniPC), counts that give two steps the
        same noise level (diffusers returns NaN or crashes). Computed from the config alone: no model runs.
        """
        n = num_inference_steps
        in_range = (not isinstance(n, bool) and isinstance(n, numbers.Integral)
                    and 1 <= n <= self.config.num_train_timesteps)
        problem = self._steps_problem(int(n)) if in_range else None
        if not in_range or problem is not None:
            raise ValueError(f"{name}: expected an integer {_describe_counts(self.allowed_steps)} for "
                             f"{self._config_summary()}, got {n!r}" + (f": {problem}" if problem else ""))
        return int(n)

    @functools.cached_property
    def allowed_steps(self) -> tuple[int, ...]:
        """Every step count this sampler can run with its config (see `check_steps`), ascending."""
        return tuple(n for n in range(1, self.config.num_train_timesteps + 1) if self._steps_problem(n) is None)

    @property
    def max_steps(self) -> int:
        """The most steps this sampler can run with its config."""
        return self.allowed_steps[-1]

    def _steps_problem(self, n: int) -> str | None:
        """Why n steps (1 <= n <= T) cannot run with this config, or None: overridden by the samplers that have a
        reason."""
        return None

    def _config_summary(self) -> str:
        """The sampler and the config keys that decide its timesteps, as a user would write them."""
        keys = ["timestep_spacing", "steps_offset", "num_train_timesteps"]
        keys += [key for key in ("skip_prk_steps",) if key in self.DEFAULTS]
        keys += [key for key in ("use_karras_sigmas",) if key in self.DEFAULTS and self.config[key]]
        return f"{self.diffusers_name}({', '.join(f'{key}={self.config[key]!r}' for key in keys)})"

    def _start(self, n: int) -> Run:
        raise NotImplementedError

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.config.items() if k in self.DEFAULTS and not _same(v, self.DEFAULTS[k])}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


class Run:
    """One generation: its timesteps, the scale of its starting noise, and `step`, which remembers what it must.

    Call `scale_model_input` and `step` once per timestep, in order: the run checks that `t` is the timestep due.

    Attributes:
        timesteps: the timesteps to evaluate the model at, newest (noisiest) first.
        init_noise_sigma: standard deviation of the starting noise: multiply unit Gaussian noise by it.
        num_inference_steps: the steps asked for (PNDM evaluates one more timestep).
    """

    def __init__(self, scheduler: Scheduler, timesteps: torch.Tensor, *, num_inference_steps: int,
                 init_noise_sigma: float = 1.0) -> None:
        self.scheduler, self.config = scheduler, scheduler.config
        self.timesteps = timesteps
        self.num_inference_steps = num_inference_steps
        self.init_noise_sigma = init_noise_sigma
        self.step_index = 0  # index into `timesteps` of the step due next

    @property
    def max_eta(self) -> float:
        """The largest `eta` every step of this run can take (DDIM's; the others ignore eta: infinity)."""
        return math.inf

    def scale_model_input(self, sample: torch.Tensor, t: Timestep) -> torch.Tensor:
        """The model's input for `sample` at `t` (the sample itself, except for the sigma-space samplers)."""
        self._due(t)
        return sample

    def step(self, model_output: torch.Tensor, t: Timestep, sample: torch.Tensor, *, eta: float = 0.0,
             generator: Generators = None) -> torch.Tensor:
        """The sample at the next timestep, given the model's prediction `model_output` for `sample` at `t`.

        `eta` is DDIM's noise scale (ignored by the others); `generator` serves the samplers that draw noise.
        """
        i = self._due(t)
        prev_sample = self._step(i, model_output, sample, eta=eta, generator=generator)
        self.step_index = i + 1
        return prev_sample

    def _step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, *, eta: float,
              generator: Generators) -> torch.Tensor:
        raise NotImplementedError

    def _due(self, t: Timestep) -> int:
        i = self.step_index
        name = type(self.scheduler).__name__
        if i >= len(self.timesteps):
            raise RuntimeError(f"{name}: all {len(self.timesteps)} timesteps of this run are done; "
                               "start a new run with scheduler.start(num_inference_steps)")
        if float(t) != float(self.timesteps[i]):
            raise ValueError(f"{name}: timestep {float(t)} given, but step {i} of this run is at timestep "
                             f"{float(self.timesteps[i])}; take run.timesteps in order")
        return i


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


# ---- the training noise schedule ----------------------------------------------------------------------------------


def alphas_cumprod(config: Mapping[str, Any]) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), t = 0 .. T-1, for the config's beta schedule.

    Reference quirk: float32 on the CPU, as diffusers computes it (the samplers then combine these float32 values
    in diffusers' op order): a float64 schedule would be more accurate but moves 50-step runs ~3e-6 away from
    diffusers, as much as the float32 rounding of the sample itself.
    """
    T, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config["trained_betas"] is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif config["beta_schedule"] == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float32)
    elif config["beta_schedule"] == "scaled_linear":  # Stable Diffusion's and Paint by Example's
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    else:  # "squaredcos_cap_v2": Nichol & Dhariwal (arXiv 2102.09672) eq. 17, beta capped at 0.999
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                             dtype=torch.float32)
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (arXiv 2305.08891), Algorithm 1:
    shift and scale sqrt(alpha_bar) so that it is unchanged at t = 0 and exactly 0 (pure noise) at t = T-1."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def spaced_timesteps(config: Mapping[str, Any], n: int) -> np.ndarray:
    """n timesteps over 0 .. T-1, newest first, float64 (each sampler rounds or casts as its diffusers class does).

    "linspace": evenly from T-1 down to 0 (fractional); "leading": every (T // n)-th step from 0, plus steps_offset;
    "trailing": evenly from T-1 down, T/n apart, rounded (Lin et al., arXiv 2305.08891, Table 2).
    """
    T = config["num_train_timesteps"]
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + config["steps_offset"]
    return np.round(np.arange(T, 0, -T / n)) - 1  # "trailing"


def timesteps_problem(timesteps: np.ndarray, num_train_timesteps: int) -> str | None:
    """Why a run's timesteps cannot run (one outside the training timesteps 0 .. T-1), or None."""
    outside = timesteps[(timesteps < 0) | (timesteps > num_train_timesteps - 1)]
    if len(outside):
        return f"it would evaluate the model at timestep {outside[0]:g}, outside 0 to {num_train_timesteps - 1}"
    return None


def sigmas_problem(timesteps: np.ndarray, sigmas: np.ndarray) -> str | None:
    """Why a run's sigmas cannot run a sampler that divides by their differences (two equal ones), or None."""
    same = np.flatnonzero(np.diff(sigmas) >= 0)
    if len(same):
        i = same[0]
        return (f"timesteps {timesteps[i]:g} and {timesteps[i + 1]:g} would have the same noise level (the sampler "
                f"divides by its change)")
    return None


def _describe_counts(counts: tuple[int, ...]) -> str:
    """'from 1 to 999', or with the gaps: 'from 1 to 1000 except 61, 103 (and 5 more)'."""
    if not counts:
        return "(none: this config leaves no step count that runs)"
    low, high = counts[0], counts[-1]
    missing = sorted(set(range(low, high + 1)) - set(counts))
    text = f"from {low} to {high}"
    if missing:
        text += " except " + ", ".join(map(str, missing[:6])) + (f" (and {len(missing) - 6} more)"
                                                                  if len(missing) > 6 else "")
    return text


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0 .. T-1, float32 as diffusers computes them."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def sigmas_at(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps, linearly interpolated between training steps (float64)."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (arXiv 2206.00364) eq. 5: n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigma: np.ndarray, train: np.ndarray) -> np.ndarray:
    """The fractional timestep whose sigma is `sigma`: linear interpolation of log sigma between training steps."""
    log_train = np.log(train)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    # Index of the last training step with log sigma <= log_sigma (the table increases with t), kept < T-1.
    low = np.cumsum(log_sigma - log_train[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def noise_like(like: torch.Tensor, generator: Generators, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fresh N(0, 1) noise shaped like `like`, drawn by pbe's one rule (`pbe.model.noise.randn`)."""
    return randn(like.shape, generator=generator, device=like.device, dtype=dtype or like.dtype)
