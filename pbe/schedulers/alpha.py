"""The alpha_bar-space samplers: DDIM and PNDM (PLMS), equal to diffusers 0.42.1's DDIMScheduler and PNDMScheduler.

    DDIM: Song et al., "Denoising Diffusion Implicit Models", arXiv 2010.02502, eq. (12).
    PNDM: Liu et al., "Pseudo Numerical Methods for Diffusion Models on Manifolds", arXiv 2202.09778: the transfer of
          eq. (9) driven by a linear multistep (PLMS) noise estimate, without the Runge-Kutta warm-up.

Both step from t to t - T // n whatever the spacing (diffusers' rule), and the step past t = 0 lands on alpha_bar_0
(`set_alpha_to_one=False`, Paint by Example's setting) or on 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..model.noise import Generators
from .base import (
    _SCHEDULE_DEFAULTS, BETA_SCHEDULES, SPACINGS, Run, Scheduler, noise_like, spaced_timesteps, timesteps_problem,
)


class _AlphaRun(Run):
    """What DDIM and PNDM share: alpha_bar at a timestep and the one-step DDIM (eta = 0) transfer."""

    def _alpha_bar(self, t: int) -> torch.Tensor:
        if t >= 0:
            return self.scheduler.alphas_cumprod[t]
        # Reference quirk: the step past t = 0 lands on alpha_bar_0 unless set_alpha_to_one (then on 1, noise-free).
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.scheduler.alphas_cumprod[0]

    @property
    def _stride(self) -> int:
        return self.config.num_train_timesteps // self.num_inference_steps


class DDIMScheduler(Scheduler):
    """DDIM: deterministic for eta = 0; eta = 1 adds as much fresh noise as DDPM ancestral sampling."""

    name = "ddim"
    diffusers_name = "DDIMScheduler"
    DEFAULTS = {
        **_SCHEDULE_DEFAULTS,
        "clip_sample": True,  # clamp the predicted x_0 to [-clip_sample_range, clip_sample_range]
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",  # what the model predicts: "epsilon" (noise), "sample" (x_0), "v_prediction"
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    IMPLEMENTED = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": SPACINGS, "thresholding": (False,),
                   "prediction_type": ("epsilon", "sample", "v_prediction")}

    def _start(self, n: int) -> Run:
        timesteps = torch.from_numpy(spaced_timesteps(self.config, n).round().astype(np.int64))
        return DDIMRun(self, timesteps, num_inference_steps=n)

    def _steps_problem(self, n: int) -> str | None:
        return timesteps_problem(spaced_timesteps(self.config, n).round(), self.config.num_train_timesteps)


class DDIMRun(_AlphaRun):
    @property
    def max_eta(self) -> float:
        """The largest eta for which 1 - alpha_bar_prev - sigma_t^2 >= 0 at every step (else the direction term is the
        square root of a negative number): eta^2 <= (1 - alpha_bar_t) / (1 - alpha_bar_t / alpha_bar_prev)."""
        bounds = []
        for t in self.timesteps.tolist():
            alpha_t, alpha_prev = self._alpha_bar(t), self._alpha_bar(t - self._stride)
            if alpha_t < alpha_prev:  # else the step adds no noise (sigma_t = 0) whatever eta is
                bounds.append(((1 - alpha_t) / (1 - alpha_t / alpha_prev)).item() ** 0.5)
        return min(bounds, default=math.inf)

    def _step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, *, eta: float,
              generator: Generators) -> torch.Tensor:
        """One DDIM step t -> t - T // n (Song et al. 2020, eq. 12); noise for eta > 0 comes from `generator`."""
        t = int(self.timesteps[i])
        alpha_t, alpha_prev = self._alpha_bar(t), self._alpha_bar(t - self._stride)
        beta_t = 1 - alpha_t
        pred_x0, eps = _x0_and_eps(self.config.prediction_type, model_output, sample, alpha_t)
        if self.config.clip_sample:
            pred_x0 = pred_x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        # sigma_t^2 = eta^2 (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        variance = ((1 - alpha_prev) / beta_t) * (1 - alpha_t / alpha_prev)
        std_dev = eta * variance ** (0.5)
        # x_prev = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma_t^2) eps + sigma_t z
        direction = (1 - alpha_prev - std_dev**2) ** (0.5) * eps
        prev_sample = alpha_prev ** (0.5) * pred_x0 + direction
        if eta > 0:
            prev_sample = prev_sample + std_dev * noise_like(model_output, generator)
        return prev_sample


