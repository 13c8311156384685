"""pbe.schedulers against diffusers 0.42.1's PNDM, DDIM and LMS schedulers, driven side by side.

Both sides get the same noise predictions, a fixed function of (sample, t) standing in for the UNet, so any
difference comes from the schedulers alone. DDIM and PNDM match diffusers bit for bit (same float32 schedule, same
op order); LMS differs by < 1e-6 because its coefficients are exact integrals here and float32-evaluated quadrature
there.
"""

from __future__ import annotations

import math

import pytest
import torch

from pbe.schedulers import (
    DDIMScheduler,
    LMSScheduler,
    PNDMScheduler,
    ScheduleConfig,
    Scheduler,
    make_scheduler,
)

diffusers = pytest.importorskip("diffusers")
# diffusers' LMS calls np.array on a tensor, which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The hub's scheduler/scheduler_config.json for Fantasy-Studio/Paint-by-Example, with the keys diffusers fills in
# spelled out (the version string is not read by anyone).
OFFICIAL_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
}
REFERENCE = {
    "pndm": diffusers.PNDMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "lms": diffusers.LMSDiscreteScheduler,
}
SHAPE = (2, 4, 8, 8)


def fake_unet(sample: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """A deterministic stand-in for the UNet's noise prediction."""
    return torch.sin(sample * 1.3 + float(t) / 100) * 0.8 + 0.1 * sample


def initial_noise(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)


def run_ours(sched: Scheduler, steps: int, *, eta: float = 0.0, seed: int = 1, dtype=torch.float32, int_t=False):
    """Run a whole generation the way the pipeline does; return the sample after every step."""
    timesteps = sched.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = initial_noise(dtype) * sched.init_noise_sigma
    trajectory = []
    for t in timesteps:
        t = int(t) if int_t else t
        eps = fake_unet(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, eta=eta, generator=generator)
        trajectory.append(x)
    return trajectory


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50, 100])
@pytest.mark.parametrize("name, eta", [("pndm", 0.0), ("ddim", 0.0), ("ddim", 0.7), ("lms", 0.0)])
def test_matches_diffusers_after_every_step(name: str, eta: float, steps: int) -> None:
    ours = make_scheduler(name, OFFICIAL_CONFIG)
    ref = REFERENCE[name].from_config(OFFICIAL_CONFIG)
    timesteps = ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(timesteps, ref.timesteps) and timesteps.dtype == ref.timesteps.dtype
    assert ours.timesteps is timesteps
    assert ours.init_noise_sigma == float(ref.init_noise_sigma)
    assert ours.order == ref.order

    ours_gen, ref_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    step_kwargs = {"eta": eta, "generator": ref_gen} if name == "ddim" else {}
    x_ours = initial_noise() * ours.init_noise_sigma
    x_ref = initial_noise() * ref.init_noise_sigma
    for i, t in enumerate(timesteps):
        eps_ours = fake_unet(ours.scale_model_input(x_ours, t), t)
        eps_ref = fake_unet(ref.scale_model_input(x_ref, t), t)
        x_ours = ours.step(eps_ours, t, x_ours, eta=eta, generator=ours_gen)
        x_ref = ref.step(eps_ref, t, x_ref, **step_kwargs).prev_sample
        assert x_ours.dtype == x_ref.dtype
        err = relative_error(x_ours, x_ref)
        assert err <= 1e-6, f"{name} eta={eta}, {steps} steps: step {i} (t={int(t)}) is off by {err:.3g}"


def test_pndm_timesteps_repeat_the_second() -> None:
    timesteps = PNDMScheduler().set_timesteps(50)
    expected = [981, 961] + list(range(961, 0, -20))
    assert timesteps.tolist() == expected and len(expected) == 51
    assert PNDMScheduler().set_timesteps(1).tolist() == [1]
    assert DDIMScheduler().set_timesteps(50).tolist() == list(range(981, 0, -20))
    lms = LMSScheduler()
    assert lms.set_timesteps(50).dtype == torch.float32 and lms.sigmas[-1] == 0 and len(lms.sigmas) == 51


def test_lms_starts_from_unit_variance_signal_plus_noise() -> None:
    lms = LMSScheduler()
    lms.set_timesteps(50)
    assert math.isclose(lms.init_noise_sigma, math.sqrt(lms.sigmas[0].item() ** 2 + 1), rel_tol=1e-6)
    x = torch.ones(SHAPE)
    assert torch.allclose(lms.scale_model_input(x, 981), x / math.sqrt(lms.sigmas[0].item() ** 2 + 1))
    assert torch.equal(DDIMScheduler().scale_model_input(x, 981), x)


