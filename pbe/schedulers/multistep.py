"""The exponential-integrator multistep samplers: DPM-Solver++(2M) and UniPC (order 2, B(h) = e^h - 1), equal to
diffusers 0.42.1's DPMSolverMultistepScheduler and UniPCMultistepScheduler with their defaults.

Both work in lambda = log(alpha / sigma_t), the half log-SNR, where x_t = alpha x_0 + sigma_t eps with
alpha = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma alpha (sigma as in `base`), and both solve the ODE for the data
prediction x_0 (the "++" form): from lambda_s to lambda_t with h = lambda_t - lambda_s,

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_0(x_s)  (+ higher-order terms from earlier x_0's).

    DPM-Solver++(2M): Lu et al., arXiv 2211.01095, Algorithm 2 (multistep second order, first order at the ends).
    UniPC: Zhao et al., arXiv 2302.04867: the UniP-2 predictor (Algorithm 2) plus the UniC corrector, which reuses the
           model call of the new point to correct it (order + 1 for free), B(h) = e^h - 1 ("bh2").

Each step calls the model once; the previous x_0 predictions live in the run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..model.noise import Generators
from .base import (
    _SCHEDULE_DEFAULTS, BETA_SCHEDULES, SPACINGS, Run, Scheduler, karras_sigmas, sigma_to_t, sigmas_at,
    sigmas_problem, spaced_timesteps, timesteps_problem, train_sigmas,
)


class _MultistepScheduler(Scheduler):
    """Timesteps and sigmas of DPM-Solver multistep and UniPC (their `set_timesteps`)."""

    _run: type[MultistepRun]
    _round_karras_timesteps: bool  # DPM-Solver rounds the Karras timesteps except for "squaredcos_cap_v2"; UniPC always

    def _spaced(self, n: int) -> np.ndarray:
        if self.config.timestep_spacing == "trailing":
            timesteps = spaced_timesteps(self.config, n)
        else:
            # Reference quirk: n + 1 points from T-1 (or the leading grid) down to 0, and the last one (t ~ 0) dropped.
            timesteps = spaced_timesteps(self.config, n + 1)[:-1]
        return timesteps.round().astype(np.int64)

    def _steps_problem(self, n: int) -> str | None:
        if self.config.use_karras_sigmas:
            return None  # Karras sigmas over the whole training range: distinct, at timesteps inside it
        timesteps = self._spaced(n)
        return (timesteps_problem(timesteps, self.config.num_train_timesteps)
                or sigmas_problem(timesteps, sigmas_at(timesteps, train_sigmas(self.alphas_cumprod))))

    def _start(self, n: int) -> Run:
        timesteps = self._spaced(n)
        train = train_sigmas(self.alphas_cumprod)
        if self.config.use_karras_sigmas:
            # Karras et al. (arXiv 2206.00364) eq. 5 over the whole training range, then the nearest timesteps.
            sigmas = karras_sigmas(train[-1].item(), train[0].item(), n)
            timesteps = sigma_to_t(sigmas, train)
            if self._round_karras_timesteps or self.config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = sigmas_at(timesteps, train)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        return self._run(self, torch.from_numpy(timesteps.astype(np.int64)), num_inference_steps=n, sigmas=sigmas)


class MultistepRun(Run):
    def __init__(self, *args: Any, sigmas: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sigmas = sigmas  # sigma at each timestep, then 0
        self.x0_history: list[torch.Tensor] = []  # the data predictions of the last steps, oldest first

    def _alpha_sigma_lambda(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t and lambda_t = log alpha_t - log sigma_t at timestep index i (float32, as diffusers)."""
        alpha = 1 / ((self.sigmas[i] ** 2 + 1) ** 0.5)
        sigma = self.sigmas[i] * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def _pred_x0(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The data prediction x_0 at timestep index i from the model's eps, v or x_0 prediction."""
        alpha, sigma, _ = self._alpha_sigma_lambda(i)
        if self.config.prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha
        if self.config.prediction_type == "v_prediction":
            return alpha * sample - sigma * model_output
        return model_output  # "sample"


class DPMSolverRun(MultistepRun):
    def _step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, *, eta: float,
              generator: Generators) -> torch.Tensor:
        """With r = h_{i-1} / h_i and D = x_0 predictions (Lu et al. 2022, Algorithm 2, "midpoint"):

            x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) (D_i + (D_i - D_{i-1}) / (2 r))

        first order (the D_i term alone) at the first step and at the last (down to sigma = 0, where it gives D_i).
        """
        x0 = self._pred_x0(i, model_output, sample)
        self.x0_history = self.x0_history[-1:] + [x0]
        sample = sample.to(torch.float32)  # Reference quirk: the update runs in float32 whatever the sample's dtype
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(i)
        h = lambda_t - lambda_s
        prev_sample = (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        if 0 < i < len(self.timesteps) - 1:
            r = (lambda_s - self._alpha_sigma_lambda(i - 1)[2]) / h
            d1 = (1.0 / r) * (x0 - self.x0_history[0])
            prev_sample = prev_sample - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        return prev_sample.to(model_output.dtype)


# The defaults diffusers' two multistep solvers share: order 2, epsilon prediction, (unimplemented) thresholding off.
_SOLVER_DEFAULTS = {
    **_SCHEDULE_DEFAULTS,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}


class DPMSolverMultistepScheduler(_MultistepScheduler):
    """DPM-Solver++(2M): second-order multistep in lambda, first order at the first and last steps."""

    name = "dpmpp-2m"
    diffusers_name = "DPMSolverMultistepScheduler"
    DEFAULTS = {
        **_SOLVER_DEFAULTS,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    # lower_order_final and euler_at_final only change the last steps, which final_sigmas_type "zero" makes first
    # order anyway: every value of theirs is implemented.
    IMPLEMENTED = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": SPACINGS, "solver_order": (2,),
                   "prediction_type": ("epsilon", "sample", "v_prediction"), "thresholding": (False,),
                   "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint",), "use_exponential_sigmas": (False,),
                   "use_beta_sigmas": (False,), "use_lu_lambdas": (False,), "use_flow_sigmas": (False,),
                   "final_sigmas_type": ("zero",), "lambda_min_clipped": (-float("inf"),), "variance_type": (None,),
                   "rescale_betas_zero_snr": (False,), "use_dynamic_shifting": (False,)}
    _run = DPMSolverRun
    _round_karras_timesteps = False


