"""pbe.schedulers against diffusers 0.42.1, through reference runs stored by scripts/make_scheduler_references.py.

Each reference run builds its diffusers scheduler as users do, `Cls.from_config(pndm.config, **overrides)` from the
hub's PNDM config loaded with `from_pretrained`, and feeds it a fixed function of (sample, t) in place of the UNet;
pbe builds the same sampler from the same config and must give the same timesteps, the same starting noise scale and,
after every step, the same sample within 1e-5 relative. On another device (PBE_TEST_DEVICE, tests/conftest.py) the
samples live there (the generator stays a CPU one, as diffusers draws on the generator's device) and the bound is
conftest.CROSS_DEVICE_FLOAT32: the references were made on a CPU, and a step is elementwise float32 arithmetic whose
results differ between devices by a few ulps of rounding (sin, fused multiply-adds).
"""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch
from conftest import HUB, CommittedReference, load_script, reference_pipeline, relative_error, rounding_bound
from pbe.schedulers import (
    OFFICIAL_CONFIG,
    SCHEDULERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    Scheduler,
    from_config,
    make_scheduler,
)

REFERENCE = CommittedReference("scheduler_reference")
SETTINGS = REFERENCE.settings("settings")
CASES = SETTINGS["cases"]
SOURCES = {"hub": OFFICIAL_CONFIG, "fixture": json.loads((HUB / "scheduler" / "scheduler_config.json").read_text())}


