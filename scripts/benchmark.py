"""Side-by-side benchmark of pbe against diffusers 0.42.1 (its parity reference) on the SAME weights and inputs.

Run from the repository root on an otherwise IDLE machine (another busy process skews the timings and the ratios):

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/benchmark.py --quick          # 1 timed run per cell, 3-step generation
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/benchmark.py                  # headline: median of 3, 50-step generation
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/benchmark.py --only unet,generate --dtypes bf16 --json bf16.json
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/benchmark.py --build-only     # only build the stand-in (once)

What one run does:

1. Builds, ONCE, a full-size stand-in of the official checkpoint in ``--cache`` (default ``~/.cache/pbe-benchmark``,
   subfolder ``full/``): random weights (default init, then every parameter plus small noise, so no layer is zero or
   trivial) in the official structure, written in the hub layout of ``Fantasy-Studio/Paint-by-Example`` (pickled
   ``.bin``, the image encoder in the transformers-4 ``model.vision_model.*`` spelling, official scheduler and CLIP
   preprocessing configs), plus pbe native files in fp32 and bf16 and the generation's input pictures. It takes
   ~12 GB of disk, ~8 GB of RAM and about two minutes on 2 cores the first time; a marker file written last makes
   later runs reuse it. ``--quick`` (about 7 minutes on 2 cores) does NOT include this build.
2. Measures the machine's matmul ceiling per dtype: the best of 3 square 4096^3 ``torch.matmul``. (Where that
   matmul is not the fastest kernel, e.g. MKL's fp32 GEMM on AMD CPUs, convolution-heavy tasks can exceed 100%.)
3. For every task and dtype runs pbe, then diffusers (alternating, so slow drift hits both), each measurement in a
   FRESH subprocess that loads only what its task needs, does one warm-up and ``--repeats`` timed runs (median
   reported) on all the machine's cores. pbe's UNet calls happen inside ``pbe.reuse_freed_memory()``, as in its
   pipeline's denoising loop (diffusers has no such setting; ``MALLOC_MMAP_MAX_=0`` in the environment would give
   it the same). Tasks:
     unet           one guided UNet call, t = 981, context [2, 1, 768] = [unconditional, conditional]: diffusers
                    gets the latent repeated, [2, 9, 64, 64], as its pipeline passes it; pbe gets it once,
                    [1, 9, 64, 64], as its pipeline passes it (pbe's UNet fans it out where the contexts first act)
     vae_encode     512x512 image [1, 3, 512, 512] -> a posterior sample (seeded)
     vae_decode     latent [1, 4, 64, 64] -> image
     image_encoder  pixels [1, 3, 224, 224] -> context [1, 1, 768]
     load           pbe.load(native file of the target dtype) vs three diffusers from_pretrained(torch_dtype=...)
                    of the hub folder; the warm-up leaves both files in the page cache
     generate       a whole 512x512 generation: PNDM, guidance 5, --steps, PIL inputs, seed 0, output_type="np"
                    (--quick: one run, no warm-up)
4. Checks that both gave the same answer, so a fast wrong answer never counts: max|pbe - diffusers| / max|diffusers|
   <= 1e-4 (fp32) or 5e-2 (bf16) for the networks; the loaded weights' count, sum |w| and sum w^2 within 1e-6;
   the generated images within 1e-3 max abs (fp32) or 2e-2 MEAN abs (bf16, whose 50-step trajectories drift apart
   by rounding; its max abs is reported). A failed check marks the row FAILED and the exit status is 1.
5. Prints a table and writes JSON (``--json``, default ``benchmark.json``).

Memory: "before" is the resident set after loading, right before the warm-up (weights memory-mapped from a file
count only once touched: pbe's native file and diffusers' fp32 .bin load that way, so they page in during the
warm-up); "peak" is the subprocess's own high-water mark (VmHWM, loading included). getrusage's ru_maxrss is kept in
the JSON but not shown: Linux carries the PARENT's high-water mark into a child at exec, which is also why the
parent process never loads a model.
FLOPs: counted per library with torch's FlopCounterMode (matmuls, convolutions, attention) on the meta device, in
the subprocess after the timed runs; a generation counts (UNet calls x one UNet call) + encode + decode + encoder.
``--tiny`` benchmarks tiny stand-ins (the test fixtures' sizes) and ``--inline`` runs everything in this process
(memory figures are then not per task): both exist for the test, tests/test_benchmark.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TASKS = ("unet", "vae_encode", "vae_decode", "image_encoder", "load", "generate")
LIBRARIES = ("pbe", "diffusers")  # measured in this order, alternating
DTYPES = ("fp32", "bf16")
NETWORK_OF = {"unet": "unet", "vae_encode": "vae", "vae_decode": "vae", "image_encoder": "image_encoder"}
TIMESTEP = 981  # the first PNDM timestep of a 50-step run
SEED = 0
GUIDANCE = 5.0

# Parity tolerances.
NETWORK_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # max|pbe - diffusers| / max|diffusers|
WEIGHTS_TOLERANCE = 1e-6  # relative, on (count, sum |w|, sum w^2) of all loaded parameters
GENERATE_MAX_ABS_FP32 = 1e-3  # images in [0, 1]
GENERATE_MEAN_ABS_BF16 = 2e-2

# The official structures (the configs of Fantasy-Studio/Paint-by-Example), as diffusers/transformers kwargs.
FULL_UNET = dict(sample_size=64, in_channels=9, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
FULL_VAE = dict(sample_size=512, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, layers_per_block=2, scaling_factor=0.18215)
FULL_CLIP = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclass(frozen=True)
class StandIn:
    """A stand-in checkpoint's size class and the inputs sized for it."""

    name: str  # subfolder of --cache
    image_size: int  # side of the image the VAE and the generation see, pixels
    example_size: tuple[int, int]  # (width, height) of the generation's example image
    matmul_size: int  # side of the square matmul that measures the machine's ceiling


