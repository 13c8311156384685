"""The ``pbe`` command: ``pbe paint`` paints one picture, ``pbe batch MANIFEST`` paints every row of a manifest with
one model load (restartable; ``torchrun`` spreads it over processes), ``pbe convert SRC OUT`` converts a checkpoint,
``pbe merge-lora CHECKPOINT LORA -o OUT`` folds a LoRA file into one, ``pbe train`` trains (pbe.train),
``pbe eval`` measures quality (``pbe.evaluation.command``).

``paint`` and ``batch`` share their painting options (one definition: ``_add_paint_options``) and check them the same
way, before anything loads: ranges (``--steps`` against the counts the sampler can run, ...), outputs that would
overwrite an input, an output folder that is missing or cannot be written. They print, on stderr, the device and dtype
they run on (``auto``, the default, resolved: see pbe.devices) and the command line that repeats the run (its seed,
device and dtype included), then the progress bar. Outputs are written atomically (a temporary file in the same
folder, then a rename): a failed run leaves nothing under the output name. Errors end with one ``error: ...`` line
on stderr, never a traceback, and ONE rule sets the exit status (written out in the README, "Exit statuses"): 2 for a
usage error, refused before the model loads (``pbe.errors.UsageError``: bad argument values or combinations, a
missing or unreadable input named by an argument, a device that does not exist here, a bad manifest, a mask whose
size does not match the image; argparse's own errors too), 1 for a run that started and failed (unreadable checkpoint
contents, out of memory, NaN in the latents, rows of ``pbe batch`` that failed), 130 for Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from weights_convert import command as convert_command

from . import __version__, batch, devices, images, lora_files, regions
from .batch import OUTPUT_FORMATS, save_image
from .checkpoint import DTYPES
from .errors import COMMAND_ERRORS, CheckpointError, UsageError, error_line, exit_status, sigterm_as_interrupt
from .evaluation import command as eval_command
from .loading import DEFAULT_REPO, looks_like_path, resolve_checkpoint
from .pipeline import PaintByExample
from .schedulers import SCHEDULERS, Scheduler, make_scheduler
from .serve import command as serve_command
from .train import config as train_config

if TYPE_CHECKING:
    from PIL.Image import Image

INPUT_FLAGS = ("image", "mask", "example")  # pbe paint's input files


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
    paint.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    paint.add_argument("--num-images", type=int, default=1, help="images to paint (default 1)")
    _add_paint_options(paint)

    convert_command.add_arguments(commands.add_parser("convert", help="convert a checkpoint to pbe's native .safetensors",
                                                      description=convert_command.DESCRIPTION))
    _add_batch_parser(commands)
    _add_merge_lora_parser(commands)
    _add_train_parser(commands)
    eval_command.add_arguments(commands.add_parser("eval", help="measure quality: FID, CLIP score and QS (COCOEE)",
                                                   description=eval_command.DESCRIPTION))
    serve_command.add_arguments(commands.add_parser("serve", help="serve a web page that paints (pbe.serve)",
                                                    description=serve_command.DESCRIPTION))
    return parser


def _add_paint_options(parser: argparse.ArgumentParser) -> None:
    """The painting options ``paint`` and ``batch`` share: one definition, so their defaults and choices agree."""
    parser.add_argument("--checkpoint", default=DEFAULT_REPO,
                        help=f"hub repo id (default {DEFAULT_REPO}), hub-layout folder, original model.ckpt "
                             "or pbe .safetensors")
    parser.add_argument("--config", type=Path, default=None,
                        help="the networks' config, for an original-layout checkpoint of a non-official structure: "
                             "a pbe config JSON or a hub-layout folder (its unet/, vae/, image_encoder/ config.json)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=5.0,
                        help="classifier-free guidance scale; 1 or less turns guidance off (default 5)")
    parser.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="pndm", help="sampler (default pndm)")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="network precision; auto: fp16 on a GPU, bf16 on a CPU with bfloat16 instructions "
                             "(AVX-512-BF16, AMX), fp32 on other CPUs (default auto)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps (default auto); "
                             "under torchrun, auto and cuda mean cuda:LOCAL_RANK")
    parser.add_argument("--keep-unmasked", action="store_true",
                        help="paste the input back outside the mask (the model alone shifts its colours slightly)")
    parser.add_argument("--mask-blur", type=float, default=0.0,
                        help="with --keep-unmasked: feather the seam by this many pixels (default 0: hard edge)")
    parser.add_argument("--hd-strategy", choices=regions.STRATEGIES, default="crop",
                        help="pictures larger than --hd-trigger: crop (paint each mask region in a box around it, "
                             "scaled to --resolution), resize (paint the whole picture scaled to --resolution) or "
                             "original (paint it at its own size: slow, and at a scale the model never saw); crop "
                             "and resize paste the painted part back through the mask (default crop)")
    parser.add_argument("--resolution", type=int, default=512,
                        help="working size of the longer side with crop and resize, a multiple of 8 (default 512)")
    parser.add_argument("--hd-trigger", type=int, default=800,
                        help="pictures whose longer side is at most this many pixels are painted whole, at their "
                             "own size (default 800)")
    parser.add_argument("--hd-margin", type=int, default=128,
                        help="with crop: pixels of context around each mask region (default 128)")
    parser.add_argument("--lora", type=Path, default=None,
                        help="a LoRA file for the UNet: pbe's (pbe train) or diffusers'/peft's "
                             "(pytorch_lora_weights.safetensors)")
    parser.add_argument("--lora-scale", type=float, default=1.0,
                        help="with --lora: its strength, 1 = as trained, 0 = the base model (default 1)")


def _scheduler(args: argparse.Namespace) -> Scheduler:
    """The sampler the run will use, built as the pipeline builds it: from the checkpoint folder's scheduler config if
    it has one, else the official config; read without loading anything."""
    config_file = Path(args.checkpoint) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
    except (OSError, ValueError) as err:
        raise ValueError(f"--checkpoint {args.checkpoint}: cannot read {config_file}: {err}") from None
    return make_scheduler(args.scheduler, config)


def _check_paint_options(args: argparse.Namespace) -> str:
    """Reject bad values of the shared painting options before anything slow happens (UsageError: exit 2), then
    settle an ``auto`` device and dtype: returns the line that says which run."""
    scheduler = _scheduler(args)
    try:
        scheduler.check_steps(args.steps, name="--steps")
    except ValueError as err:  # the step counts this sampler can run with this config
        raise UsageError(str(err)) from None
    if not math.isfinite(args.guidance):
        raise UsageError(f"--guidance: expected a finite number, got {args.guidance}")
    if not math.isfinite(args.mask_blur) or args.mask_blur < 0:
        raise UsageError(f"--mask-blur: expected a radius >= 0, got {args.mask_blur}")
    if args.mask_blur > 0 and not args.keep_unmasked:
        raise UsageError("--mask-blur only applies with --keep-unmasked")
    if args.resolution < 8 or args.resolution % 8:
        raise UsageError(f"--resolution: expected a positive multiple of 8, got {args.resolution}")
    if args.hd_trigger < 1:
        raise UsageError(f"--hd-trigger: expected a positive number of pixels, got {args.hd_trigger}")
    if args.hd_margin < 0:
        raise UsageError(f"--hd-margin: expected a number of pixels >= 0, got {args.hd_margin}")
    _check_lora_options(args.lora, args.lora_scale, flags=("--lora", "--lora-scale"))
    try:
        device = devices.resolve_device(args.device)
    except ValueError:
        raise UsageError(f"--device {args.device}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {args.device}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here (PyTorch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {args.device}: MPS is not available here")
    if args.dtype != "auto":
        try:
            devices.check_precision(device, DTYPES[args.dtype], refuse=True, way_out="use --dtype fp32 (or auto)")
        except ValueError as err:
            raise UsageError(f"--dtype {args.dtype}: {err}") from None
    return _choose_device_and_dtype(args, device)


def _check_lora_options(lora: Path | None, scale: float, *, flags: tuple[str, str]) -> None:
    """A LoRA file that exists and is one (not yet whether it fits the checkpoint: that needs the UNet), and a finite
    strength that only applies with it."""
    if not math.isfinite(scale):
        raise UsageError(f"{flags[1]}: expected a finite number, got {scale}")
    if lora is None:
        if scale != 1.0:
            raise UsageError(f"{flags[1]} only applies with {flags[0]}")
        return
    try:
        lora_files.check_lora_file(lora)
    except CheckpointError as err:
        raise CheckpointError(f"{flags[0]} {err}") from None


def _check_paint_arguments(args: argparse.Namespace) -> str:
    """``pbe paint``'s checks: the shared options, then its own (seed, count, outputs); returns which run."""
    if args.num_images < 1:
        raise UsageError(f"--num-images: expected a positive integer, got {args.num_images}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed: expected an integer from 0 to 2**64 - 1, got {args.seed}")
    if args.output.suffix.lower() not in OUTPUT_FORMATS:
        raise UsageError(f"-o {args.output}: expected a file name ending in {', '.join(OUTPUT_FORMATS)}")
    if args.output.is_dir():
        raise UsageError(f"-o {args.output}: is a folder; give a file name such as {args.output / 'painted.png'}")
    inputs = {getattr(args, flag).resolve(): flag for flag in INPUT_FLAGS}
    for output in _output_paths(args.output, args.num_images):
        if output.resolve() in inputs:
            raise UsageError(f"-o {args.output}: would overwrite the input {output} (--{inputs[output.resolve()]}); "
                             "choose another output name")
    _check_writable_folder("-o", args.output.parent, create=False)
    return _check_paint_options(args)


