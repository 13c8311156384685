"""Write tests/fixtures/scheduler_reference.safetensors: diffusers 0.42.1 scheduler runs, step by step.

Reference stack only (diffusers, torch), never pbe. Every scheduler is built the way users build one: the official
PNDM scheduler is loaded with `PNDMScheduler.from_pretrained` from a folder holding the hub's scheduler_config.json
(which lacks `timestep_spacing`, so diffusers records it in `_use_default_values`), and each sampler comes from
`Cls.from_config(pndm.config, **overrides)`. A fixed function of (sample, t) stands in for the UNet, so any
difference comes from the schedulers alone.

Stored per case and step count n: `{case}.{n}.timesteps` (float64), `{case}.{n}.init_noise_sigma`, and
`{case}.{n}.latents` [steps, *SHAPE] (float32, the sample after every step); plus `initial` (the unit noise).
The case settings (scheduler name, overrides, eta, source config) are in the metadata as JSON. Whole pipeline
runs per sampler (`pipeline.{name}.{guided,unguided}.{images,latents}`) come from diffusers' PaintByExamplePipeline
on the tiny stand-in in tests/fixtures/hub.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_scheduler_references.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "tests" / "fixtures" / "scheduler_reference.safetensors"
SHAPE = (1, 4, 6, 5)  # small: a few thousand steps of latents stay under 2 MB
STEP_COUNTS = (1, 2, 7, 20, 50)
NOISE_SEED, STEP_SEED = 0, 1

# The hub's Fantasy-Studio/Paint-by-Example scheduler/scheduler_config.json (no timestep_spacing key).
HUB_SCHEDULER_JSON: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
CLASSES = {
    "pndm": (diffusers.PNDMScheduler, {}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler-ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp-2m": (diffusers.DPMSolverMultistepScheduler, {}),
    "dpmpp-2m-karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
}
TAKES_ETA = {"ddim"}  # diffusers' pipeline passes eta only to a step() that takes it
TAKES_GENERATOR = {"ddim", "euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-karras"}


def _trained_betas() -> list[float]:
    """A schedule no formula of diffusers produces (so `trained_betas` is really read): cubic in t.

    Plain IEEE divisions and products, so every CPU writes the same numbers (numpy's vectorised power rounds by an ulp
    differently with AVX-512 and AVX2)."""
    return [1e-4 + 0.02 * (t * t * t) for t in (i / 999 for i in range(1000))]


def _cases() -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}

    def case(name: str, scheduler: str, eta: float = 0.0, source: str = "hub", steps: tuple[int, ...] = STEP_COUNTS,
             **overrides: Any) -> None:
        cases[name] = {"scheduler": scheduler, "eta": eta, "source": source, "steps": list(steps),
                       "overrides": overrides}

    for name in CLASSES:  # every sampler as users build it from the official PNDM scheduler
        case(name, name)
    case("ddim_eta", "ddim", eta=0.7)
    case("lms_hub_fixture", "lms", source="fixture")  # the test hub's file holds timestep_spacing="leading"
    # The whole config surface of DDIM, PNDM and LMS.
    for name in ("ddim", "pndm", "lms"):
        case(f"{name}_linear", name, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
        case(f"{name}_cosine", name, beta_schedule="squaredcos_cap_v2")
        case(f"{name}_trained", name, trained_betas=_trained_betas())
        for spacing in ("linspace", "leading", "trailing"):
            case(f"{name}_{spacing}", name, timestep_spacing=spacing)
        case(f"{name}_offset0", name, steps_offset=0)
        case(f"{name}_v", name, prediction_type="v_prediction")
    case("ddim_sample", "ddim", prediction_type="sample")
    case("lms_sample", "lms", prediction_type="sample")
    case("ddim_alpha_one", "ddim", set_alpha_to_one=True)
    case("pndm_alpha_one", "pndm", set_alpha_to_one=True)
    case("ddim_clip", "ddim", clip_sample=True, clip_sample_range=0.5)
    case("ddim_zero_snr", "ddim", eta=0.3, rescale_betas_zero_snr=True, timestep_spacing="trailing",
         prediction_type="v_prediction")
    case("lms_karras", "lms", use_karras_sigmas=True)
    # PNDM's Runge-Kutta warm-up (diffusers' default) takes 3 steps of 4 calls: it needs 4 steps or more.
    case("pndm_prk", "pndm", steps=(4, 7, 20, 50), skip_prk_steps=False)
    case("pndm_prk_v", "pndm", steps=(4, 7, 20), skip_prk_steps=False, prediction_type="v_prediction")
    # The new samplers off their defaults, where a user would go.
    for name in ("euler", "euler-ancestral", "dpmpp-2m", "unipc"):
        case(f"{name}_leading", name, timestep_spacing="leading")
        case(f"{name}_trailing", name, timestep_spacing="trailing")
        case(f"{name}_v", name, prediction_type="v_prediction")
    case("euler_karras", "euler", use_karras_sigmas=True)
    case("dpmpp-2m_sample", "dpmpp-2m", prediction_type="sample")
    return cases


def fake_unet(sample: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A deterministic stand-in for the UNet's prediction."""
    return torch.sin(sample * 1.3 + float(t) / 100) * 0.8 + 0.1 * sample


def initial_noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(NOISE_SEED))