STANDINS = {"full": StandIn("full", 512, (300, 260), 4096), "tiny": StandIn("tiny", 64, (37, 50), 512)}


@dataclass(frozen=True)
class Cache:
    """Where one stand-in lives: ``hub/`` (diffusers' input), native files (pbe's), input pictures, the marker."""

    root: Path

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    def native(self, dtype: str) -> Path:
        return self.root / f"pbe-{dtype}.safetensors"

    def picture(self, name: str) -> Path:
        return self.root / "inputs" / f"{name}.png"

    @property
    def marker(self) -> Path:  # written last: its presence means the build finished
        return self.root / "COMPLETE.json"


# ---------------------------------------------------------------------------------------------------------------------
# Building the stand-in (runs in a subprocess: it needs ~8 GB at full size)
# ---------------------------------------------------------------------------------------------------------------------

def reference_module() -> Any:
    """scripts/make_reference_tensors.py, imported from its path (it imports diffusers and transformers)."""
    name = "make_reference_tensors"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def perturb_(module: Any, seed: int) -> None:
    """Every parameter += seeded noise of 10% of its RMS (0.02 where it is all zeros), in sorted name order.

    Default init leaves norms at exactly 1 and biases at 0; the noise makes every layer matter while keeping the
    activations at the scale default init gives them.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            rms = param.pow(2).mean().sqrt().item()
            param.add_(torch.randn(param.shape, generator=generator) * (0.1 * rms if rms > 0 else 0.02))
            if not torch.isfinite(param).all():
                raise ValueError("stand-in weights are not finite")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build_standin(folder: Path, unet_config: dict, vae_config: dict, clip_config: dict, *, image_size: int,
                  example_size: tuple[int, int], seed: int = 0) -> None:
    """Write a stand-in checkpoint into ``folder`` (see ``Cache``), one network at a time to bound memory.

    Configs are diffusers' ``UNet2DConditionModel``/``AutoencoderKL`` kwargs and transformers' ``CLIPVisionConfig``
    kwargs. The marker file is written last.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
    from PIL import Image
    from transformers import CLIPVisionConfig

    from pbe.checkpoint import save_native
    from weights_convert.convert import convert

    ref = reference_module()
    cache = Cache(Path(folder))
    cache.marker.unlink(missing_ok=True)
    hub = cache.hub
    for offset, (name, cls, config) in enumerate((("unet", UNet2DConditionModel, unet_config),
                                                  ("vae", AutoencoderKL, vae_config))):
        torch.manual_seed(seed + offset)
        model = cls(**config)
        perturb_(model, seed + 10 + offset)
        model.save_config(hub / name)
        torch.save(model.state_dict(), hub / name / "diffusion_pytorch_model.bin")
        del model
    torch.manual_seed(seed + 2)
    encoder = PaintByExampleImageEncoder(CLIPVisionConfig(**clip_config))
    perturb_(encoder, seed + 12)
    # Like the hub file: only the non-default CLIPVisionConfig fields, the architecture and the dtype.
    encoder_config = encoder.config.to_diff_dict() | {"architectures": ["PaintByExampleImageEncoder"],
                                                      "torch_dtype": "float32"}
    _write_json(hub / "image_encoder" / "config.json", encoder_config)
    torch.save(ref.encoder_state_dict_transformers4(encoder), hub / "image_encoder" / "pytorch_model.bin")
    del encoder
    _write_json(hub / "model_index.json", ref.model_index())
    _write_json(hub / "scheduler" / "scheduler_config.json", ref.scheduler_config())
    _write_json(hub / "feature_extractor" / "preprocessor_config.json",
                ref.preprocessor_config(clip_config["image_size"]))

    converted = convert(hub)  # what `python -m weights_convert hub pbe-*.safetensors --dtype ...` does
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        save_native(converted.state_dicts, converted.config, cache.native(dtype_name), dtype=dtype)
    del converted

    width, height = example_size
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    mask[image_size * 3 // 10: image_size * 7 // 10, image_size // 4: image_size * 3 // 4] = 255  # white = repaint
    pictures = {"image": ref.synthetic_picture(image_size, image_size, seed=400), "mask": mask,
                "example": ref.synthetic_picture(height, width, seed=402)}
    for name, array in pictures.items():
        cache.picture(name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(cache.picture(name))
    _write_json(cache.marker, {"unet": unet_config, "vae": vae_config, "clip": clip_config, "seed": seed})


def build_job(job: dict) -> dict:
    standin = STANDINS[job["standin"]]
    if standin.name == "full":
        configs = FULL_UNET, FULL_VAE, FULL_CLIP
    else:  # the test fixtures' tiny networks (unet4 + vae4 + image_encoder)
        ref = reference_module()
        configs = ref.UNET_CONFIGS["unet4"], ref.VAE_CONFIGS["vae4"], ref.ENCODER_CONFIGS["image_encoder"]
    build_standin(Path(job["folder"]), *configs, image_size=standin.image_size, example_size=standin.example_size)
    return {}


# ---------------------------------------------------------------------------------------------------------------------
# Measurements (each in a fresh subprocess)
# ---------------------------------------------------------------------------------------------------------------------

def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def ceiling_job(job: dict) -> dict:
    """Best-of-3 TFLOP/s of a square matmul per dtype: the machine's practical ceiling."""
    import torch

    torch.set_num_threads(job["threads"])
    n = job["size"]
    ceilings = {}
    for name in job["dtypes"]:
        a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)).to(torch_dtype(name)) for i in (1, 2))
        torch.matmul(a, b)  # warm-up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - start)
        ceilings[name] = 2 * n ** 3 / best / 1e12
    return {"tflops": ceilings}


