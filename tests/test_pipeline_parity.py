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


# ---- one generator per image (issue 15) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float32_pipes() -> tuple:
    """pbe's and diffusers' float32 pipelines on the CPU, on one thread (restored after the module's tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield PaintByExample.from_pretrained(HUB), reference_pipeline(device=torch.device("cpu"), dtype=torch.float32)
    torch.set_num_threads(threads)


def _generator_run(pipes: tuple, sampler: str, images: list, seeds: list[int], n: int) -> tuple[torch.Tensor, ...]:
    """pbe's and diffusers' latents for `images` (one mask and one example each) with one generator per seed, eta 1
    (DDIM then draws fresh noise every step), 3 steps, guided."""
    ours, theirs = pipes
    script = load_script("make_scheduler_references")
    cls, named = script.CLASSES[sampler]
    theirs.scheduler = cls.from_config(script.source_schedulers()["hub"].config, **named)  # hub PNDM -> sampler
    example, mask = (PIL.Image.fromarray(SAMPLERS[f"pipeline.inputs.{k}"].numpy()) for k in ("example", "mask"))
    common = dict(num_inference_steps=3, guidance_scale=5.0, eta=1.0, num_images_per_prompt=n, output_type="latent")
    expected = theirs(image=images, mask_image=[mask] * len(images), example_image=[example] * len(images),
                      generator=[torch.Generator().manual_seed(s) for s in seeds], **common).images
    result = ours(example, images, [mask] * len(images), scheduler=make_scheduler(sampler), progress=False,
                  generator=[torch.Generator().manual_seed(s) for s in seeds], **common).images
    return result, expected


@pytest.mark.parametrize(("sampler", "batch", "n"), [("ddim", 2, 1), ("euler-ancestral", 1, 2), ("pndm", 2, 2)])
@torch.no_grad()
def test_a_list_of_generators_draws_per_image_as_diffusers(float32_pipes, sampler: str, batch: int, n: int) -> None:
    """generator=[g_0, ..., g_{B*n-1}]: every draw's row i from g_i (diffusers' randn_tensor with a list): the initial
    noise, the masked image's latent sample (image i < B from g_i, as diffusers encodes image by image) and DDIM's and
    Euler ancestral's per-step noise. Same latents as diffusers' pipeline given the same list."""
    image = PIL.Image.fromarray(SAMPLERS["pipeline.inputs.image"].numpy())
    images = [image, image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)][:batch]
    seeds = [11, 22, 33, 44][: batch * n]
    result, expected = _generator_run(float32_pipes, sampler, images, seeds, n)
    assert result.shape == expected.shape == (batch * n, *expected.shape[1:])
    assert generation_error("latents", result, expected) <= 1e-4, sampler


@torch.no_grad()
def test_image_i_with_generator_i_is_the_lone_run_with_it_where_diffusers_says_so(float32_pipes) -> None:
    """Two images, [g_a, g_b]: image 1 is what painting image 1 alone with g_b gives, in diffusers and in pbe. With
    num_images_per_prompt 2 on one image, [g_a, g_b]: the second image's masked-image latent comes from g_a (diffusers
    samples it once per input image), so it is NOT the lone run with g_b, in diffusers and in pbe alike."""
    image = PIL.Image.fromarray(SAMPLERS["pipeline.inputs.image"].numpy())
    flipped = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    ours, theirs = _generator_run(float32_pipes, "ddim", [image, flipped], [5, 6], 1)
    lone_ours, lone_theirs = _generator_run(float32_pipes, "ddim", [flipped], [6], 1)
    assert generation_error("latents", lone_theirs[0], theirs[1]) <= 1e-5  # diffusers says so
    assert generation_error("latents", lone_ours[0], ours[1]) <= 1e-5

    ours, theirs = _generator_run(float32_pipes, "ddim", [image], [5, 6], 2)
    lone_ours, lone_theirs = _generator_run(float32_pipes, "ddim", [image], [6], 1)
    assert generation_error("latents", lone_theirs[0], theirs[1]) > 1e-3  # diffusers says not
    assert generation_error("latents", lone_ours[0], ours[1]) > 1e-3
    assert generation_error("latents", ours, theirs) <= 1e-4


@torch.no_grad()
def test_an_8x8_picture_paints_as_diffusers_paints_it(float32_pipes) -> None:
    """8x8 pixels is a 1x1 latent: on the tiny stand-in (one channel per norm group) pbe's batch-1 UNet call met
    F.group_norm's training guard ("more than 1 value per channel") where diffusers' guided batch of 2 does not; the
    norm of a lone value is well defined, and the result is diffusers'."""
    ours, theirs = float32_pipes
    theirs.scheduler = load_script("make_reference_tensors").reference_scheduler("pndm")
    rng = np.random.default_rng(3)
    image = PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    mask = PIL.Image.fromarray(np.full((8, 8), 255, np.uint8))
    example = PIL.Image.fromarray(SAMPLERS["pipeline.inputs.example"].numpy())
    for output_type, key in (("np", "images"), ("latent", "latents")):
        expected = torch.as_tensor(theirs(image=image, mask_image=mask, example_image=example, num_inference_steps=2,
                                          generator=torch.Generator().manual_seed(0), output_type=output_type).images)
        result = torch.as_tensor(ours(example, image, mask, num_inference_steps=2, progress=False,
                                      generator=torch.Generator().manual_seed(0), output_type=output_type).images)
        assert result.shape == expected.shape
        assert generation_error(key, result, expected) <= 1e-4, key
