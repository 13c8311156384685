"""The ``pbe`` command: ``pbe paint ...`` paints an image, ``pbe convert SRC OUT`` converts a checkpoint.

``pbe paint`` prints, on stderr, the full command line that repeats the run (its seed included), then the progress bar.
Outputs are written atomically (a temporary file in the same folder, then a rename): a failed run leaves nothing
under the output name. Errors end with one ``error: ...`` line on stderr, never a traceback: exit status 2 for bad
arguments (as argparse's own errors), 1 for everything else (missing or unreadable files, checkpoints, devices).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__, images
from .checkpoint import CheckpointError
from .files import write_atomically
from .loading import DEFAULT_REPO
from .pipeline import PaintByExample
from .schedulers import SCHEDULERS

if TYPE_CHECKING:
    from PIL.Image import Image

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # output suffix -> Pillow format


class UsageError(ValueError):
    """An argument value argparse cannot check by itself (--steps 0, --guidance nan, ...): exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbe", description="Paint by Example: exemplar-guided image inpainting.")
    parser.add_argument("--version", action="version", version=f"pbe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    paint = commands.add_parser("paint", help="repaint the white part of a mask with an example image's content")
    paint.add_argument("--image", required=True, type=Path, help="the picture to edit")
    paint.add_argument("--mask", required=True, type=Path, help="white = repaint, black = keep")
    paint.add_argument("--example", required=True, type=Path, help="the example image whose content is painted in")
    paint.add_argument("-o", "--output", required=True, type=Path,
                       help="output .png or .jpg (with --num-images N > 1: OUT-0.png ... OUT-{N-1}.png)")
    paint.add_argument("--checkpoint", default=DEFAULT_REPO,
                       help=f"hub repo id (default {DEFAULT_REPO}), hub-layout folder, original model.ckpt "
                            "or pbe .safetensors")
    paint.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    paint.add_argument("--guidance", type=float, default=5.0,
                       help="classifier-free guidance scale; 1 or less turns guidance off (default 5)")
    paint.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    paint.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="pndm", help="sampler (default pndm)")
    paint.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="network precision (default fp32)")
    paint.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    paint.add_argument("--num-images", type=int, default=1, help="images to paint (default 1)")
    paint.add_argument("--keep-unmasked", action="store_true",
                       help="paste the input back outside the mask (the model alone shifts its colours slightly)")
    paint.add_argument("--mask-blur", type=float, default=0.0,
                       help="with --keep-unmasked: feather the seam by this many pixels (default 0: hard edge)")

    convert = commands.add_parser("convert", help="convert a checkpoint to pbe's native .safetensors")
    convert.add_argument("src", type=Path, help="hub-layout folder, or original model.ckpt / original-layout .safetensors")
    convert.add_argument("out", type=Path, help="the native .safetensors file to write")
    convert.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written tensors")
    convert.add_argument("--config", type=Path, default=None, help="pbe config JSON for a non-official original checkpoint")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Reject bad values before anything slow happens (UsageError: exit 2)."""
    if args.steps < 1:
        raise UsageError(f"--steps: expected a positive integer, got {args.steps}")
    if args.num_images < 1:
        raise UsageError(f"--num-images: expected a positive integer, got {args.num_images}")
    if not math.isfinite(args.guidance):
        raise UsageError(f"--guidance: expected a finite number, got {args.guidance}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed: expected an integer from 0 to 2**64 - 1, got {args.seed}")
    if not math.isfinite(args.mask_blur) or args.mask_blur < 0:
        raise UsageError(f"--mask-blur: expected a radius >= 0, got {args.mask_blur}")
    if args.mask_blur > 0 and not args.keep_unmasked:
        raise UsageError("--mask-blur only applies with --keep-unmasked")
    if args.output.suffix.lower() not in IMAGE_FORMATS:
        raise UsageError(f"-o {args.output}: expected a file name ending in {', '.join(IMAGE_FORMATS)}")
    if args.output.is_dir():
        raise UsageError(f"-o {args.output}: is a folder; give a file name such as {args.output / 'painted.png'}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: expected cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {args.device}: expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here (PyTorch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {args.device}: MPS is not available here")
    if device.type == "cpu" and args.dtype == "fp16" and not _cpu_has_fast_fp16():
        raise ValueError("--dtype fp16 on the CPU: PyTorch has no fast half-precision convolution for this CPU (it runs "
                         "hundreds of times slower than fp32); use --dtype bf16 or fp32 on the CPU, fp16 on a GPU")


def _cpu_has_fast_fp16() -> bool:
    """Whether oneDNN has fp16 kernels for this CPU (AVX512-FP16 / AMX-FP16); without them fp16 conv is a slow loop."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a private probe: if it is gone, assume the common case
        return False


def _repeat_command(args: argparse.Namespace, seed: int) -> str:
    """The ``pbe paint`` command line that repeats this run exactly."""
    flags = ["pbe", "paint", "--image", args.image, "--mask", args.mask, "--example", args.example, "-o", args.output,
             "--checkpoint", args.checkpoint, "--steps", args.steps, "--guidance", args.guidance, "--seed", seed,
             "--scheduler", args.scheduler, "--dtype", args.dtype, "--device", args.device,
             "--num-images", args.num_images]
    if args.keep_unmasked:
        flags += ["--keep-unmasked", "--mask-blur", args.mask_blur]
    return shlex.join(str(flag) for flag in flags)


def _load_image(flag: str, path: Path) -> Image:
    try:
        return images.load_image(path)
    except OSError as err:
        raise OSError(f"--{flag}: {err}") from None


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _save_atomically(image: Image, path: Path) -> None:
    """Write to a temporary file in the destination folder, then rename: no half-written file under ``path``."""
    write_atomically(path, lambda tmp: image.save(tmp, format=IMAGE_FORMATS[path.suffix.lower()]))


def _paint(args: argparse.Namespace) -> int:
    _check_arguments(args)
    inputs = {name: _load_image(name, getattr(args, name)) for name in ("image", "mask", "example")}
    if inputs["image"].size != inputs["mask"].size:
        raise ValueError(f"--mask is {'x'.join(map(str, inputs['mask'].size))} pixels but --image is "
                         f"{'x'.join(map(str, inputs['image'].size))}; they must be the same size")
    if inputs["mask"].convert("L").getextrema()[1] < 128:  # repaint where mask / 255 > 0.5
        print(f"warning: {args.mask} has no white pixels: nothing will be repainted", file=sys.stderr)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"to repeat this run: {_repeat_command(args, seed)}", file=sys.stderr)

    pipe = PaintByExample.from_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device,
                                          scheduler=args.scheduler)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
    result = pipe(inputs["example"], inputs["image"], inputs["mask"], num_inference_steps=args.steps,
                  guidance_scale=args.guidance, num_images_per_prompt=args.num_images, generator=generator,
                  keep_unmasked=args.keep_unmasked, mask_blur=args.mask_blur)
    for image, path in zip(result.images, _output_paths(args.output, args.num_images)):
        _save_atomically(image, path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            from weights_convert.__main__ import run

            return run(args.src, args.out, args.dtype, args.config)
        return _paint(args)
    except (CheckpointError, ValueError, TypeError, OSError, RuntimeError, MemoryError) as err:
        # One line: torch's messages (out of memory, an op missing for a dtype) may span several.
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