def _status_gb(field: str) -> float | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in GB; None where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's resident high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Runner:
    """One library's task, set up: ``run()`` is the timed work."""

    run: Callable[[], Any]
    to_array: Callable[[Any], np.ndarray]  # the result as float32 numpy, for the parity check
    flops: Callable[[], int]  # FLOPs of one run, counted after the timed runs


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn`` under FlopCounterMode; call it inside ``torch.device("meta")`` to count without computing."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

    # On the CPU attention runs as this op, which torch's FLOP table lacks.
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def task_inputs(task: str, geometry: dict, dtype: Any) -> dict[str, Any]:
    """The same seeded inputs for both libraries, drawn in fp32 and cast."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    side, latent, encoder_side = geometry["image_size"], geometry["latent_size"], geometry["encoder_image_size"]
    if task == "unet":  # guided: one latent, contexts [unconditional, conditional]
        x = {"sample": torch.randn(1, geometry["unet_in_channels"], latent, latent, generator=g),
             "context": torch.randn(2, 1, geometry["context_dim"], generator=g)}
    elif task == "vae_encode":
        x = {"pixels": torch.rand(1, 3, side, side, generator=g) * 2 - 1}
    elif task == "vae_decode":
        x = {"latent": torch.randn(1, geometry["latent_channels"], latent, latent, generator=g)}
    else:
        x = {"pixels": torch.randn(1, 3, encoder_side, encoder_side, generator=g)}
    return {k: v.to(dtype) for k, v in x.items()}


_FLOPS_SEEN: dict[str, int] = {}  # counting takes a while; --inline counts each network once


def guided_unet_call(library: str, unet: Any, x: dict[str, Any]) -> Any:
    """One guided UNet call as each library's pipeline makes it (diffusers repeats the latent, pbe does not)."""
    if library == "pbe":
        return unet(x["sample"], TIMESTEP, x["context"])
    return unet(x["sample"].repeat(2, 1, 1, 1), TIMESTEP, encoder_hidden_states=x["context"]).sample


