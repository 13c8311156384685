"""The ``pbe`` command: ``pbe paint ...`` paints an image, ``pbe convert SRC OUT`` converts a checkpoint.

``pbe paint`` prints, on stderr, the device and dtype it runs on (``auto``, the default, resolved: see pbe.devices) and
the full command line that repeats the run (its seed, device and dtype included), then the progress bar.
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
from tqdm.auto import tqdm

from weights_convert import command as convert_command

from . import __version__, batch, devices, images
from .checkpoint import DTYPES
from .errors import COMMAND_ERRORS, error_line
from .files import write_atomically
from .loading import DEFAULT_REPO
from .pipeline import PaintByExample
from .schedulers import SCHEDULERS

if TYPE_CHECKING:
    from PIL.Image import Image

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
    paint.add_argument("--config", type=Path, default=None,
                       help="the networks' config, for an original-layout checkpoint of a non-official structure: "
                            "a pbe config JSON or a hub-layout folder (its unet/, vae/, image_encoder/ config.json)")
    paint.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    paint.add_argument("--guidance", type=float, default=5.0,
                       help="classifier-free guidance scale; 1 or less turns guidance off (default 5)")
    paint.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    paint.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="pndm", help="sampler (default pndm)")
    paint.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                       help="network precision; auto: fp16 on a GPU, bf16 on a CPU with bfloat16 instructions "
                            "(AVX-512-BF16, AMX), fp32 on other CPUs (default auto)")
    paint.add_argument("--device", default="auto",
                       help="auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps (default auto)")
    paint.add_argument("--num-images", type=int, default=1, help="images to paint (default 1)")
    paint.add_argument("--keep-unmasked", action="store_true",
                       help="paste the input back outside the mask (the model alone shifts its colours slightly)")
    paint.add_argument("--mask-blur", type=float, default=0.0,
                       help="with --keep-unmasked: feather the seam by this many pixels (default 0: hard edge)")

    convert_command.add_arguments(commands.add_parser("convert", help="convert a checkpoint to pbe's native .safetensors",
                                                      description=convert_command.DESCRIPTION))
    _add_batch_parser(commands)
    return parser


def _check_arguments(args: argparse.Namespace) -> str:
    """Reject bad values before anything slow happens (UsageError: exit 2), then settle an ``auto`` device and dtype:
    returns the line that says which run."""
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
        device = devices.resolve_device(args.device)
    except ValueError:
        raise UsageError(f"--device {args.device}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {args.device}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here (PyTorch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {args.device}: MPS is not available here")
    if args.dtype != "auto":
        try:
            devices.check_precision(device, DTYPES[args.dtype], refuse=True, way_out="use --dtype fp32 (or auto)")
        except ValueError as err:
            raise UsageError(f"--dtype {args.dtype}: {err}") from None
    return _choose_device_and_dtype(args, device)


def _choose_device_and_dtype(args: argparse.Namespace, device: torch.device) -> str:
    """Replace ``auto`` by the concrete choice (what runs and what the repeat command names); returns what it is."""
    choice = f"device {device}{' (auto)' if args.device == 'auto' else ''}"
    args.device = str(device)
    if args.dtype == "auto":
        args.dtype = next(name for name, dtype in DTYPES.items() if dtype == devices.default_dtype(device))
        return choice + f", dtype {args.dtype} (auto: the fast precision on {device.type})"
    return choice + f", dtype {args.dtype}"


def _repeat_command(args: argparse.Namespace, seed: int) -> str:
    """The ``pbe paint`` command line that repeats this run exactly."""
    flags = ["pbe", "paint", "--image", args.image, "--mask", args.mask, "--example", args.example, "-o", args.output,
             "--checkpoint", args.checkpoint, "--steps", args.steps, "--guidance", args.guidance, "--seed", seed,
             "--scheduler", args.scheduler, "--dtype", args.dtype, "--device", args.device,
             "--num-images", args.num_images]
    if args.keep_unmasked:
        flags += ["--keep-unmasked", "--mask-blur", args.mask_blur]
    if getattr(args, "config", None) is not None:  # `pbe batch` has no --config
        flags += ["--config", args.config]
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
    choice = _check_arguments(args)
    inputs = {name: _load_image(name, getattr(args, name)) for name in ("image", "mask", "example")}
    if inputs["image"].size != inputs["mask"].size:
        raise ValueError(f"--mask is {'x'.join(map(str, inputs['mask'].size))} pixels but --image is "
                         f"{'x'.join(map(str, inputs['image'].size))}; they must be the same size")
    if inputs["mask"].convert("L").getextrema()[1] < 128:  # repaint where mask / 255 > 0.5
        print(f"warning: {args.mask} has no white pixels: nothing will be repainted", file=sys.stderr)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(choice, file=sys.stderr)
    print(f"to repeat this run: {_repeat_command(args, seed)}", file=sys.stderr)

    pipe = PaintByExample.from_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device,
                                          scheduler=args.scheduler, config=args.config)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
    result = pipe(inputs["example"], inputs["image"], inputs["mask"], num_inference_steps=args.steps,
                  guidance_scale=args.guidance, num_images_per_prompt=args.num_images, generator=generator,
                  keep_unmasked=args.keep_unmasked, mask_blur=args.mask_blur)
    for image, path in zip(result.images, _output_paths(args.output, args.num_images)):
        _save_atomically(image, path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


# ---- pbe batch -------------------------------------------------------------------------------------------------------


def _add_batch_parser(commands: argparse._SubParsersAction) -> None:
    batch_ = commands.add_parser(
        "batch", help="paint every row of a manifest with one model load (restartable; torchrun spreads it over GPUs)",
        description="Paint every row of MANIFEST into --output-dir. Rows whose output exists are skipped "
                    "(--overwrite redoes them), so a killed run continues where it stopped. Under torchrun "
                    "--nproc_per_node N -m pbe batch ..., row i is painted by rank i mod WORLD_SIZE, "
                    "on cuda:LOCAL_RANK when CUDA is present.")
    batch_.add_argument("manifest", type=Path,
                        help="JSONL (.jsonl, one object per line) or CSV (.csv, with a header) with the fields image, "
                             "mask, example (paths relative to the manifest's folder) and optional seed and output "
                             "(relative to --output-dir; default: the image's file stem + .png)")
    batch_.add_argument("-o", "--output-dir", required=True, type=Path, help="folder for the painted images")
    batch_.add_argument("--overwrite", action="store_true", help="paint rows whose output already exists again")
    batch_.add_argument("--checkpoint", default=DEFAULT_REPO,
                        help=f"hub repo id (default {DEFAULT_REPO}), hub-layout folder, original model.ckpt "
                             "or pbe .safetensors")
    batch_.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    batch_.add_argument("--guidance", type=float, default=5.0,
                        help="classifier-free guidance scale; 1 or less turns guidance off (default 5)")
    batch_.add_argument("--seed", type=int, default=0,
                        help="row i without a seed field is painted with seed SEED + i (default 0)")
    batch_.add_argument("--scheduler", choices=("pndm", "ddim", "lms"), default="pndm", help="sampler (default pndm)")
    batch_.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="network precision (default fp32)")
    batch_.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or mps (default: cuda:LOCAL_RANK when CUDA is present, else cpu; "
                             "cuda alone also means cuda:LOCAL_RANK)")
    batch_.add_argument("--keep-unmasked", action="store_true",
                        help="paste the input back outside the mask (the model alone shifts its colours slightly)")
    batch_.add_argument("--mask-blur", type=float, default=0.0,
                        help="with --keep-unmasked: feather the seam by this many pixels (default 0: hard edge)")


def _batch_device(requested: str | None, local_rank: int) -> str:
    """The device of this rank: each rank on its own GPU unless --device names one."""
    if requested is None:
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank}" if requested == "cuda" else requested


def _row_as_paint(args: argparse.Namespace, row: batch.Row, output: Path) -> argparse.Namespace:
    """The ``pbe paint`` arguments that paint ``row`` alone (its seed aside)."""
    return argparse.Namespace(**{**vars(args), "image": row.image, "mask": row.mask, "example": row.example,
                                 "output": output, "num_images": 1})


def _batch(args: argparse.Namespace) -> int:
    ranks = batch.ranks_from_environment()
    args.device = _batch_device(args.device, ranks.local_rank)
    # Everything that can be refused is refused before the model loads, on every rank alike.
    rows = batch.read_manifest(args.manifest)
    _check_arguments(_row_as_paint(args, rows[0], args.output_dir / rows[0].output))
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"--output-dir {args.output_dir}: is a file, not a folder")
    batch.check_seeds(rows, args.seed)
    batch.check_outputs_are_not_inputs(rows, args.output_dir)

    mine = batch.rows_of_rank(rows, ranks)
    pending = batch.pending_rows(rows, args.output_dir, ranks=ranks, overwrite=args.overwrite)
    who = "" if ranks.world_size == 1 else f"rank {ranks.rank} of {ranks.world_size}: "
    print(f"{who}{len(mine)} of {len(rows)} rows of {args.manifest}; {len(mine) - len(pending)} already painted "
          f"(skipped), {len(pending)} to paint on {args.device}", file=sys.stderr)

    def report(outcome: batch.RowOutcome) -> None:
        if outcome.status == "failed":
            tqdm.write(f"{who}{outcome.row.name} failed: {outcome.error}", file=sys.stderr)

    batch.join_ranks(ranks)
    if pending:
        pipe = PaintByExample.from_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device,
                                              scheduler=args.scheduler)
        outcomes = batch.paint_manifest(pipe, rows, args.output_dir, seed=args.seed, num_inference_steps=args.steps,
                                        guidance_scale=args.guidance, keep_unmasked=args.keep_unmasked,
                                        mask_blur=args.mask_blur, overwrite=args.overwrite, ranks=ranks,
                                        on_outcome=report)
    else:
        outcomes = [batch.RowOutcome(row, "skipped", batch.row_seed(row, args.seed), args.output_dir / row.output)
                    for row in mine]
    counts = batch.count(outcomes)
    totals = batch.total_counts(counts, ranks)

    if ranks.world_size > 1:
        print(f"{who}painted {counts['painted']}, skipped {counts['skipped']}, failed {counts['failed']}",
              file=sys.stderr)
    if ranks.rank == 0:
        print(f"painted {totals['painted']}, skipped {totals['skipped']}, failed {totals['failed']} "
              f"(of {len(rows)} rows)", file=sys.stderr)
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    example = failed[0] if failed else outcomes[0] if outcomes and ranks.rank == 0 else None
    if example is not None:
        # On the CPU the thread count changes float rounding (reduction order): repeat with this process's count.
        threads = f"OMP_NUM_THREADS={torch.get_num_threads()} " if torch.device(args.device).type == "cpu" else ""
        print(f"to repeat {example.row.name} alone: {threads}"
              f"{_repeat_command(_row_as_paint(args, example.row, example.output), example.seed)}\n"
              f"(row i is painted with its seed field, else with --seed + i = {args.seed} + i)", file=sys.stderr)
    return 1 if totals["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            return convert_command.run(args)
        if args.command == "batch":
            return _batch(args)
        return _paint(args)
    except COMMAND_ERRORS as err:
        print(error_line(err), file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
