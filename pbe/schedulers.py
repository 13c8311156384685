"""Noise schedulers for Paint by Example: PNDM (the official one), DDIM and LMS.

A scheduler turns the UNet's noise prediction eps(x_t, t) into the previous, less noisy sample. These three equal
diffusers 0.42.1's `PNDMScheduler`, `DDIMScheduler` and `LMSDiscreteScheduler` as Paint by Example configures them
(scaled-linear betas, epsilon prediction, "leading" timesteps with `steps_offset` 1) and are no more general.

    DDIM: Song et al., "Denoising Diffusion Implicit Models", arXiv 2010.02502, eq. (12).
    PNDM: Liu et al., "Pseudo Numerical Methods for Diffusion Models on Manifolds", arXiv 2202.09778, the transfer
          of eq. (9) driven by a linear multistep (PLMS) noise estimate, without the Runge-Kutta warm-up.
    LMS:  the probability-flow ODE dx/dsigma = eps in the variable x = x_t / sqrt(alpha_bar_t) (Karras et al.,
          arXiv 2206.00364), integrated with a 4th-order linear multistep method as in k-diffusion's `sample_lms`.

Notation: alpha_bar_t = prod_{s <= t} (1 - beta_s) (diffusers' `alphas_cumprod`), so the forward process is
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

Driving one in your own loop (what the pipeline does):

    sched = make_scheduler("pndm")
    timesteps = sched.set_timesteps(50)
    x = torch.randn(shape, generator=g) * sched.init_noise_sigma
    for t in timesteps:
        eps = unet(sched.scale_model_input(x, t), t, ...)
        x = sched.step(eps, t, x, eta=0.0, generator=g)

A scheduler instance serves ONE generation at a time: PNDM and LMS remember the noise predictions of the current
run, and `set_timesteps` starts a new run by clearing them. Use one instance per concurrent generation.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from .model.noise import randn

Timestep = int | torch.Tensor  # a python int or a 0-d tensor taken from `scheduler.timesteps`
S = TypeVar("S", bound="Scheduler")


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule. The defaults are the official `scheduler/scheduler_config.json` values."""

    num_train_timesteps: int = 1000  # T: the training process runs over t = 0 .. T-1
    beta_start: float = 0.00085  # beta_0: noise variance added by the first training step
    beta_end: float = 0.012  # beta_{T-1}; betas are "scaled linear": linspace(sqrt(start), sqrt(end), T) ** 2
    steps_offset: int = 1  # added to every "leading" timestep: 50 steps sample t = 981, ..., 21, 1 (not 980, ..., 0)

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")


# diffusers config keys whose value Paint by Example never varies, with the one value pbe implements. A config that
# asks for another value is refused (rather than silently sampled differently); each scheduler checks only the keys
# it would read (`Scheduler._options`), and every key not named here or in ScheduleConfig is ignored.
_FIXED_OPTIONS: dict[str, Any] = {
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "set_alpha_to_one": False,  # DDIM, PNDM: the last step goes to alpha_bar_0, not to 1
    "skip_prk_steps": True,  # PNDM: no Runge-Kutta warm-up
    "clip_sample": False,  # DDIM
    "thresholding": False,  # DDIM
    "rescale_betas_zero_snr": False,  # DDIM
    "use_karras_sigmas": False,  # LMS
    "use_exponential_sigmas": False,  # LMS
    "use_beta_sigmas": False,  # LMS
}
_COMMON_OPTIONS = ("beta_schedule", "trained_betas", "prediction_type", "timestep_spacing")