def component_flops(library: str, component: str, build: Callable[[], Any], geometry: dict, *, key: str) -> int:
    """FLOPs of one network call of ``library`` with the benchmark's shapes, on the meta device. ``build()`` makes
    the network; ``key`` names it (library and config) for the memo."""
    import torch

    key = json.dumps([library, component, key, geometry], sort_keys=True)
    if key in _FLOPS_SEEN:
        return _FLOPS_SEEN[key]
    with torch.device("meta"):
        net = build()
        x = task_inputs(component, geometry, torch.float32)
        calls = {
            "unet": lambda: guided_unet_call(library, net, x),
            "vae_encode": lambda: net.encode(x["pixels"]),
            "vae_decode": lambda: net.decode(x["latent"]),
            "image_encoder": lambda: net(x["pixels"]),
        }
        _FLOPS_SEEN[key] = count_flops(calls[component])
    return _FLOPS_SEEN[key]


def counting_calls(module: Any) -> list[int]:
    """A one-element counter of ``module``'s forward calls."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def generation_flops(library: str, unet_calls: int, builders: dict[str, tuple[Callable[[], Any], str]],
                     geometry: dict) -> int:
    per_component = {name: component_flops(library, name, build, geometry, key=key)
                     for name, (build, key) in builders.items()}
    return unet_calls * per_component["unet"] + sum(v for k, v in per_component.items() if k != "unet")


def weights_fingerprint(modules: list[Any]) -> np.ndarray:
    """(count, sum |w|, sum w^2) over all parameters, in float64: equal weights give equal fingerprints."""
    total = np.zeros(3)
    for module in modules:
        for p in module.parameters():
            w = p.detach().double()
            total += [w.numel(), w.abs().sum().item(), w.pow(2).sum().item()]
    return total


def _as_array(x: Any) -> np.ndarray:
    return np.asarray(x.detach().float().numpy() if hasattr(x, "detach") else x, dtype=np.float32)


def generation_pictures(job: dict) -> tuple[Any, Any, Any]:
    from PIL import Image

    return tuple(Image.open(job["pictures"][name]).copy() for name in ("example", "image", "mask"))


def pbe_builder(component: str, config: Any) -> tuple[Callable[[], Any], str]:
    """A constructor of pbe's network for ``component`` from its config (for FLOP counting on the meta device), and
    a name for it."""
    from pbe.model import AutoencoderKL, ImageEncoder, UNet

    cls = {"unet": UNet, "vae_encode": AutoencoderKL, "vae_decode": AutoencoderKL, "image_encoder": ImageEncoder}
    return (lambda: cls[component](config)), f"pbe {config!r}"


def pbe_runner(task: str, dtype: Any, job: dict) -> Runner:
    import torch

    library = "pbe"
    import pbe

    native, geometry = job["native"], job["geometry"]
    if task == "load":
        return Runner(lambda: pbe.load(native, dtype=dtype),
                      lambda nets: weights_fingerprint([nets.unet, nets.vae, nets.image_encoder]), lambda: 0)
    if task == "generate":
        pipe = pbe.PaintByExample.from_pretrained(native, dtype=dtype)
        calls = counting_calls(pipe.unet)
        example, image, mask = generation_pictures(job)

        def generate() -> np.ndarray:
            calls[0] = 0
            return pipe(example, image, mask, num_inference_steps=job["steps"], guidance_scale=GUIDANCE,
                        generator=torch.Generator().manual_seed(SEED), scheduler="pndm", output_type="np",
                        progress=False).images

        builders = {c: pbe_builder(c, net.config) for c, net in (("unet", pipe.unet), ("vae_encode", pipe.vae),
                                                                 ("vae_decode", pipe.vae),
                                                                 ("image_encoder", pipe.image_encoder))}
        return Runner(generate, _as_array, lambda: generation_flops(library, calls[0], builders, geometry))

    nets = pbe.load(native, dtype=dtype)
    x = task_inputs(task, geometry, dtype)
    runs = {
        "unet": lambda: guided_unet_call("pbe", nets.unet, x),
        "vae_encode": lambda: nets.vae.encode(x["pixels"]).sample(torch.Generator().manual_seed(SEED)),
        "vae_decode": lambda: nets.vae.decode(x["latent"]),
        "image_encoder": lambda: nets.image_encoder(x["pixels"]),
    }
    network = getattr(nets, NETWORK_OF[task])
    build, key = pbe_builder(task, network.config)
    return Runner(runs[task], _as_array, lambda: component_flops(library, task, build, geometry, key=key))


def diffusers_component(name: str, hub: Path, dtype: Any) -> Any:
    """One network of the hub folder, loaded the way the reference loads it."""
    if name == "image_encoder":
        from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder as cls
    elif name == "unet":
        from diffusers import UNet2DConditionModel as cls
    else:
        from diffusers import AutoencoderKL as cls
    return cls.from_pretrained(hub / name, torch_dtype=dtype).eval()


def diffusers_builder(component: str, model: Any) -> tuple[Callable[[], Any], str]:
    """A constructor of ``model``'s network from its config (for FLOP counting on the meta device), and a name
    for it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    key = f"diffusers {type(model).__name__} {model.config}"
    if component == "image_encoder":
        return (lambda: PaintByExampleImageEncoder(model.config)), key
    cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
    return (lambda: cls.from_config(model.config)), key