def _check_writable_folder(flag: str, folder: Path, *, create: bool) -> None:
    """Refuse an output folder that is missing (unless ``create``: then its nearest existing parent must take it)
    or cannot be written, saying which, before anything slow happens."""
    existing = folder
    while create and not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.exists():
        raise UsageError(f"{flag}: the output folder {folder} does not exist; create it first")
    if not existing.is_dir():
        raise UsageError(f"{flag}: {existing} is a file, not a folder")
    try:  # os.access is not enough: root passes it everywhere, read-only mounts and /proc do not take files
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"{flag}: cannot write in the folder {existing} ({err.strerror or err})") from None


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
             "--num-images", args.num_images, "--hd-strategy", args.hd_strategy, "--resolution", args.resolution,
             "--hd-trigger", args.hd_trigger, "--hd-margin", args.hd_margin]
    if args.keep_unmasked:
        flags += ["--keep-unmasked", "--mask-blur", args.mask_blur]
    if args.config is not None:
        flags += ["--config", args.config]
    if args.lora is not None:
        flags += ["--lora", args.lora, "--lora-scale", args.lora_scale]
    return shlex.join(str(flag) for flag in flags)


def _check_sources(args: argparse.Namespace) -> None:
    """Refuse a ``--checkpoint`` that names a local path and a ``--config`` that are missing (usage errors), before
    loading; what they hold is read by the loader (a bad content is a failed run, exit status 1)."""
    if looks_like_path(args.checkpoint) and not Path(args.checkpoint).expanduser().exists():
        try:
            resolve_checkpoint(args.checkpoint)  # a missing path: refused at once, saying which part is missing
        except ValueError as err:
            raise UsageError(f"--checkpoint {err}") from None
    if args.config is not None and not args.config.expanduser().exists():
        raise UsageError(f"--config {args.config}: no such file or folder")


