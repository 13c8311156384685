"""End to end: pbe's PaintByExample reproduces diffusers' PaintByExamplePipeline for the same seed and inputs.

References: tests/fixtures/pipeline_reference.safetensors, written by scripts/make_reference_tensors.py with diffusers'
pipeline on the tiny stand-in in tests/fixtures/hub (never with pbe). Images must agree to 1e-4 absolute (in [0, 1])
and latents to 1e-4 relative to their scale. On another device (PBE_TEST_DEVICE, tests/conftest.py) pbe runs there
(the generator stays a CPU one: both draw on the generator's device, so seeds match) and may stray REFERENCE_MARGIN
times as far from the CPU fixtures as diffusers' own pipeline, run live on that device, does, if that is further.

The newer samplers also run in bfloat16, against diffusers' pipeline run live in bfloat16 on the same device.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from pbe import PaintByExample
from pbe.schedulers import make_scheduler

from conftest import HUB, ROUNDING_BOUND, CommittedReference, generation_error, load_script, reference_pipeline

REFERENCE = CommittedReference("pipeline_reference")
CASES = REFERENCE.settings("cases")
METRIC = {"images": "absolute", "latents": "relative"}  # images in [0, 1]; latents relative to their scale


@pytest.fixture(scope="module")
def pipe(device) -> PaintByExample:
    return PaintByExample.from_pretrained(HUB, device=device)


@pytest.fixture(scope="module")
def diffusers_pipe(device):  # noqa: ANN201
    """diffusers' pipeline in float32 on the test device, the yardstick off the CPU; None on the CPU (the fixtures
    were made there: the bounds are the fixed ones)."""
    return None if device.type == "cpu" else reference_pipeline(device=device, dtype=torch.float32)


def _pil(name: str) -> PIL.Image.Image:
    return PIL.Image.fromarray(REFERENCE[f"inputs.{name}"].numpy())


def _inputs(case: str, settings: dict) -> tuple:
    if settings["inputs"] == "tensor":
        return REFERENCE[f"{case}.example"], REFERENCE[f"{case}.image"], REFERENCE[f"{case}.mask"]
    images = [_pil(name) for name in settings["images"]]
    if len(images) == 1:
        return _pil("example"), images[0], _pil("mask")
    # ONE example for the whole batch: pbe broadcasts it (diffusers was given it once per image).
    return _pil("example"), images, [_pil("mask")] * len(images)


def _run(pipe: PaintByExample, case: str, settings: dict, output_type: str):
    example, image, mask = _inputs(case, settings)
    return pipe(
        example, image, mask,
        num_inference_steps=settings["steps"], guidance_scale=settings["guidance"], eta=settings["eta"],
        num_images_per_prompt=settings["num_images_per_prompt"], scheduler=settings["scheduler"],
        generator=torch.Generator().manual_seed(settings["seed"]), output_type=output_type, progress=False,
    ).images


def _run_diffusers(pipe, case: str, settings: dict, output_type: str) -> torch.Tensor:  # noqa: ANN001
    """The case through diffusers' pipeline, called as scripts/make_reference_tensors.py called it."""
    example, image, mask = _inputs(case, settings)
    if isinstance(image, list):  # diffusers pairs the i-th example with the i-th image: repeat the one example
        example = [example] * len(image)
    pipe.scheduler = load_script("make_reference_tensors").reference_scheduler(settings["scheduler"])  # fresh
    return torch.as_tensor(pipe(
        image=image, mask_image=mask, example_image=example, num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance"], eta=settings["eta"],
        num_images_per_prompt=settings["num_images_per_prompt"],
        generator=torch.Generator().manual_seed(settings["seed"]), output_type=output_type).images).float()


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_same_seed_same_image_as_diffusers(pipe, diffusers_pipe, case: str) -> None:
    settings = CASES[case]
    for output_type, key in (("np", "images"), ("latent", "latents")):
        ours = torch.as_tensor(_run(pipe, case, settings, output_type)).float()
        yardstick = None if diffusers_pipe is None else _run_diffusers(diffusers_pipe, case, settings, output_type)
        REFERENCE.assert_close(f"{case}.{key}", ours, bound=1e-4, metric=METRIC[key], yardstick=yardstick)