def diffusers_runner(task: str, dtype: Any, job: dict) -> Runner:
    import torch

    library = "diffusers"
    hub, geometry = Path(job["hub"]), job["geometry"]
    names = ("unet", "vae", "image_encoder")
    if task == "load":
        return Runner(lambda: [diffusers_component(name, hub, dtype) for name in names], weights_fingerprint, lambda: 0)
    if task == "generate":
        from diffusers import PNDMScheduler
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExamplePipeline
        from transformers import CLIPImageProcessorPil

        unet, vae, encoder = (diffusers_component(name, hub, dtype) for name in names)
        scheduler_config = PNDMScheduler.load_config(hub / "scheduler")
        preprocessing = json.loads((hub / "feature_extractor" / "preprocessor_config.json").read_text())
        pipe = PaintByExamplePipeline(vae=vae, image_encoder=encoder, unet=unet,
                                      scheduler=PNDMScheduler.from_config(scheduler_config), safety_checker=None,
                                      feature_extractor=CLIPImageProcessorPil.from_dict(preprocessing),
                                      requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        calls = counting_calls(unet)
        example, image, mask = generation_pictures(job)

        def generate() -> np.ndarray:
            calls[0] = 0
            pipe.scheduler = PNDMScheduler.from_config(scheduler_config)  # fresh: PNDM keeps a step history
            return pipe(example_image=example, image=image, mask_image=mask, num_inference_steps=job["steps"],
                        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED), output_type="np").images

        builders = {c: diffusers_builder(c, net) for c, net in (("unet", unet), ("vae_encode", vae),
                                                                 ("vae_decode", vae), ("image_encoder", encoder))}
        return Runner(generate, _as_array, lambda: generation_flops(library, calls[0], builders, geometry))

    model = diffusers_component(NETWORK_OF[task], hub, dtype)
    x = task_inputs(task, geometry, dtype)
    runs = {
        "unet": lambda: guided_unet_call("diffusers", model, x),
        "vae_encode": lambda: model.encode(x["pixels"]).latent_dist.sample(
            generator=torch.Generator().manual_seed(SEED)),
        "vae_decode": lambda: model.decode(x["latent"]).sample,
        "image_encoder": lambda: model(x["pixels"]),
    }
    build, key = diffusers_builder(task, model)
    return Runner(runs[task], _as_array, lambda: component_flops(library, task, build, geometry, key=key))


RUNNERS = {"pbe": pbe_runner, "diffusers": diffusers_runner}


def timed_scope(library: str, task: str) -> Any:
    """What the timed runs happen inside: pbe's UNet calls inside ``pbe.reuse_freed_memory()``, as in its pipeline's
    denoising loop (which is where the generation gets it); everything else as is."""
    if library == "pbe" and task == "unet":
        import pbe

        return pbe.reuse_freed_memory()
    return contextlib.nullcontext()


def time_runs(run: Callable[[], Any], *, warmup: int, repeats: int) -> tuple[list[float], Any]:
    """Seconds of each timed run (after ``warmup`` untimed ones) and the last result."""
    result = None
    for _ in range(warmup):
        result = None  # free the previous result (a loaded model, for the load task) before the next run
        result = run()
    times = []
    for _ in range(repeats):
        result = None
        gc.collect()  # cheap: measure_job froze everything made before the runs
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return times, result