@pytest.mark.parametrize("name, eta", [("pndm", 0.0), ("ddim", 0.0), ("ddim", 0.7), ("lms", 0.0)])
def test_bf16_runs_in_bf16_like_diffusers(name: str, eta: float) -> None:
    bf16 = run_ours(make_scheduler(name), 10, eta=eta, dtype=torch.bfloat16)
    assert all(x.dtype == torch.bfloat16 for x in bf16)
    fp32 = run_ours(make_scheduler(name), 10, eta=eta)
    assert relative_error(bf16[-1], fp32[-1]) < 0.1  # bf16 keeps ~3 digits; 10 steps lose about one

    # The coefficients meet bf16 samples exactly as in diffusers (float32 0-d tensors, result in the sample's dtype).
    ref = REFERENCE[name].from_config(OFFICIAL_CONFIG)
    ref.set_timesteps(10)
    generator = torch.Generator().manual_seed(1)
    x = initial_noise(torch.bfloat16) * ref.init_noise_sigma
    for t in ref.timesteps:
        eps = fake_unet(ref.scale_model_input(x, t), t)
        x = ref.step(eps, t, x, **({"eta": eta, "generator": generator} if name == "ddim" else {})).prev_sample
    if name == "lms":  # exact vs quadrature coefficients may round a bf16 value the other way
        assert relative_error(bf16[-1], x) < 1e-2
    else:
        assert torch.equal(bf16[-1], x)


@pytest.mark.parametrize("name, eta", [("pndm", 0.0), ("ddim", 0.7), ("lms", 0.0)])
def test_set_timesteps_starts_a_new_run(name: str, eta: float) -> None:
    sched = make_scheduler(name)
    first = run_ours(sched, 10, eta=eta)
    run_ours(sched, 3, eta=eta)  # a different run in between
    second = run_ours(sched, 10, eta=eta)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("name", ["pndm", "ddim", "lms"])
def test_timestep_may_be_a_python_int(name: str) -> None:
    as_tensor = run_ours(make_scheduler(name), 10)
    as_int = run_ours(make_scheduler(name), 10, int_t=True)
    assert all(torch.equal(a, b) for a, b in zip(as_tensor, as_int))


def test_from_official_config() -> None:
    for name, cls in [("pndm", PNDMScheduler), ("DDIM", DDIMScheduler), ("Lms", LMSScheduler)]:
        sched = make_scheduler(name, OFFICIAL_CONFIG)
        assert type(sched) is cls and sched.config == ScheduleConfig()
    assert make_scheduler("pndm").config == ScheduleConfig()
    sched = DDIMScheduler.from_config({"steps_offset": 0, "num_train_timesteps": 500, "beta_end": 0.02})
    assert sched.config == ScheduleConfig(num_train_timesteps=500, beta_end=0.02, steps_offset=0)
    assert sched.set_timesteps(5).tolist() == [400, 300, 200, 100, 0]
    ref = diffusers.DDIMScheduler.from_config(OFFICIAL_CONFIG)
    assert torch.equal(DDIMScheduler.from_config(OFFICIAL_CONFIG).alphas_cumprod, ref.alphas_cumprod)


def test_keys_a_scheduler_does_not_read_are_ignored() -> None:
    # diffusers' PNDM has no clip_sample, and DDIM/LMS have no skip_prk_steps: other schedulers' options pass.
    PNDMScheduler.from_config({**OFFICIAL_CONFIG, "clip_sample": True, "some_future_key": 3})
    DDIMScheduler.from_config({**OFFICIAL_CONFIG, "skip_prk_steps": False})
    LMSScheduler.from_config({**OFFICIAL_CONFIG, "set_alpha_to_one": True})


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("pndm", "prediction_type", "v_prediction"),
        ("ddim", "prediction_type", "sample"),
        ("lms", "beta_schedule", "linear"),
        ("ddim", "clip_sample", True),
        ("ddim", "set_alpha_to_one", True),
        ("pndm", "skip_prk_steps", False),
        ("lms", "timestep_spacing", "linspace"),
        ("lms", "use_karras_sigmas", True),
        ("pndm", "trained_betas", [0.1] * 1000),
    ],
)
def test_unimplemented_config_value_is_refused(name: str, key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        make_scheduler(name, {**OFFICIAL_CONFIG, key: value})


def test_error_messages() -> None:
    with pytest.raises(ValueError, match="pndm, ddim, lms"):
        make_scheduler("euler")
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            PNDMScheduler().set_timesteps(bad)
    assert len(DDIMScheduler().set_timesteps(1000)) == 1000
    with pytest.raises(RuntimeError, match="set_timesteps"):
        DDIMScheduler().step(torch.zeros(SHAPE), 981, torch.zeros(SHAPE))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        LMSScheduler().init_noise_sigma
    lms = LMSScheduler()
    lms.set_timesteps(10)
    with pytest.raises(RuntimeError, match="in order"):
        lms.step(torch.zeros(SHAPE), lms.timesteps[1], torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="timestep"):
        lms.scale_model_input(torch.zeros(SHAPE), 500)