@torch.no_grad()
def test_pil_output_rounds_like_diffusers(pipe, diffusers_pipe) -> None:
    case = "pndm_guided"
    images = _run(pipe, case, CASES[case], "pil")
    got = torch.as_tensor(np.stack([np.asarray(im) for im in images]))
    if diffusers_pipe is None:
        REFERENCE.assert_rounds_to(f"{case}.images", got)
        return
    # On another device: diffusers' images made there, so that only the rounding is compared (how far the float32
    # images may stray from the CPU fixtures is test_same_seed_same_image_as_diffusers's bound).
    expected = (_run_diffusers(diffusers_pipe, case, CASES[case], "np").numpy() * 255).round().astype("uint8")
    # 1e-4 in [0, 1] can move a value across a rounding boundary: at most one level, rarely.
    assert np.abs(got.numpy().astype(int) - expected.astype(int)).max() <= 1
    assert (got.numpy() != expected).mean() < 1e-3


SAMPLERS = CommittedReference("scheduler_reference")
SAMPLER_CASES = SAMPLERS.settings("settings")["pipeline_cases"]
NEW_SAMPLERS = ("euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-karras", "unipc")


@pytest.fixture(scope="module")
def bfloat16_pipes(device) -> tuple:
    """pbe's and diffusers' pipelines in bfloat16 on the test device, on one thread (on a small shared CPU, thread
    pools of test runs side by side stall each other; the setting is restored after the tests using them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield (PaintByExample.from_pretrained(HUB, torch_dtype=torch.bfloat16, device=device),
           reference_pipeline(device=device, dtype=torch.bfloat16))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("sampler", NEW_SAMPLERS)
@torch.no_grad()
def test_bfloat16_generation_matches_diffusers_in_bfloat16(bfloat16_pipes, sampler: str) -> None:
    """A guided 5-step bfloat16 generation with each newer sampler, against diffusers' pipeline in bfloat16 with
    ``pipe.scheduler = Cls.from_config(pndm.config)`` on the same device, same seed: the latents.

    Not against the float32 fixtures: on these tiny random networks a bfloat16 generation strays from float32 by 0.5-1.1
    relative in latents (and up to 1.0 in images), for diffusers and pbe alike (measured), so that bound would hold any
    result. Against diffusers' own bfloat16 run a sampler's error shows: measured on the CPU (AVX-512-BF16/AMX), the
    latents are bit-identical (the images differ by at most 2^-8: diffusers rounds its final ``x / 2 + 0.5`` in
    bfloat16; the bfloat16 decoder is checked in test_networks.py). The bound is bfloat16's per-network
    ROUNDING_BOUND.
    """
    ours, theirs = bfloat16_pipes
    case = SAMPLER_CASES[f"pipeline.{sampler}.guided"]
    script = load_script("make_scheduler_references")  # builds the sampler as the fixture runs did
    cls, named = script.CLASSES[sampler]
    theirs.scheduler = cls.from_config(script.source_schedulers()["hub"].config, **named)  # hub PNDM -> sampler
    example, image, mask = (PIL.Image.fromarray(SAMPLERS[f"pipeline.inputs.{k}"].numpy())
                            for k in ("example", "image", "mask"))
    expected = theirs(image=image, mask_image=mask, example_image=example, num_inference_steps=case["steps"],
                      guidance_scale=case["guidance"], generator=torch.Generator().manual_seed(case["seed"]),
                      output_type="latent").images
    result = ours(example, image, mask, num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                  scheduler=make_scheduler(sampler), generator=torch.Generator().manual_seed(case["seed"]),
                  output_type="latent", progress=False).images
    assert result.shape == expected.shape and result.dtype == expected.dtype == torch.bfloat16
    assert torch.isfinite(result).all()
    err = generation_error("latents", result, expected)
    assert err <= ROUNDING_BOUND[torch.bfloat16], (sampler, err)


@pytest.mark.parametrize("sampler", ["pndm", "ddim", "lms", *NEW_SAMPLERS])
@torch.no_grad()
def test_every_sampler_generates_on_a_device_that_is_not_the_cpu(sampler: str) -> None:
    """The device wiring of the generations above without a GPU: on ``meta``, where an op mixing in a CPU tensor raises
    as it would on CUDA, a whole generation (CPU generator, DDIM's per-step noise included) stays on the pipeline's
    device. Values are checked on PBE_TEST_DEVICE (meta computes none)."""
    pipe = PaintByExample.from_pretrained(HUB, device="meta")
    example, image, mask = (PIL.Image.fromarray(SAMPLERS[f"pipeline.inputs.{k}"].numpy())
                            for k in ("example", "image", "mask"))
    latents = pipe(example, image, mask, num_inference_steps=5, scheduler=sampler, eta=0.5, output_type="latent",
                   generator=torch.Generator().manual_seed(0), progress=False).images
    assert latents.device.type == "meta"
    assert latents.shape == SAMPLERS.shape("pipeline.lms.guided.latents")  # the inputs' size in every case