def measure_job(job: dict) -> dict:
    """Set up one library's task, time it, record memory, save the output for the parity check, count FLOPs."""
    import resource

    import torch

    torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    with torch.no_grad(), timed_scope(job["library"], job["task"]):
        runner = RUNNERS[job["library"]](job["task"], torch_dtype(job["dtype"]), job)
        setup_seconds = time.perf_counter() - start
        setup_peak, rss_before = _status_gb("VmHWM"), _status_gb("VmRSS")
        peak_was_reset = _reset_peak()
        gc.freeze()  # later collections skip everything alive now
        try:
            times, result = time_runs(runner.run, warmup=job["warmup"], repeats=job["repeats"])
        finally:
            gc.unfreeze()
    work_peak = _status_gb("VmHWM")
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kB on Linux
    np.save(job["output"], runner.to_array(result))
    del result
    peaks = [p for p in (setup_peak if peak_was_reset else None, work_peak) if p is not None]
    return {"times": times, "median_s": statistics.median(times), "setup_s": setup_seconds,
            "rss_before_gb": rss_before, "peak_gb": max(peaks) if peaks else ru_maxrss,
            "peak_timed_gb": work_peak if peak_was_reset else None, "ru_maxrss_gb": ru_maxrss,
            "flops": runner.flops(), "output": job["output"]}


JOBS = {"build": build_job, "ceiling": ceiling_job, "measure": measure_job}


def worker_main(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    result = JOBS[job["kind"]](job)
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# The parent: orchestration, parity checks, report (it never imports torch unless --inline)
# ---------------------------------------------------------------------------------------------------------------------

class Spawner:
    """Runs jobs in fresh subprocesses (or in this process with ``inline``); a failed job returns {"error": ...}."""

    def __init__(self, workdir: Path, *, inline: bool) -> None:
        self.workdir, self.inline, self.count = workdir, inline, 0

    def __call__(self, job: dict) -> dict:
        self.count += 1
        job = dict(job, result=str(self.workdir / f"result-{self.count}.json"))
        if self.inline:
            try:
                return JOBS[job["kind"]](job)
            except Exception as err:  # report it in the row, go on with the others
                return {"error": f"{type(err).__name__}: {err}"}
        job_path = self.workdir / f"job-{self.count}.json"
        job_path.write_text(json.dumps(job))
        env = os.environ | {"HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
                            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)],
                              env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
        return json.loads(Path(job["result"]).read_text())


def ensure_cache(cache: Cache, standin: StandIn, spawn: Spawner) -> float | None:
    """Build the stand-in unless its marker exists; seconds spent building, or None when it was cached."""
    if cache.marker.is_file():
        return None
    print(f"building the {standin.name} stand-in in {cache.root} (once; ~12 GB and a few minutes at full size)",
          flush=True)
    start = time.perf_counter()
    result = spawn({"kind": "build", "standin": standin.name, "folder": str(cache.root)})
    if "error" in result or not cache.marker.is_file():
        raise RuntimeError(f"building the stand-in failed: {result.get('error')}")
    return time.perf_counter() - start


def read_geometry(cache: Cache, standin: StandIn) -> dict:
    """Input shapes, from the stand-in's own configs."""
    unet = json.loads((cache.hub / "unet" / "config.json").read_text())
    vae = json.loads((cache.hub / "vae" / "config.json").read_text())
    encoder = json.loads((cache.hub / "image_encoder" / "config.json").read_text())
    downscale = 2 ** (len(vae["block_out_channels"]) - 1)
    return {"image_size": standin.image_size, "latent_size": standin.image_size // downscale,
            "latent_channels": vae["latent_channels"], "unet_in_channels": unet["in_channels"],
            "context_dim": unet["cross_attention_dim"], "encoder_image_size": encoder["image_size"]}