def _x0_and_eps(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
                alpha_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) from the model's prediction, with x_t = sqrt(a) x_0 + sqrt(1 - a) eps and v = sqrt(a) eps -
    sqrt(1 - a) x_0 (Salimans & Ho, arXiv 2202.00512)."""
    beta_t = 1 - alpha_t
    if prediction_type == "epsilon":
        return (sample - beta_t ** (0.5) * model_output) / alpha_t ** (0.5), model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_t ** (0.5) * model_output) / beta_t ** (0.5)
    return (alpha_t**0.5) * sample - (beta_t**0.5) * model_output, (alpha_t**0.5) * model_output + (beta_t**0.5) * sample


class PNDMScheduler(Scheduler):
    """PNDM: linear multistep noise estimates (PLMS), after a Runge-Kutta warm-up unless `skip_prk_steps` (Paint by
    Example skips it)."""

    name = "pndm"
    diffusers_name = "PNDMScheduler"
    DEFAULTS = {
        **_SCHEDULE_DEFAULTS,
        "skip_prk_steps": False,  # True: no Runge-Kutta warm-up (Paint by Example's setting)
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    IMPLEMENTED = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": SPACINGS,
                   "prediction_type": ("epsilon", "v_prediction")}

    def _start(self, n: int) -> Run:
        spaced = spaced_timesteps(self.config, n).round().astype(np.int64)
        if self.config.skip_prk_steps:
            # Reference quirk: the second timestep is repeated (981, 961, 961, 941, ..., 1 for 50 steps, so the
            # model runs n + 1 times): the first step is taken twice, the second time with a better noise estimate.
            timesteps = np.concatenate([spaced[:2], spaced[1:]])
        else:
            # The first three steps by Runge-Kutta, each at t, t - d/2, t - d/2, t - d (d = T // n, halved rounding
            # down), then PLMS from the fourth timestep: n + 9 model calls.
            half = self.config.num_train_timesteps // n // 2
            starts = spaced[:4][::-1]  # the four noisiest timesteps, ascending as diffusers builds them
            prk = (np.repeat(starts, 2) + np.tile([0, half], 4))[:-1]
            prk = np.repeat(prk, 2)[1:-1][::-1]
            timesteps = np.concatenate([prk, spaced[3:]])
        return PNDMRun(self, torch.from_numpy(timesteps.astype(np.int64)), num_inference_steps=n)

    def _steps_problem(self, n: int) -> str | None:
        if not self.config.skip_prk_steps and n < 4:
            return "PNDM's Runge-Kutta warm-up (skip_prk_steps=False) needs at least 4 steps"
        # The Runge-Kutta timesteps lie between the spaced ones: checking these is enough.
        return timesteps_problem(spaced_timesteps(self.config, n).round(), self.config.num_train_timesteps)


class PNDMRun(_AlphaRun):
    PRK_CALLS = 12  # model calls of the Runge-Kutta warm-up: 3 steps of 4

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eps_history: list[torch.Tensor] = []  # the last (up to 4) noise predictions, oldest first
        self.first_sample: torch.Tensor | None = None  # x at the start of the step being (re)taken
        self.rk_sum: torch.Tensor | float = 0  # the Runge-Kutta weighted sum of this step's noise predictions

    def _step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, *, eta: float,
              generator: Generators) -> torch.Tensor:
        """One PLMS (or Runge-Kutta) step (`eta` and `generator` are ignored: PNDM is deterministic)."""
        if not self.config.skip_prk_steps and i < self.PRK_CALLS:
            return self._runge_kutta(i, model_output, sample)
        t, stride = int(self.timesteps[i]), self._stride
        if self.config.skip_prk_steps and i == 1:
            # Warm-up redo at the repeated timestep: go again from the first sample over the first step
            # (t + stride -> t), now with the mean of the noise predicted at both ends (a Heun-like 2nd-order step).
            eps = (model_output + self.eps_history[-1]) / 2
            return self._transfer(self.first_sample, t + stride, t, eps)
        if i == 0:
            self.first_sample = sample
        e = self.eps_history = self.eps_history[-3:] + [model_output]
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

    def _runge_kutta(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Call k = i % 4 of a pseudo Runge-Kutta step from t (Liu et al. 2022, eq. 13): each call transfers the
        step's first sample to the next evaluation point, and the 4th uses eps' = (e1 + 2 e2 + 2 e3 + e4) / 6."""
        k = i % 4
        t = int(self.timesteps[i - k])  # the step's start
        prev_t = int(self.timesteps[i]) - (0 if k % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2)
        if k == 0:
            self.rk_sum = self.rk_sum + 1 / 6 * model_output
            self.eps_history.append(model_output)
            self.first_sample = sample
        elif k in (1, 2):
            self.rk_sum = self.rk_sum + 1 / 3 * model_output
        else:
            model_output, self.rk_sum = self.rk_sum + 1 / 6 * model_output, 0
        return self._transfer(self.first_sample, t, prev_t, model_output)

    def _transfer(self, sample: torch.Tensor, t: int, prev_t: int, eps: torch.Tensor) -> torch.Tensor:
        """PNDM's transfer x_t -> x_prev for the noise estimate eps (Liu et al. 2022, eq. 9):

            x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) eps / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))

        with a = alpha_bar: the DDIM (eta = 0) step, rationalised so that it never divides by sqrt(1 - a_t).
        """
        alpha_t, alpha_prev = self._alpha_bar(t), self._alpha_bar(prev_t)
        if self.config.prediction_type == "v_prediction":
            # Reference quirk: the multistep rule combined v-predictions; turn the result into eps only now.
            eps = (alpha_t**0.5) * eps + ((1 - alpha_t) ** 0.5) * sample
        sample_coeff = (alpha_prev / alpha_t) ** (0.5)
        eps_denominator = alpha_t * (1 - alpha_prev) ** (0.5) + (alpha_t * (1 - alpha_t) * alpha_prev) ** (0.5)
        return sample_coeff * sample - (alpha_prev - alpha_t) * eps / eps_denominator