def _load_image(flag: str, path: Path) -> Image:
    try:
        return images.load_image(path)
    except OSError as err:  # missing, a folder, or not a picture: the argument names a bad input
        raise UsageError(f"--{flag}: {err}") from None


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _pipe_options(args: argparse.Namespace) -> dict[str, object]:
    """The shared painting options as the pipeline's keyword arguments (steps and guidance aside)."""
    return {"keep_unmasked": args.keep_unmasked, "mask_blur": args.mask_blur, "hd_strategy": args.hd_strategy,
            "resolution": args.resolution, "hd_trigger": args.hd_trigger, "hd_margin": args.hd_margin}


def _load_pipeline(args: argparse.Namespace) -> PaintByExample:
    """The pipeline the painting options ask for (``paint`` and ``batch`` alike)."""
    return PaintByExample.from_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device,
                                          scheduler=args.scheduler, config=args.config, lora=args.lora,
                                          lora_scale=args.lora_scale)


def _paint(args: argparse.Namespace) -> int:
    choice = _check_paint_arguments(args)
    inputs = {name: _load_image(name, getattr(args, name)) for name in INPUT_FLAGS}
    if inputs["image"].size != inputs["mask"].size:
        raise UsageError(f"--mask is {'x'.join(map(str, inputs['mask'].size))} pixels but --image is "
                         f"{'x'.join(map(str, inputs['image'].size))}; they must be the same size")
    if not images.read_repaint_mask(inputs["mask"]).gt(0.5).any():  # as the pipeline reads it, alpha included
        print(f"warning: {args.mask} has no opaque white pixels: nothing will be repainted", file=sys.stderr)
    _check_sources(args)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(choice, file=sys.stderr)
    print(f"to repeat this run: {_repeat_command(args, seed)}", file=sys.stderr)

    pipe = _load_pipeline(args)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
    result = pipe(inputs["example"], inputs["image"], inputs["mask"], num_inference_steps=args.steps,
                  guidance_scale=args.guidance, num_images_per_prompt=args.num_images, generator=generator,
                  **_pipe_options(args))
    for image, path in zip(result.images, _output_paths(args.output, args.num_images)):
        save_image(image, path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


# ---- pbe batch ------------------------------------------------------------------------------------------------------


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
    batch_.add_argument("--seed", type=int, default=0,
                        help="row i without a seed field is painted with seed SEED + i (default 0)")
    _add_paint_options(batch_)


def _row_as_paint(args: argparse.Namespace, row: batch.Row, output: Path) -> argparse.Namespace:
    """The ``pbe paint`` arguments that paint ``row`` alone (its seed aside)."""
    return argparse.Namespace(**{**vars(args), "image": row.image, "mask": row.mask, "example": row.example,
                                 "output": output, "num_images": 1})


def _batch(args: argparse.Namespace) -> int:
    ranks = devices.ranks_from_environment()
    args.device = devices.rank_device(args.device, ranks.local_rank)
    # Everything that can be refused is refused before the model loads, on every rank alike.
    try:
        rows = batch.read_manifest(args.manifest)
    except OSError as err:  # a manifest that is missing or cannot be read: the argument names a bad input
        raise UsageError(str(err)) from None
    choice = _check_paint_options(args)
    _check_writable_folder("--output-dir", args.output_dir, create=True)
    batch.check_seeds(rows, args.seed)
    batch.check_outputs_are_not_inputs(rows, args.output_dir)

    mine = batch.rows_of_rank(rows, ranks)
    pending = batch.pending_rows(rows, args.output_dir, ranks=ranks, overwrite=args.overwrite)
    who = "" if ranks.world_size == 1 else f"rank {ranks.rank} of {ranks.world_size}: "
    _say(f"{who}{len(mine)} of {len(rows)} rows of {args.manifest}; {len(mine) - len(pending)} already painted "
         f"(skipped), {len(pending)} to paint; {choice}")

    def report(outcome: batch.RowOutcome) -> None:
        if outcome.status == "failed" and ranks.world_size == 1:
            tqdm.write(f"{who}{outcome.row.name} failed: {outcome.error}", file=sys.stderr)  # above the bar
        elif outcome.status != "skipped" and ranks.world_size > 1:  # no bar: one line per row instead
            _say(f"{who}{outcome.row.name} {outcome.status}" + (f": {outcome.error}" if outcome.error else ""))

    if pending:
        _check_sources(args)
    batch.join_ranks(ranks)
    if pending:
        pipe = _load_pipeline(args)
        outcomes = batch.paint_manifest(pipe, rows, args.output_dir, seed=args.seed, num_inference_steps=args.steps,
                                        guidance_scale=args.guidance, overwrite=args.overwrite, ranks=ranks,
                                        on_outcome=report, **_pipe_options(args))
    else:
        outcomes = [batch.RowOutcome(row, "skipped", batch.row_seed(row, args.seed), args.output_dir / row.output)
                    for row in mine]
    counts = batch.count(outcomes)
    totals = batch.total_counts(counts, ranks)

    if ranks.world_size > 1:
        _say(f"{who}painted {counts['painted']}, skipped {counts['skipped']}, failed {counts['failed']}")
    if ranks.rank == 0:
        _say(f"painted {totals['painted']}, skipped {totals['skipped']}, failed {totals['failed']} "
             f"(of {len(rows)} rows)")
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    example = failed[0] if failed else outcomes[0] if outcomes and ranks.rank == 0 else None
    if example is not None:
        # On the CPU the thread count changes float rounding (reduction order): repeat with this process's count.
        threads = f"OMP_NUM_THREADS={torch.get_num_threads()} " if torch.device(args.device).type == "cpu" else ""
        _say(f"to repeat {example.row.name} alone: {threads}"
             f"{_repeat_command(_row_as_paint(args, example.row, example.output), example.seed)}\n"
             f"(row i is painted with its seed field, else with --seed + i = {args.seed} + i)")
    return 1 if totals["failed"] else 0


def _say(line: str) -> None:
    """Print one whole line on stderr in ONE write: the ranks of a torchrun job share their stderr, and ``print``
    writes the text and its newline separately, so another rank's line could land between the two."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# ---- pbe merge-lora --------------------------------------------------------------------------------------------------


def _add_merge_lora_parser(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge-lora", help="fold a LoRA file into a checkpoint, written as pbe's native .safetensors",
        description="Fold LORA into the UNet of CHECKPOINT (W + scale * alpha / rank * up @ down, summed in float32) "
                    "and write pbe's native single-file checkpoint, which pbe paint --checkpoint loads. Written "
                    "atomically: a failure or an interrupt leaves nothing under OUT.")
    merge.add_argument("checkpoint", help="hub repo id, hub-layout folder, original model.ckpt or pbe .safetensors")
    merge.add_argument("lora", type=Path, help="the LoRA file: pbe's, or diffusers'/peft's")
    merge.add_argument("-o", "--output", required=True, type=Path, help="the native .safetensors file to write")
    merge.add_argument("--scale", type=float, default=1.0, help="the LoRA's strength (default 1)")
    merge.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written tensors "
                       "(default fp32)")
    merge.add_argument("--config", type=Path, default=None,
                       help="the networks' config, for an original-layout checkpoint of a non-official structure")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _merge_lora(args: argparse.Namespace) -> int:
    out = args.output
    if out.suffix != ".safetensors":
        raise UsageError(f"-o {out}: expected a file name ending in .safetensors")
    if out.is_dir():
        raise UsageError(f"-o {out}: is a folder; give a file name such as {out / 'merged.safetensors'}")
    _check_lora_options(args.lora, args.scale, flags=("LORA", "--scale"))
    checkpoint = resolve_checkpoint(args.checkpoint)
    for name, path in (("CHECKPOINT", checkpoint), ("LORA", args.lora)):
        if out.exists() and out.resolve() == path.resolve():
            raise UsageError(f"-o {out}: would overwrite the input {name}; choose another output name")
    if out.exists() and not args.overwrite:
        raise UsageError(f"-o {out}: exists; pass --overwrite to replace it")
    _check_writable_folder("-o", out.parent, create=False)
    meta = lora_files.merge_into_checkpoint(checkpoint, args.lora, out, scale=args.scale, dtype=DTYPES[args.dtype],
                                            config=args.config)
    print(f"merged {args.lora} ({meta.format}, rank {meta.rank}, alpha {meta.alpha:g}, "
          f"{','.join(meta.targets)}) at scale {args.scale:g} into {args.checkpoint}", file=sys.stderr)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype})", file=sys.stderr)
    return 0


# ---- pbe train ------------------------------------------------------------------------------------------------------


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    """``pbe train``: one flag per TrainConfig field (generated from the dataclass, so they always agree)."""
    train = commands.add_parser(
        "train", help="train or fine-tune Paint by Example (the paper's recipe; torchrun spreads it over GPUs)",
        description="Train Paint by Example with the paper's recipe (pbe.train.config.TrainConfig: every default is "
                    "the paper's), from a config file (--config, JSON or TOML, keys = the field names, a [data] table "
                    "for the data fields) overridden by flags. Under torchrun --nproc_per_node N -m pbe train ..., "
                    "each process trains on its share of every batch (DDP, or FSDP2 with --strategy fsdp). Running "
                    "the same command again continues from the last checkpoint in --output-dir.")
    train.add_argument("--config", type=Path, default=None, help="a JSON or TOML file of settings (flags override it)")
    for flag, (name, hint, default) in train_config.config_flags().items():
        if hint is bool:
            train.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=train_config.describe(name, hint, default))
        else:
            train.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                               help=train_config.describe(name, hint, default))


def _train(args: argparse.Namespace) -> int:
    from .train.loop import train  # loads the training machinery only when it runs

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = train_config.load_config(args.config, overrides)
    except ValueError as err:
        raise UsageError(str(err)) from None
    path = train(config)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"paint": _paint, "batch": _batch, "convert": convert_command.run, "merge-lora": _merge_lora,
                "train": _train, "eval": eval_command.run, "serve": serve_command.run}
    try:
        with sigterm_as_interrupt():  # SIGTERM ends every command as Ctrl-C does: "interrupted", 130, nothing partial
            return commands[args.command](args)
    except COMMAND_ERRORS as err:
        print(error_line(err), file=sys.stderr)
        return exit_status(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