def check_parity(task: str, dtype: str, ours: np.ndarray, ref: np.ndarray) -> dict:
    """Did pbe give diffusers' answer? {metric: value, ..., "passed": bool, "summary": str}."""
    if ours.shape != ref.shape:
        return {"passed": False, "summary": f"shapes differ: {list(ours.shape)} vs {list(ref.shape)}"}
    if not (np.isfinite(ours).all() and np.isfinite(ref).all()):
        return {"passed": False, "summary": "non-finite output"}
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    if task == "generate":
        max_abs, mean_abs = float(diff.max()), float(diff.mean())
        passed = max_abs <= GENERATE_MAX_ABS_FP32 if dtype == "fp32" else mean_abs <= GENERATE_MEAN_ABS_BF16
        limit = f"max<={GENERATE_MAX_ABS_FP32:g}" if dtype == "fp32" else f"mean<={GENERATE_MEAN_ABS_BF16:g}"
        return {"max_abs": max_abs, "mean_abs": mean_abs, "passed": passed,
                "summary": f"max {max_abs:.1e} mean {mean_abs:.1e} ({limit})"}
    if task == "load":
        relative = float((diff / np.maximum(np.abs(ref), 1e-300)).max())
        passed = ours[0] == ref[0] and relative <= WEIGHTS_TOLERANCE
        return {"relative": relative, "passed": bool(passed), "summary": f"weights rel {relative:.1e}"}
    relative = float(diff.max() / max(np.abs(ref).max(), 1e-30))
    return {"relative": relative, "passed": relative <= NETWORK_TOLERANCE[dtype],
            "summary": f"rel {relative:.1e} (<={NETWORK_TOLERANCE[dtype]:g})"}


def make_row(task: str, dtype: str, results: dict[str, dict], ceiling: float | None) -> dict:
    row: dict[str, Any] = {"task": task, "dtype": dtype, **results}
    errors = [f"{lib}: {r['error']}" for lib, r in results.items() if "error" in r]
    if errors:
        return row | {"status": "FAILED", "check": {"passed": False, "summary": "; ".join(errors)[:300]}}
    for r in results.values():
        r["tflops"] = r["flops"] / r["median_s"] / 1e12 if r["flops"] else None
        r["ceiling_fraction"] = r["tflops"] / ceiling if r["tflops"] and ceiling else None
    outputs = {lib: np.load(r["output"]) for lib, r in results.items()}
    check = check_parity(task, dtype, outputs["pbe"], outputs["diffusers"])
    ratio = results["pbe"]["median_s"] / results["diffusers"]["median_s"]
    return row | {"ratio": ratio, "check": check, "status": "ok" if check["passed"] else "FAILED"}


def format_table(report: dict) -> str:
    def gb(r: dict) -> str:
        return f"{r['rss_before_gb']:.2f}/{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else "-"

    def tf(r: dict) -> str:
        return f"{r['tflops']:.3g} ({100 * r['ceiling_fraction']:.0f}%)" if r.get("ceiling_fraction") else "-"

    head = (f"{'task':<14}{'dtype':<6}{'pbe s':>9}{'diffusers s':>13}{'pbe/diff':>10}  {'pbe GB':>11}  "
            f"{'diff. GB':>11}  {'pbe TFLOP/s':>13}  {'diff. TFLOP/s':>14}  parity")
    lines = [head, "-" * len(head)]
    for row in report["rows"]:
        p, d = row["pbe"], row["diffusers"]
        if "error" in p or "error" in d:
            lines.append(f"{row['task']:<14}{row['dtype']:<6}  FAILED: {row['check']['summary'][:200]}")
            continue
        lines.append(f"{row['task']:<14}{row['dtype']:<6}{p['median_s']:>9.3f}{d['median_s']:>13.3f}"
                     f"{row['ratio']:>10.2f}  {gb(p):>11}  {gb(d):>11}  {tf(p):>13}  {tf(d):>14}  "
                     f"{'ok' if row['check']['passed'] else 'FAILED'} {row['check']['summary']}")
    settings = report["settings"]
    ceilings = ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in report["ceiling_tflops"].items())
    generate = f"{settings['steps']} steps" + (", 1 run, no warm-up" if settings["quick"] else "")
    lines += ["", f"GB: resident before the timed work / peak of the subprocess.  Matmul ceiling: {ceilings}.",
              f"{settings['repeats']} timed run(s) after 1 warm-up (generate: {generate}); "
              f"{report['machine']['threads']} threads."]
    return "\n".join(lines)


