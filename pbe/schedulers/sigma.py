"""The sigma-space samplers: LMS, Euler and Euler ancestral, equal to diffusers 0.42.1's LMSDiscreteScheduler,
EulerDiscreteScheduler and EulerAncestralDiscreteScheduler.

They integrate the probability-flow ODE of Karras et al. (arXiv 2206.00364, eq. 4 with sigma(t) = t):
in the variable x = x_t / sqrt(alpha_bar_t) = x_0 + sigma eps, it reads dx/dsigma = (x - x_0(x, sigma)) / sigma,
which is the predicted noise eps. `scale_model_input` turns x back into the x_t the model was trained on
(x_t = x / sqrt(sigma^2 + 1)). Timesteps are float32, and `sigmas` holds sigma at each timestep plus a final 0.

    LMS:   4th-order linear multistep, as k-diffusion's `sample_lms` (coefficients: exact Lagrange integrals).
    Euler: Karras et al. Algorithm 2 without churn (the first-order step of eq. 4).
    Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up back up to sigma_next
          (k-diffusion's `sample_euler_ancestral`, eta = 1), so each step draws noise from the generator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..model.noise import Generators
from .base import (
    _SCHEDULE_DEFAULTS, BETA_SCHEDULES, SPACINGS, Run, Scheduler, karras_sigmas, noise_like, sigma_to_t, sigmas_at,
    sigmas_problem, spaced_timesteps, timesteps_problem, train_sigmas,
)

LMS_ORDER = 4  # how many past derivatives the LMS rule combines


class _SigmaScheduler(Scheduler):
    """Timesteps and sigmas of the sigma-space samplers (diffusers' shared `set_timesteps`)."""

    _run: type[SigmaRun]
    _divides_by_sigma_steps: bool = False  # LMS: its Lagrange coefficients divide by differences of sigmas

    def _start(self, n: int) -> Run:
        timesteps = spaced_timesteps(self.config, n).astype(np.float32)
        train = train_sigmas(self.alphas_cumprod)
        sigmas = sigmas_at(timesteps, train)
        if self.config.get("use_karras_sigmas", False):
            # Karras et al. eq. 5 between the spaced run's own end points, then the timesteps of those sigmas.
            sigmas = karras_sigmas(sigmas[0].item(), sigmas[-1].item(), n)
            timesteps = sigma_to_t(sigmas, train)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        sigma_max = sigmas.max()
        # Reference quirk: "leading" runs start from std sqrt(sigma_max^2 + 1) (the std of x_0 + sigma eps for a
        # unit-variance x_0), the others from sigma_max.
        init = sigma_max if self.config.timestep_spacing != "leading" else (sigma_max**2 + 1) ** 0.5
        return self._run(self, torch.from_numpy(timesteps.astype(np.float32)), num_inference_steps=n,
                         init_noise_sigma=float(init), sigmas=sigmas)

    def _steps_problem(self, n: int) -> str | None:
        timesteps = spaced_timesteps(self.config, n).astype(np.float32)
        sigmas = sigmas_at(timesteps, train_sigmas(self.alphas_cumprod))
        if self.config.get("use_karras_sigmas", False):
            # The model runs at the timesteps of the Karras sigmas, which lie inside the training range; these are
            # distinct unless the spaced run's end points share a sigma.
            if n == 1 or not self._divides_by_sigma_steps:
                return None
            return sigmas_problem(timesteps[[0, -1]], sigmas[[0, -1]])
        problem = timesteps_problem(timesteps, self.config.num_train_timesteps)
        if problem is None and self._divides_by_sigma_steps:
            problem = sigmas_problem(timesteps, sigmas)
        return problem


class SigmaRun(Run):
    def __init__(self, *args: Any, sigmas: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sigmas = sigmas  # sigma at each timestep, then 0

    def scale_model_input(self, sample: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """x_t = x / sqrt(sigma^2 + 1), since 1 / sqrt(alpha_bar) = sqrt(sigma^2 + 1)."""
        sigma = self.sigmas[self._due(t)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def _pred_x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_0 from the model's prediction: x - sigma eps, or from v (Salimans & Ho, arXiv 2202.00512) in x units."""
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.config.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        return model_output  # "sample"

    def _derivative(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """dx/dsigma of the probability-flow ODE (Karras et al. eq. 3): d = (x - x_0) / sigma."""
        return (sample - self._pred_x0(model_output, sample, sigma)) / sigma


class LMSRun(SigmaRun):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.derivatives: list[torch.Tensor] = []  # dx/dsigma at the last (up to 4) timesteps, oldest first

    def _step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, *, eta: float,
              generator: Generators) -> torch.Tensor:
        """x_{i+1} = x_i + sum_j c_j d_{i-j},  c_j = integral over [sigma_i, sigma_{i+1}] of the Lagrange basis
        polynomial that is 1 at sigma_{i-j} and 0 at the other history sigmas (the order grows 1, 2, 3, 4)."""
        sigma = self.sigmas[i]
        # Reference quirk: d = (x - x_0) / sigma (eps itself for epsilon prediction) the long way round, as diffusers.
        derivative = self._derivative(model_output, sample, sigma)
        self.derivatives = self.derivatives[-(LMS_ORDER - 1):] + [derivative]
        order = len(self.derivatives)
        nodes = [self.sigmas[i - k].item() for k in range(order)]
        coeffs = [_lagrange_integral(nodes, j, nodes[0], self.sigmas[i + 1].item()) for j in range(order)]
        return sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))


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


class LMSScheduler(_SigmaScheduler):
    """Linear multistep (order 4) in sigma."""

    name = "lms"
    diffusers_name = "LMSDiscreteScheduler"
    DEFAULTS = {
        **_SCHEDULE_DEFAULTS,
        "use_karras_sigmas": False,  # sigmas spaced as Karras et al. eq. 5 (rho = 7) instead of by timestep
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    _run = LMSRun
    _divides_by_sigma_steps = True
    IMPLEMENTED = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": SPACINGS, "use_exponential_sigmas": (False,),
                   "use_beta_sigmas": (False,), "prediction_type": ("epsilon", "sample", "v_prediction")}
    multistep_order = 4  # how many past derivatives the multistep rule combines


class EulerRun(SigmaRun):
    def _step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, *, eta: float,
              generator: Generators) -> torch.Tensor:
        """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i,  d_i = (x_i - x_0) / sigma_i."""
        sample = sample.to(torch.float32)  # Reference quirk: the step runs in float32 whatever the sample's dtype
        sigma = self.sigmas[i]
        prev_sample = sample + self._derivative(model_output, sample, sigma) * (self.sigmas[i + 1] - sigma)
        return prev_sample.to(model_output.dtype)


class EulerScheduler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE (Karras et al. Algorithm 2, no churn): one model call per step."""

    name = "euler"
    diffusers_name = "EulerDiscreteScheduler"
    DEFAULTS = {
        **_SCHEDULE_DEFAULTS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    _run = EulerRun
    IMPLEMENTED = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": SPACINGS, "interpolation_type": ("linear",),
                   "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "sigma_min": (None,),
                   "sigma_max": (None,), "timestep_type": ("discrete",), "rescale_betas_zero_snr": (False,),
                   "final_sigmas_type": ("zero",), "prediction_type": ("epsilon", "sample", "v_prediction")}


class EulerAncestralRun(SigmaRun):
    def _step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, *, eta: float,
              generator: Generators) -> torch.Tensor:
        """sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2,  sigma_down^2 = sigma_next^2 - sigma_up^2;
        x_{i+1} = x_i + (sigma_down - sigma) d_i + sigma_up z,  z ~ N(0, I) from `generator` (every step, the last
        one included, whose sigma_up is 0: diffusers draws it too)."""
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.to(torch.float32)  # Reference quirk: the step runs in float32 whatever the sample's dtype
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        prev_sample = sample + self._derivative(model_output, sample, sigma) * (sigma_down - sigma)
        prev_sample = prev_sample + noise_like(model_output, generator) * sigma_up
        return prev_sample.to(model_output.dtype)


class EulerAncestralScheduler(_SigmaScheduler):
    """Euler ancestral: a deterministic Euler step to sigma_down, then fresh noise up to sigma_{i+1}."""

    name = "euler-ancestral"
    diffusers_name = "EulerAncestralDiscreteScheduler"
    DEFAULTS = {
        **_SCHEDULE_DEFAULTS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    _run = EulerAncestralRun
    IMPLEMENTED = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": SPACINGS, "rescale_betas_zero_snr": (False,),
                   "prediction_type": ("epsilon", "v_prediction")}