def fake_unet(sample: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The stand-in for the UNet the reference runs used (scripts/make_scheduler_references.py)."""
    return torch.sin(sample * 1.3 + float(t) / 100) * 0.8 + 0.1 * sample


def build(case: str) -> Scheduler:
    """The case's sampler, built from its source config as the reference built it."""
    settings = CASES[case]
    cls, named = SCHEDULERS[settings["scheduler"]]
    return cls.from_config(SOURCES[settings["source"]], **named, **settings["overrides"])


def run(sched: Scheduler, steps: int, *, eta: float = 0.0, seed: int = SETTINGS["step_seed"],
        noise: torch.Tensor | None = None, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """A whole scheduler-only generation on ``device`` (a CPU generator, as the reference's); the sample after every
    step."""
    this = sched.start(steps)
    generator = torch.Generator().manual_seed(seed)
    x = (REFERENCE["initial"] if noise is None else noise).to(device) * this.init_noise_sigma
    trajectory = []
    for t in this.timesteps:
        eps = fake_unet(this.scale_model_input(x, t), t)
        x = this.step(eps, t, x, eta=eta, generator=generator)
        trajectory.append(x)
    return trajectory


@pytest.mark.parametrize("case, steps", [(case, steps) for case in CASES for steps in CASES[case]["steps"]])
def test_matches_diffusers_after_every_step(device, case: str, steps: int) -> None:
    sched = build(case)
    this = sched.start(steps)
    REFERENCE.assert_close(f"{case}.{steps}.timesteps", this.timesteps)
    REFERENCE.assert_close(f"{case}.{steps}.init_noise_sigma", torch.tensor(this.init_noise_sigma, dtype=torch.float64))
    ours = run(sched, steps, eta=CASES[case]["eta"], device=device)
    assert len(ours) == REFERENCE.shape(f"{case}.{steps}.latents")[0]
    bound = 1e-5 if device.type == "cpu" else rounding_bound(torch.float32, device=device)
    for i, x in enumerate(ours):
        assert x.dtype == torch.float32 and x.device.type == device.type
        REFERENCE.assert_close(f"{case}.{steps}.latents", x, bound=bound, index=i, what=f"after step {i}")


@pytest.mark.parametrize("case", list(CASES))
def test_runs_stay_on_a_device_that_is_not_the_cpu(case: str) -> None:
    """The device wiring of the step above without a GPU: on ``meta``, where an op mixing in a CPU tensor raises as it
    would on CUDA, every sampler's whole run (a CPU generator included) stays on the sample's device."""
    trajectory = run(build(case), 5, eta=CASES[case]["eta"], device="meta")
    assert {x.device.type for x in trajectory} == {"meta"} and trajectory[-1].shape == REFERENCE["initial"].shape


def test_every_sampler_and_config_key_is_covered() -> None:
    assert {settings["scheduler"] for settings in CASES.values()} == set(SCHEDULERS)
    for name, keys in {"ddim": ("beta_schedule", "trained_betas", "timestep_spacing", "steps_offset", "prediction_type",
                                "set_alpha_to_one", "clip_sample", "clip_sample_range", "rescale_betas_zero_snr"),
                       "pndm": ("beta_schedule", "trained_betas", "timestep_spacing", "steps_offset", "prediction_type",
                                "set_alpha_to_one", "skip_prk_steps"),
                       "lms": ("beta_schedule", "trained_betas", "timestep_spacing", "steps_offset", "prediction_type",
                               "use_karras_sigmas")}.items():
        covered = {key for s in CASES.values() if s["scheduler"] == name for key in s["overrides"]}
        assert set(keys) <= covered, (name, set(keys) - covered)


def test_official_config_is_the_hub_file_as_diffusers_loads_it() -> None:
    assert {k: v for k, v in OFFICIAL_CONFIG.items() if k != "_use_default_values"} == SETTINGS["hub_scheduler_json"]
    # The reference script asserts diffusers records exactly this list when it loads the hub file.
    assert OFFICIAL_CONFIG["_use_default_values"] == ["timestep_spacing"]


def test_each_class_takes_its_own_default_for_keys_the_file_lacks() -> None:
    # LMS built from the hub's PNDM config: "linspace", as diffusers (FACTS.md section 4, measured there).
    lms = make_scheduler("lms").start(5)
    assert lms.timesteps.tolist() == [999.0, 749.25, 499.5, 249.75, 0.0]
    assert lms.init_noise_sigma == pytest.approx(14.6146, abs=1e-4)
    assert make_scheduler("pndm").config.timestep_spacing == "leading"
    # A key the file holds is carried over as is: the test hub's file says "leading".
    assert make_scheduler("lms", SOURCES["fixture"]).config.timestep_spacing == "leading"
    # from a config with nothing in it, every key is the class's diffusers default
    assert DDIMScheduler.from_config({}).config.beta_schedule == "linear"


def test_config_chains_like_diffusers() -> None:
    lms = make_scheduler("lms")
    assert lms.config._class_name == "LMSDiscreteScheduler"
    assert "timestep_spacing" in lms.config._use_default_values and "skip_prk_steps" not in lms.config._use_default_values
    assert lms.config.skip_prk_steps is True  # kept for compatible classes, as diffusers keeps it
    pndm = PNDMScheduler.from_config(lms.config)
    assert pndm.config.skip_prk_steps is True and pndm.config.timestep_spacing == "leading"
    assert torch.equal(pndm.start(10).timesteps, make_scheduler("pndm").start(10).timesteps)
    with pytest.raises(TypeError, match="read-only"):
        lms.config["steps_offset"] = 0


def test_from_config_builds_the_class_the_file_names() -> None:
    assert type(from_config(OFFICIAL_CONFIG)) is PNDMScheduler
    karras = from_config(make_scheduler("dpmpp-2m-karras").config)
    assert type(karras) is DPMSolverMultistepScheduler and karras.config.use_karras_sigmas is True
    with pytest.raises(ValueError, match="_class_name.*'HeunDiscreteScheduler'"):
        from_config({**OFFICIAL_CONFIG, "_class_name": "HeunDiscreteScheduler"})


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("ddim", "thresholding", True),
        ("pndm", "prediction_type", "sample"),
        ("lms", "use_beta_sigmas", True),
        ("euler", "interpolation_type", "log_linear"),
        ("euler-ancestral", "prediction_type", "sample"),
        ("dpmpp-2m", "algorithm_type", "sde-dpmsolver++"),
        ("dpmpp-2m", "solver_order", 3),
        ("unipc", "solver_type", "bh1"),
        ("ddim", "beta_schedule", "sigmoid"),
        ("lms", "timestep_spacing", "uniform"),
    ],
)
def test_unimplemented_config_value_is_refused(name: str, key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{key}.*{re.escape(repr(value))}"):
        make_scheduler(name, {**SETTINGS["hub_scheduler_json"], key: value})  # as a JSON file holding the key


def test_error_messages() -> None:
    with pytest.raises(ValueError, match="valid names: pndm, ddim, lms, euler, euler-ancestral, dpmpp-2m"):
        make_scheduler("heun")
    with pytest.raises(TypeError, match="unknown config keys \\['eta'\\]"):
        DDIMScheduler(eta=0.5)
    for bad in (0, -1, 1001, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            make_scheduler("pndm").start(bad)
    with pytest.raises(ValueError, match="num_inference_steps: expected an integer from 4 to 1000 .*got 3: PNDM's "
                                         "Runge-Kutta warm-up .* at least 4 steps"):
        PNDMScheduler().start(3)
    this = make_scheduler("lms").start(10)
    with pytest.raises(ValueError, match="in order"):
        this.step(torch.zeros(2), this.timesteps[1], torch.zeros(2))
    for t in this.timesteps:
        this.step(torch.zeros(2), t, torch.zeros(2))
    with pytest.raises(RuntimeError, match="start a new run"):
        this.step(torch.zeros(2), 0, torch.zeros(2))


@pytest.mark.parametrize("name", ["pndm", "lms", "dpmpp-2m", "unipc", "euler-ancestral"])
def test_runs_of_one_scheduler_do_not_share_state(name: str) -> None:
    """Two runs of one scheduler object, stepped in lockstep, each equal a lone run."""
    sched = make_scheduler(name)
    alone_a, alone_b = run(sched, 7, seed=1), run(sched, 7, seed=2, noise=-REFERENCE["initial"])
    a, b = sched.start(7), sched.start(7)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    xa, xb = REFERENCE["initial"] * a.init_noise_sigma, -REFERENCE["initial"] * b.init_noise_sigma
    for i, t in enumerate(a.timesteps):
        xa = a.step(fake_unet(a.scale_model_input(xa, t), t), t, xa, generator=ga)
        xb = b.step(fake_unet(b.scale_model_input(xb, t), t), t, xb, generator=gb)
        assert torch.equal(xa, alone_a[i]) and torch.equal(xb, alone_b[i])


def test_one_pipeline_from_two_threads() -> None:
    """One pipeline object called from two threads at once (different seeds and samplers) gives, for each call,
    exactly the result of a lone call."""
    from pbe import PaintByExample

    pipe = PaintByExample.from_pretrained(HUB)
    image = torch.linspace(-1, 1, 3 * 24 * 32).reshape(1, 3, 24, 32)
    mask = torch.zeros(1, 1, 24, 32)
    mask[..., 6:18, 8:24] = 1
    example = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    calls = {"pndm": 1, "dpmpp-2m": 2, "euler-ancestral": 3}

    def paint(name: str) -> torch.Tensor:
        return pipe(example, image, mask, num_inference_steps=4, scheduler=name, output_type="latent", progress=False,
                    generator=torch.Generator().manual_seed(calls[name])).images

    alone = {name: paint(name) for name in calls}
    results: dict[str, torch.Tensor] = {}
    start = threading.Barrier(len(calls))

    def worker(name: str) -> None:
        start.wait()
        results[name] = paint(name)

    threads = [threading.Thread(target=worker, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in calls:
        assert torch.equal(results[name], alone[name]), name


PIPELINE_CASES = SETTINGS["pipeline_cases"]


@pytest.fixture(scope="module")
def pipe(device):
    from pbe import PaintByExample

    return PaintByExample.from_pretrained(HUB, device=device)


@pytest.fixture(scope="module")
def diffusers_pipe(device):
    """diffusers' pipeline in float32 on the test device, the yardstick off the CPU; None on the CPU (the fixtures
    were made there: the bounds are the fixed ones)."""
    return None if device.type == "cpu" else reference_pipeline(device=device, dtype=torch.float32)


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
@torch.no_grad()
def test_whole_pipeline_matches_diffusers(pipe, diffusers_pipe, case: str) -> None:
    """Each sampler through the whole pipeline, with and without guidance, at 40 x 56: images within 1e-4, latents
    within 1e-4 relative of diffusers' PaintByExamplePipeline with `pipe.scheduler = Cls.from_config(pndm.config)`
    (on another device: or within REFERENCE_MARGIN times as far as diffusers' own pipeline there strays, if further)."""
    import PIL.Image

    settings = PIPELINE_CASES[case]
    example, image, mask = (PIL.Image.fromarray(REFERENCE[f"pipeline.inputs.{k}"].numpy())
                            for k in ("example", "image", "mask"))
    generator = lambda: torch.Generator().manual_seed(settings["seed"])  # noqa: E731
    for output_type, key, tolerance, metric in (("np", "images", 1e-4, "absolute"), ("latent", "latents", 1e-4,
                                                                                      "relative")):
        result = pipe(example, image, mask, num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                      scheduler=make_scheduler(settings["scheduler"]), output_type=output_type, progress=False,
                      generator=generator()).images
        yardstick = None
        if diffusers_pipe is not None:
            script = load_script("make_scheduler_references")  # builds the sampler as the fixture runs did
            cls, named = script.CLASSES[settings["scheduler"]]
            diffusers_pipe.scheduler = cls.from_config(script.source_schedulers()["hub"].config, **named)
            yardstick = torch.as_tensor(diffusers_pipe(
                image=image, mask_image=mask, example_image=example, output_type=output_type,
                num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                generator=generator()).images)
        REFERENCE.assert_close(f"{case}.{key}", torch.as_tensor(result), bound=tolerance, metric=metric,
                               yardstick=yardstick)


# ---- the step counts each sampler can run (issue 15) ----------------------------------------------------------------


def _diffusers_outcome(script, name: str, source, steps: int) -> tuple[str, torch.Tensor | None]:  # noqa: ANN001
    """diffusers' scheduler-only run of `steps` steps with `fake_unet`, built as users build it: "ok" and the sample,
    or what went wrong ("raised", "non-finite", "timestep outside 0..T-1": the model asked at a timestep it was
    never trained on)."""
    cls, named = script.CLASSES[name]
    sched = cls.from_config(source.config, **named)
    try:
        sched.set_timesteps(steps)
        outside = (sched.timesteps < 0) | (sched.timesteps > sched.config.num_train_timesteps - 1)
        x = REFERENCE["initial"][:, :, :1, :2] * sched.init_noise_sigma
        generator = torch.Generator().manual_seed(SETTINGS["step_seed"])
        kwargs = {"generator": generator} if name in script.TAKES_GENERATOR else {}
        for t in sched.timesteps:
            x = sched.step(fake_unet(sched.scale_model_input(x, t), t), t, x, return_dict=False, **kwargs)[0]
    except Exception:  # noqa: BLE001 (any crash of diffusers' is the finding)
        return "raised", None
    if bool(outside.any()):
        return "timestep outside 0..T-1", x
    return ("ok" if bool(torch.isfinite(x).all()) else "non-finite"), x


@pytest.fixture(scope="module")
def diffusers_sources():  # noqa: ANN201
    """The hub's scheduler (no timestep_spacing in its file) and the test hub's, loaded by diffusers'
    from_pretrained."""
    pytest.importorskip("diffusers")
    script = load_script("make_scheduler_references")
    return script, script.source_schedulers()


@pytest.mark.parametrize("source", ["hub", "fixture"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_sampler_runs_its_most_steps_like_diffusers_and_refuses_one_more(diffusers_sources, name: str,
                                                                                source: str) -> None:
    """The most steps pbe allows run in diffusers and give its result; one more is refused before anything runs,
    naming the argument, the value and the range, where diffusers crashes, returns NaN or asks the model at a
    timestep outside the training range (1000 steps of PNDM, DDIM and, from the test hub's "leading" config, LMS;
    1000 of DPM-Solver and UniPC on "linspace", whose rounded timesteps repeat)."""
    script, sources = diffusers_sources
    sched = make_scheduler(name, SOURCES[source])
    most = sched.max_steps
    assert sched.allowed_steps == tuple(range(1, most + 1))

    outcome, theirs = _diffusers_outcome(script, name, sources[source], most)
    assert outcome == "ok", (name, source, most, outcome)
    this = sched.start(most)
    x = REFERENCE["initial"][:, :, :1, :2] * this.init_noise_sigma
    generator = torch.Generator().manual_seed(SETTINGS["step_seed"])
    for t in this.timesteps:
        x = this.step(fake_unet(this.scale_model_input(x, t), t), t, x, generator=generator)
    assert relative_error(x, theirs) <= 1e-5, (name, source, most)

    T = sched.config.num_train_timesteps
    if most < T:
        assert _diffusers_outcome(script, name, sources[source], most + 1)[0] != "ok"
    message = f"num_inference_steps: expected an integer from 1 to {most} for {sched.diffusers_name}(timestep_spacing="
    with pytest.raises(ValueError, match=re.escape(message) + f".*got {most + 1}"):
        sched.start(most + 1)


def test_the_official_samplers_most_steps() -> None:
    """What the hub's scheduler config allows (diffusers' outcomes are checked above): every sampler runs its 50."""
    most = {name: make_scheduler(name).max_steps for name in SCHEDULERS}
    assert most == {"pndm": 999, "ddim": 999, "lms": 1000, "euler": 1000, "euler-ancestral": 1000, "dpmpp-2m": 999,
                    "dpmpp-2m-karras": 1000, "unipc": 999}
    with pytest.raises(ValueError, match=r"got 1000: it would evaluate the model at timestep 1000, outside 0 to 999"):
        make_scheduler("pndm").check_steps(1000)
    with pytest.raises(ValueError, match=r"^--steps: .*timesteps 500 and 500 would have the same noise level"):
        make_scheduler("dpmpp-2m").check_steps(1000, name="--steps")


def test_trailing_spacing_refuses_the_counts_that_add_timestep_minus_one(diffusers_sources) -> None:
    """diffusers' "trailing" spacing gives n + 1 timesteps, the last -1, for some n (61, 103, ...): refused, the gaps
    listed; a neighbour runs."""
    script, sources = diffusers_sources
    config = {**SOURCES["fixture"], "timestep_spacing": "trailing"}
    sched = make_scheduler("ddim", config)
    assert 61 not in sched.allowed_steps and 60 in sched.allowed_steps and sched.max_steps == 1000
    diffusers_ddim = script.CLASSES["ddim"][0].from_config(sources["fixture"].config, timestep_spacing="trailing")
    diffusers_ddim.set_timesteps(61)
    assert len(diffusers_ddim.timesteps) == 62 and diffusers_ddim.timesteps[-1] == -1
    with pytest.raises(ValueError, match=r"from 1 to 1000 except 61, 103, .* more\) for DDIMScheduler.*got 61: it "
                                         r"would evaluate the model at timestep -1"):
        sched.start(61)
    assert sched.start(60).timesteps.tolist() == _diffusers_timesteps(script, sources, config, 60)


def _diffusers_timesteps(script, sources, config, steps: int) -> list[int]:  # noqa: ANN001
    sched = script.CLASSES["ddim"][0].from_config(sources["fixture"].config,
                                                  timestep_spacing=config["timestep_spacing"])
    sched.set_timesteps(steps)
    return sched.timesteps.tolist()