def machine_info(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    versions = {}
    for package in ("torch", "diffusers", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": models[0] if models else platform.processor(), "threads": threads,
            "python": platform.python_version(), **versions}


def run_benchmark(args: argparse.Namespace) -> dict:
    standin = STANDINS["tiny" if args.tiny else "full"]
    cache = Cache(args.cache.expanduser() / standin.name)
    threads = args.threads
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pbe-benchmark-") as tmp:
        spawn = Spawner(Path(tmp), inline=args.inline)
        build_seconds = ensure_cache(cache, standin, spawn)
        bench_start = time.perf_counter()
        ceiling = spawn({"kind": "ceiling", "size": standin.matmul_size, "dtypes": args.dtypes, "threads": threads})
        if "error" in ceiling:
            raise RuntimeError(f"measuring the matmul ceiling failed: {ceiling['error']}")
        base_job = {"kind": "measure", "threads": threads, "hub": str(cache.hub),
                    "geometry": read_geometry(cache, standin),
                    "pictures": {n: str(cache.picture(n)) for n in ("image", "mask", "example")}}
        rows = []
        for task in args.only:
            for dtype in args.dtypes:
                generate_quick = task == "generate" and args.quick
                results = {}
                for library in LIBRARIES:
                    job = base_job | {"library": library, "task": task, "dtype": dtype, "steps": args.steps,
                                      "native": str(cache.native(dtype)), "warmup": 0 if generate_quick else 1,
                                      "repeats": 1 if generate_quick else args.repeats,
                                      "output": str(Path(tmp) / f"{library}-{task}-{dtype}.npy")}
                    results[library] = spawn(job)
                    r = results[library]
                    shown = (f"median {r['median_s']:.3f} s, peak {r['peak_gb']:.2f} GB" if "error" not in r
                             else f"ERROR {r['error'].splitlines()[-1][:150]}")
                    print(f"  {task:<14}{dtype:<5} {library:<10} {shown}  [{time.perf_counter() - bench_start:.0f} s]",
                          flush=True)
                rows.append(make_row(task, dtype, results, ceiling["tflops"].get(dtype)))
    return {"machine": machine_info(threads), "standin": standin.name, "cache": str(cache.root),
            "settings": {"quick": args.quick, "repeats": args.repeats, "steps": args.steps, "dtypes": args.dtypes,
                         "tasks": args.only, "isolated_subprocesses": not args.inline},
            "ceiling_tflops": ceiling["tflops"], "build_seconds": build_seconds,
            "benchmark_seconds": time.perf_counter() - bench_start, "wall_seconds": time.perf_counter() - started,
            "rows": rows}


def _names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return [n for n in choices if n in names]  # canonical order

    return parse


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmark pbe against diffusers on the same weights and inputs "
                                                 "(the machine must be otherwise idle).")
    parser.add_argument("--quick", action="store_true", help="1 timed run per cell, 3-step generation without warm-up")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per cell after one warm-up (default 3; --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="PNDM steps of the generation (default 50; --quick 3)")
    parser.add_argument("--dtypes", type=_names(DTYPES), default=list(DTYPES), help="comma-separated dtypes (default fp32,bf16)")
    parser.add_argument("--only", type=_names(TASKS), default=list(TASKS),
                        help=f"tasks (default all: {','.join(TASKS)})")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/pbe-benchmark"),
                        help="where the stand-in is built (default ~/.cache/pbe-benchmark)")
    parser.add_argument("--json", type=Path, default=Path("benchmark.json"),
                        help="results file (default ./benchmark.json)")
    parser.add_argument("--threads", type=int, default=machine_cores(),
                        help=f"torch threads in every measurement (default: this machine's {machine_cores()} cores)")
    parser.add_argument("--build-only", action="store_true", help="build the stand-in in --cache (if absent) and stop")
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in networks (for tests)")
    parser.add_argument("--inline", action="store_true",
                        help="no subprocesses (for tests; memory is then not per task)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def build_only(args: argparse.Namespace) -> int:
    standin = STANDINS["tiny" if args.tiny else "full"]
    cache = Cache(args.cache.expanduser() / standin.name)
    with tempfile.TemporaryDirectory(prefix="pbe-benchmark-") as tmp:
        seconds = ensure_cache(cache, standin, Spawner(Path(tmp), inline=args.inline))
    print(f"stand-in in {cache.root}: " + (f"built in {seconds:.0f} s" if seconds is not None else "already built"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.build_only:
        return build_only(args)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.steps = args.steps or (3 if args.quick else 50)
    report = run_benchmark(args)
    print()
    print(format_table(report))
    build = f"built in {report['build_seconds']:.0f} s" if report["build_seconds"] is not None else "cached"
    print(f"stand-in {build}; benchmark {report['benchmark_seconds']:.0f} s; wall {report['wall_seconds']:.0f} s")
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    failed = [f"{r['task']}/{r['dtype']}" for r in report["rows"] if r["status"] != "ok"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