def _alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) with beta = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2.

    Reference quirk: float32 on the CPU, as diffusers computes it, and the steps below combine these float32 values
    in diffusers' op order, although float64 would be more accurate: the float32 product drifts up to 9.3e-7
    (relative) from the float64 one, and 1 - alpha_bar_0 loses 2.6e-5 to cancellation. A float64 schedule moves
    50-100 step runs up to ~3e-6 of the sample's scale away from diffusers, which is as large as the float32
    rounding of the sample itself, so only the same float32 arithmetic gives parity (DDIM and PNDM: bit for bit).
    """
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class Scheduler:
    """What the three schedulers share: the schedule, config parsing, "leading" timesteps, the interface.

    Attributes:
        config: the training schedule.
        alphas_cumprod: alpha_bar_t for t = 0 .. T-1, float32 on the CPU.
        timesteps: the timesteps of the current run, newest first (None until `set_timesteps`).
        num_inference_steps: the steps requested from `set_timesteps` (None until then).
        init_noise_sigma: standard deviation of the initial noise (multiply unit Gaussian noise by it).
        order: model evaluations per step; 1 for all three (diffusers' meaning, used only for progress bars).
    """

    order: ClassVar[int] = 1
    _options: ClassVar[tuple[str, ...]] = ()  # the _FIXED_OPTIONS keys this scheduler reads, beyond the common ones

    def __init__(self, config: ScheduleConfig = ScheduleConfig()) -> None:
        self.config = config
        self.alphas_cumprod = _alphas_cumprod(config)
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    @classmethod
    def from_config(cls: type[S], cfg: Mapping[str, Any]) -> S:
        """Build from a diffusers scheduler config dict (e.g. the hub's `scheduler/scheduler_config.json`).

        Keys of ScheduleConfig are taken; missing ones keep the official defaults. A key with a value pbe does not
        implement (say `prediction_type="v_prediction"`) raises ValueError naming it; keys this scheduler does not
        use (`_class_name`, `_diffusers_version`, another scheduler's options) are ignored, so a PNDM config builds
        a DDIM or LMS scheduler with the same betas and offset.

        Note: diffusers' own LMSDiscreteScheduler defaults to "linspace" spacing when `timestep_spacing` is absent;
        here it is "leading", as when diffusers builds LMS from a loaded PNDM scheduler's config (which holds
        PNDM's default "leading").
        """
        for key in _COMMON_OPTIONS + cls._options:
            expected = _FIXED_OPTIONS[key]
            if key in cfg and not (cfg[key] is None if expected is None else cfg[key] == expected):
                raise ValueError(
                    f"{cls.__name__}: config key {key!r} = {cfg[key]!r} is not implemented; "
                    f"pbe implements only {key}={expected!r} (the official Paint by Example value)"
                )
        fields = {f.name: cfg[f.name] for f in dataclasses.fields(ScheduleConfig) if f.name in cfg}
        return cls(ScheduleConfig(**fields))

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: 1, as x_T ~ N(0, I) (LMS differs)."""
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Choose the timesteps of a run of `num_inference_steps` steps (also stored as `self.timesteps`) and
        start a new run: the history of the previous one is cleared."""
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, numbers.Integral) or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be an integer from 1 to num_train_timesteps={T}, got {num_inference_steps!r}"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = self._make_timesteps()
        self._reset()
        return self.timesteps

    def scale_model_input(self, sample: torch.Tensor, t: Timestep) -> torch.Tensor:
        """The UNet's input for `sample` at `t`: `sample` itself, except for LMS."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The previous (less noisy) sample, given the predicted noise `model_output` for `sample` at `t`."""
        raise NotImplementedError

    # ---- helpers for the subclasses ----

    @property
    def _stride(self) -> int:
        """Training steps between two inference steps."""
        return self.config.num_train_timesteps // self._require_run()

    def _leading_timesteps(self) -> torch.Tensor:
        """Timesteps with "leading" spacing: every (T // n)-th training step from 0, plus steps_offset, newest first."""
        n = self._require_run()
        return torch.arange(n - 1, -1, -1, dtype=torch.int64) * self._stride + self.config.steps_offset

    def _make_timesteps(self) -> torch.Tensor:
        return self._leading_timesteps()

    def _reset(self) -> None:
        """Forget the history of the previous run (nothing to forget for a one-step method)."""

    def _require_run(self) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) first")
        return self.num_inference_steps

    def _alpha_bar_prev(self, prev_t: int) -> torch.Tensor:
        # Reference quirk: the step past t = 0 lands on alpha_bar_0, not on 1 (set_alpha_to_one=False), so the
        # result keeps the small noise level of training step 0.
        return self.alphas_cumprod[prev_t] if prev_t >= 0 else self.alphas_cumprod[0]


class DDIMScheduler(Scheduler):
    """DDIM: deterministic for eta = 0; eta = 1 adds as much fresh noise as DDPM ancestral sampling."""

    _options = ("set_alpha_to_one", "clip_sample", "thresholding", "rescale_betas_zero_snr")

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM step t -> t - T/n (Song et al. 2020, eq. 12). Noise for eta > 0 is drawn from `generator`
        with the same call as diffusers, so a seed gives the same draws."""
        t = int(t)
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self._alpha_bar_prev(t - self._stride)
        beta_t = 1 - alpha_t
        # x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        pred_x0 = (sample - beta_t ** (0.5) * model_output) / alpha_t ** (0.5)
        # sigma_t^2 = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev), scaled by eta
        variance = ((1 - alpha_prev) / beta_t) * (1 - alpha_t / alpha_prev)
        std_dev = eta * variance ** (0.5)
        # x_prev = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma_t^2) eps + sigma_t z
        direction = (1 - alpha_prev - std_dev**2) ** (0.5) * model_output
        prev_sample = alpha_prev ** (0.5) * pred_x0 + direction
        if eta > 0:
            prev_sample = prev_sample + std_dev * _noise_like(model_output, generator)
        return prev_sample


class PNDMScheduler(Scheduler):
    """PNDM with linear multistep noise estimates (PLMS), the official Paint by Example sampler."""

    _options = ("set_alpha_to_one", "skip_prk_steps")

    def _make_timesteps(self) -> torch.Tensor:
        leading = self._leading_timesteps()
        # Reference quirk: the second timestep is repeated (981, 961, 961, 941, ..., 1 for 50 steps, so the UNet
        # runs n + 1 times): the first step is taken twice, the second time with a better noise estimate.
        return torch.cat([leading[:2], leading[1:]])

    def _reset(self) -> None:
        self._calls = 0  # step() calls in this run
        self._eps_history: list[torch.Tensor] = []  # the last (up to 4) model outputs used by the multistep rule
        self._first_sample: torch.Tensor | None = None  # x at the first timestep, kept for the warm-up redo

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One PLMS step. `eta` and `generator` are ignored (PNDM is deterministic)."""
        t, stride = int(t), self._stride
        call = self._calls
        self._calls += 1
        if call == 1:
            # Warm-up redo at the repeated timestep: go again from the first sample over the first step
            # (t + stride -> t), now with the mean of the noise predicted at both ends (a Heun-like 2nd-order step).
            eps = (model_output + self._eps_history[-1]) / 2
            return self._transfer(self._first_sample, t + stride, t, eps)
        if call == 0:
            self._first_sample = sample
        e = self._eps_history = self._eps_history[-3:] + [model_output]
        # Adams-Bashforth extrapolation of eps from the history, order 1 to 4 as it fills up
        if len(e) == 1:
            eps = e[-1]
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        return self._transfer(sample, t, t - stride, eps)

    def _transfer(self, sample: torch.Tensor, t: int, prev_t: int, eps: torch.Tensor) -> torch.Tensor:
        """PNDM's transfer x_t -> x_prev for the noise estimate eps (Liu et al. 2022, eq. 9):

            x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) eps / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))

        with a = alpha_bar: the DDIM (eta = 0) step, rationalised so that it never divides by sqrt(1 - a_t).
        """
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self._alpha_bar_prev(prev_t)
        sample_coeff = (alpha_prev / alpha_t) ** (0.5)
        eps_denominator = alpha_t * (1 - alpha_prev) ** (0.5) + (alpha_t * (1 - alpha_t) * alpha_prev) ** (0.5)
        return sample_coeff * sample - (alpha_prev - alpha_t) * eps / eps_denominator


class LMSScheduler(Scheduler):
    """Linear multistep sampling in sigma = sqrt((1 - alpha_bar) / alpha_bar), the noise-to-signal ratio.

    The sampled variable is x = x_t / sqrt(alpha_bar_t) = x_0 + sigma eps, whose probability-flow ODE is
    dx/dsigma = eps(x, sigma); `scale_model_input` turns x back into the x_t the UNet was trained on. Timesteps are
    float32 (as in diffusers) and `sigmas` holds sigma at each timestep plus a final 0.
    """

    _options = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    multistep_order: ClassVar[int] = 4  # how many past derivatives the multistep rule combines

    def _make_timesteps(self) -> torch.Tensor:
        timesteps = self._leading_timesteps().to(torch.float32)
        train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        # sigma at each timestep by linear interpolation over the training steps (exact at integer timesteps;
        # a timestep of T is clamped to sigma_{T-1}), then sigma = 0 at the end: the clean sample.
        sigmas = np.interp(timesteps.numpy(), np.arange(len(train_sigmas)), train_sigmas.numpy())
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        return timesteps

    def _reset(self) -> None:
        self._next_index = 0  # index of the timestep the next step() must be called with
        self._derivatives: list[torch.Tensor] = []  # dx/dsigma at the last (up to 4) timesteps, oldest first

    @property
    def init_noise_sigma(self) -> float:
        # Reference quirk: with "leading" spacing diffusers starts from std sqrt(sigma_max^2 + 1) (the std of
        # x = x_0 + sigma eps for a unit-variance x_0), not sigma_max as with its "linspace" default.
        self._require_run()
        return float((self.sigmas.max() ** 2 + 1) ** 0.5)

    def scale_model_input(self, sample: torch.Tensor, t: Timestep) -> torch.Tensor:
        """x_t = x / sqrt(sigma^2 + 1), since 1 / sqrt(alpha_bar) = sqrt(sigma^2 + 1)."""
        sigma = self.sigmas[self._index(t)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(
        self,
        model_output: torch.Tensor,
        t: Timestep,
        sample: torch.Tensor,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One LMS step sigma_i -> sigma_{i+1}. `eta` and `generator` are ignored (LMS is deterministic)."""
        i = self._index(t)
        if i != self._next_index:
            raise RuntimeError(
                f"LMSScheduler: step() at timestep index {i}, expected {self._next_index}; "
                "take the timesteps in order, and call set_timesteps to start a new run"
            )
        self._next_index += 1
        sigma = self.sigmas[i]
        pred_x0 = sample - sigma * model_output
        # Reference quirk: dx/dsigma = (x - x_0) / sigma is eps itself, but taken the long way round like diffusers
        # so that the rounding is the same.
        derivative = (sample - pred_x0) / sigma
        self._derivatives = self._derivatives[-(self.multistep_order - 1) :] + [derivative]
        # x_{i+1} = x_i + sum_j c_j d_{i-j},  c_j = integral over [sigma_i, sigma_{i+1}] of the Lagrange basis
        # polynomial that is 1 at sigma_{i-j} and 0 at the other history sigmas (order grows 1, 2, 3, 4).
        order = len(self._derivatives)
        nodes = [self.sigmas[i - k].item() for k in range(order)]
        coeffs = [_lagrange_integral(nodes, j, nodes[0], self.sigmas[i + 1].item()) for j in range(order)]
        return sample + sum(c * d for c, d in zip(coeffs, reversed(self._derivatives)))

    def _index(self, t: Timestep) -> int:
        """Position of `t` in this run's timesteps (they are distinct for LMS)."""
        self._require_run()
        matches = (self.timesteps == float(t)).nonzero()
        if len(matches) != 1:
            raise ValueError(f"LMSScheduler: timestep {float(t)} is not one of this run's timesteps")
        return int(matches[0])


def _lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """Integral from a to b of l_j(s) = prod_{m != j} (s - nodes[m]) / (nodes[j] - nodes[m]).

    l_j has degree len(nodes) - 1 <= 3, so expanding it in powers of u = s - a and integrating term by term is exact
    (diffusers integrates numerically with scipy's quad; the results agree to float32 rounding).
    """
    numerator = np.polynomial.Polynomial([1.0])
    denominator = 1.0
    for m, node in enumerate(nodes):
        if m != j:
            numerator = numerator * np.polynomial.Polynomial([a - node, 1.0])  # s - node = u + (a - node)
            denominator *= nodes[j] - node
    return float(numerator.integ()(b - a)) / denominator


def _noise_like(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


SCHEDULERS: dict[str, type[Scheduler]] = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "lms": LMSScheduler}


def make_scheduler(name: str, config: Mapping[str, Any] | None = None) -> Scheduler:
    """The scheduler called `name` ("pndm", "ddim" or "lms", any case), built from a diffusers config dict
    (default: the official values). Any of the three can be built from the official PNDM config."""
    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[key].from_config(config or {})
