"""The ``pbe`` command: ``pbe paint ...`` paints an image, ``pbe convert SRC OUT`` converts a checkpoint.

Errors end with one line on stderr and exit status 1 (2 for bad arguments), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbe", description="Paint by Example: exemplar-guided image inpainting.")
    commands = parser.add_subparsers(dest="command", required=True)

    paint = commands.add_parser("paint", help="repaint the white part of a mask with an example image's content")
    paint.add_argument("--image", required=True, type=Path, help="the picture to edit")
    paint.add_argument("--mask", required=True, type=Path, help="white = repaint, black = keep")
    paint.add_argument("--example", required=True, type=Path, help="the example image whose content is painted in")
    paint.add_argument("-o", "--output", required=True, type=Path, help="output PNG (several images: OUT-0.png, ...)")
    paint.add_argument("--checkpoint", default="Fantasy-Studio/Paint-by-Example",
                       help="hub repo id, hub-layout folder, original model.ckpt or pbe .safetensors")
    paint.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    paint.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    paint.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    paint.add_argument("--scheduler", choices=("pndm", "ddim", "lms"), default="pndm")
    paint.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    paint.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    paint.add_argument("--num-images", type=int, default=1, help="images to paint (default 1)")
    paint.add_argument("--keep-unmasked", action="store_true", help="paste the input back outside the mask")
    paint.add_argument("--mask-blur", type=float, default=0.0, help="feather radius for --keep-unmasked (pixels)")

    convert = commands.add_parser("convert", help="convert a checkpoint to pbe's native .safetensors")
    convert.add_argument("src", type=Path)
    convert.add_argument("out", type=Path)
    convert.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    convert.add_argument("--config", type=Path, default=None, help="pbe config JSON for a non-official original checkpoint")
    return parser


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _save_atomically(image: "PIL.Image.Image", path: Path) -> None:  # noqa: F821
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _paint(args: argparse.Namespace) -> int:
    from . import images
    from .pipeline import PaintByExample

    for name in ("steps", "num_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here")
    inputs = {name: images.load_image(getattr(args, name)) for name in ("image", "mask", "example")}
    seed = args.seed if args.seed is not None else int(torch.seed() % 2**32)
    print(f"pbe paint: checkpoint={args.checkpoint} seed={seed} steps={args.steps} guidance={args.guidance} "
          f"scheduler={args.scheduler} dtype={args.dtype} device={args.device} num_images={args.num_images}"
          f"{' keep_unmasked' if args.keep_unmasked else ''}", file=sys.stderr)
    pipe = PaintByExample.from_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device,
                                          scheduler=args.scheduler)
    generator = torch.Generator().manual_seed(seed)
    result = pipe(inputs["example"], inputs["image"], inputs["mask"], num_inference_steps=args.steps,
                  guidance_scale=args.guidance, num_images_per_prompt=args.num_images, generator=generator,
                  keep_unmasked=args.keep_unmasked, mask_blur=args.mask_blur)
    for image, path in zip(result.images, _output_paths(args.output, args.num_images)):
        _save_atomically(image, path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        if args.command == "convert":
            from weights_convert.__main__ import run

            return run(args.src, args.out, args.dtype, args.config)
        return _paint(args)
    except (CheckpointError, ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