class UniPCRun(MultistepRun):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_sample: torch.Tensor | None = None  # the sample the previous prediction started from
        self.last_order = 0  # the order of the previous prediction

    def _step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, *, eta: float,
              generator: Generators) -> torch.Tensor:
        """Correct the sample predicted last step with this step's model output (UniC), then predict the next one
        (UniP): order 1 at the first step and the last, 2 in between."""
        x0 = self._pred_x0(i, model_output, sample)  # from the uncorrected sample, as diffusers
        if i > 0 and i - 1 not in self.config.disable_corrector:
            sample = self._update(i - 1, self.last_sample, self.x0_history, self.last_order, new_x0=x0)
        self.x0_history = self.x0_history[-1:] + [x0]
        self.last_sample, self.last_order = sample, min(2, len(self.timesteps) - i, i + 1)
        return self._update(i, sample, self.x0_history, self.last_order)

    def _update(self, i: int, x: torch.Tensor, history: list[torch.Tensor], order: int, *,
                new_x0: torch.Tensor | None = None) -> torch.Tensor:
        """UniP (`new_x0` None) or UniC over timestep index i -> i + 1 (Zhao et al. 2023, eqs. 7 and 8, data form):

            x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) m_i - alpha_{i+1} B(h) sum_k rho_k D_k

        with m the x_0 predictions (m_i = history[-1]), B(h) = e^{-h} - 1, D_1 = (m_{i-1} - m_i) / r_1,
        r_1 = (lambda_{i-1} - lambda_i) / h, and for UniC also D_new = new_x0 - m_i (r = 1). UniP-2 and UniC-1 take
        rho = 1/2; UniC-2 solves for its two rho.
        """
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(i)
        m0 = history[-1]
        hh = -(lambda_t - lambda_s)  # -h: the data-prediction form integrates in -lambda
        h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
        b_h = torch.expm1(hh)  # B(h), "bh2"
        prediction = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0
        d1 = None
        if order == 2:
            r1 = (self._alpha_sigma_lambda(i - 1)[2] - lambda_s) / -hh
            d1 = (history[-2] - m0) / r1
        if new_x0 is None:  # UniP: rho = 1/2 for its one difference (order 2), none at order 1
            if d1 is not None:
                prediction = prediction - alpha_t * b_h * (0.5 * d1)
            return prediction.to(x.dtype)
        # UniC: the differences are D_1 (order 2) and D_new = new_x0 - m_i, with r = 1 for the new point.
        if order == 1:
            correction = 0.5 * (new_x0 - m0)
        else:
            # Solve [[1, 1], [r1, 1]] (rho_1, rho_new) = (b_1, b_2), b_p = p! g_p / B(h), g_1 = phi_1(-h) - 1 in
            # diffusers' scaling (h phi_1 / -h - 1), g_2 = g_1 / -h - 1/2.
            g1 = h_phi_1 / hh - 1
            b1, b2 = g1 / b_h, (g1 / hh - 0.5) * 2 / b_h
            rho_1 = (b1 - b2) / (1 - r1)
            rho_new = b1 - rho_1
            correction = rho_1.to(x.dtype) * d1 + rho_new.to(x.dtype) * (new_x0 - m0)
        return (prediction - alpha_t * b_h * correction).to(x.dtype)


class UniPCMultistepScheduler(_MultistepScheduler):
    """UniPC: the UniP-2 predictor and the UniC corrector, B(h) = e^h - 1, lower order at the ends."""

    name = "unipc"
    diffusers_name = "UniPCMultistepScheduler"
    DEFAULTS = {
        **_SOLVER_DEFAULTS,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],  # step indices whose result is not corrected
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }
    IMPLEMENTED = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": SPACINGS, "solver_order": (2,),
                   "prediction_type": ("epsilon", "sample", "v_prediction"), "thresholding": (False,),
                   "predict_x0": (True,), "solver_type": ("bh2",), "lower_order_final": (True,), "solver_p": (None,),
                   "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
                   "use_flow_sigmas": (False,), "final_sigmas_type": ("zero",), "rescale_betas_zero_snr": (False,),
                   "use_dynamic_shifting": (False,), "sigma_min": (None,), "sigma_max": (None,),
                   "shift_terminal": (None,)}
    _run = UniPCRun
    _round_karras_timesteps = True