def source_schedulers(hub_fixture: Path = ROOT / "tests" / "fixtures" / "hub") -> dict[str, Any]:
    """The PNDM schedulers users start from: the hub's file, and the test hub's (which holds timestep_spacing)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        path.parent.mkdir()
        path.write_text(json.dumps(HUB_SCHEDULER_JSON, indent=2))
        hub = diffusers.PNDMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert hub.config["_use_default_values"] == ["timestep_spacing"], hub.config.get("_use_default_values")
    fixture = diffusers.PNDMScheduler.from_pretrained(hub_fixture, subfolder="scheduler")
    return {"hub": hub, "fixture": fixture}


def run_case(settings: dict[str, Any], steps: int, sources: dict[str, Any]) -> dict[str, torch.Tensor]:
    name = settings["scheduler"]
    cls, named = CLASSES[name]
    sched = cls.from_config(sources[settings["source"]].config, **named, **settings["overrides"])
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone()
    generator = torch.Generator().manual_seed(STEP_SEED)
    kwargs = ({"eta": settings["eta"]} if name in TAKES_ETA else {}) | (
        {"generator": generator} if name in TAKES_GENERATOR else {})
    x = initial_noise() * sched.init_noise_sigma
    latents = []
    for t in timesteps:
        eps = fake_unet(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, **kwargs).prev_sample
        latents.append(x)
    return {"timesteps": timesteps.to(torch.float64), "latents": torch.stack(latents).to(torch.float32),
            "init_noise_sigma": torch.tensor(float(sched.init_noise_sigma), dtype=torch.float64)}


def scheduler_references() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sources = source_schedulers()
    cases = _cases()
    tensors = {"initial": initial_noise()}
    for case, settings in cases.items():
        for steps in settings["steps"]:
            for key, value in run_case(settings, steps, sources).items():
                assert torch.isfinite(value).all(), (case, steps, key)
                tensors[f"{case}.{steps}.{key}"] = value.contiguous()
    return tensors, {"cases": cases, "hub_scheduler_json": HUB_SCHEDULER_JSON, "shape": SHAPE,
                     "step_counts": STEP_COUNTS, "step_seed": STEP_SEED, "diffusers": diffusers.__version__}


PIPELINE_SAMPLERS = ("lms", "euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-karras", "unipc")
PIPELINE_STEPS = 5  # enough for the multistep samplers' second-order steps between their first-order ends
PIPELINE_SIZE = (40, 56)  # height, width: multiples of 8, not square


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth uint8 RGB picture [H, W, 3] with a flat rectangle."""
    rng = np.random.default_rng(seed)
    y, x = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
    picture = 0.5 + 0.3 * (rng.uniform(-1, 1, 3) * (y - 0.5) + rng.uniform(-1, 1, 3) * (x - 0.5))
    picture[height // 4: height // 2, width // 3: width // 2] = rng.uniform(0.1, 0.9, 3)
    return np.clip(np.rint(picture * 255), 0, 255).astype(np.uint8)


def pipeline_references(sources: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """diffusers' PaintByExamplePipeline on the tiny components of tests/fixtures/hub, its scheduler swapped the documented way
    (`pipe.scheduler = Cls.from_config(pndm.config)`, pndm from the hub's scheduler_config.json), each sampler with
    and without guidance at a non-square size: images (output_type "np") and latents."""
    from PIL import Image

    # The tiny stand-in components and diffusers' pipeline on them, as the main fixture script builds them.
    script = _main_fixture_script()
    pipe = script.reference_pipeline(script.build_components())
    height, width = PIPELINE_SIZE
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[8:30, 12:44] = 255
    inputs = {"image": _picture(height, width, 500), "example": _picture(48, 36, 501), "mask": mask}
    tensors = {f"pipeline.inputs.{k}": torch.from_numpy(v.copy()) for k, v in inputs.items()}
    cases = {}
    for seed, name in enumerate(PIPELINE_SAMPLERS):
        for guidance in (5.0, 1.0):
            case = f"pipeline.{name}.{'guided' if guidance > 1 else 'unguided'}"
            cases[case] = {"scheduler": name, "guidance": guidance, "seed": 100 + seed, "steps": PIPELINE_STEPS}
            for output_type, key in (("np", "images"), ("latent", "latents")):
                cls, named = CLASSES[name]
                pipe.scheduler = cls.from_config(sources["hub"].config, **named)
                result = pipe(image=Image.fromarray(inputs["image"]), mask_image=Image.fromarray(inputs["mask"]),
                              example_image=Image.fromarray(inputs["example"]), num_inference_steps=PIPELINE_STEPS,
                              guidance_scale=guidance, generator=torch.Generator().manual_seed(100 + seed),
                              output_type=output_type).images
                tensors[f"{case}.{key}"] = torch.as_tensor(result).to(torch.float32).contiguous()
                assert torch.isfinite(tensors[f"{case}.{key}"]).all(), case
    return tensors, cases


def _main_fixture_script():  # noqa: ANN202 (a module loaded from a path)
    """scripts/make_reference_tensors.py as a module: the tiny components, the reference pipeline, the CPU signature."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_reference_tensors", ROOT / "scripts" / "make_reference_tensors.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def main() -> None:
    torch.set_num_threads(1)
    tensors, meta = scheduler_references()
    pipeline_tensors, meta["pipeline_cases"] = pipeline_references(source_schedulers())
    tensors |= pipeline_tensors
    # "machine": the CPU they were computed on; tests compare exactly on that CPU only (transcendental functions such
    # as sin and exp may round differently by an ulp in other CPUs' vector code).
    save_file(tensors, OUTPUT, metadata={"settings": json.dumps(meta), "machine": _main_fixture_script().machine_signature()})
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1e6:.2f} MB, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
