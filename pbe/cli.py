"""The ``pbe`` command: ``pbe paint`` paints one picture, ``pbe batch MANIFEST`` paints every row of a manifest with
one model load (restartable; ``torchrun`` spreads it over processes), ``pbe convert SRC OUT`` converts a checkpoint,
``pbe merge-lora CHECKPOINT LORA -o OUT`` folds a LoRA file into one, ``pbe train`` trains (pbe.train),
``pbe eval`` measures quality (``pbe.evaluation.command``).

``paint`` and ``batch`` share their painting options, defined once in pbe.options (``PaintOptions``, ``ModelOptions``:
the pipeline and ``pbe serve`` use the same definitions), and check them the same way, before anything loads: ranges
(``--steps`` against the counts the sampler can run, ...), outputs that would
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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from weights_convert import command as convert_command

from . import __version__, batch, devices, images, lora_files
from .batch import OUTPUT_FORMATS, save_image
from .checkpoint import DTYPES
from .errors import COMMAND_ERRORS, CheckpointError, UsageError, error_line, exit_status, sigterm_as_interrupt
from .evaluation import command as eval_command
from .loading import looks_like_path, resolve_checkpoint
from .options import ModelOptions, OptionError, PaintOptions
from .pipeline import PaintByExample
from .schedulers import Scheduler
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
    _add_painting_flags(paint)

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


def _add_painting_flags(parser: argparse.ArgumentParser) -> None:
    """The painting flags ``paint`` and ``batch`` share, generated from pbe.options: one definition, so their
    defaults, choices and checks agree with the pipeline's and ``pbe serve``'s."""
    ModelOptions.add_arguments(parser)
    PaintOptions.add_arguments(parser)


def _read_options(args: argparse.Namespace, **model_changes: Any) -> tuple[PaintOptions, ModelOptions]:
    """The painting options the flags give, each value checked (a bad one is a usage error naming its flag)."""
    try:
        return PaintOptions.from_arguments(args), ModelOptions.from_arguments(args, **model_changes)
    except OptionError as err:
        raise UsageError(str(err)) from None


def _checkpoint_scheduler(options: PaintOptions, checkpoint: str) -> Scheduler:
    """The sampler the run will use, built as the pipeline builds it: from the checkpoint folder's scheduler config if
    it has one, else the official config; read without loading anything."""
    config_file = Path(checkpoint) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
    except (OSError, ValueError) as err:
        raise ValueError(f"--checkpoint {checkpoint}: cannot read {config_file}: {err}") from None
    return options.make_scheduler(config)


def _check_run(options: PaintOptions, model: ModelOptions) -> tuple[ModelOptions, str]:
    """Refuse, before anything slow happens (UsageError: exit 2), what these options cannot run: a step count or
    ``--eta`` the sampler cannot take with the checkpoint's scheduler config, a LoRA file that is not one, a device
    that does not exist here or a dtype that does not run there. Returns the model options with ``auto`` device and
    dtype settled (what runs and what the repeat command names) and the line that says which run it is."""
    try:
        options.check_run(_checkpoint_scheduler(options, model.checkpoint), label=PaintOptions.flag)
    except OptionError as err:
        raise UsageError(str(err)) from None
    if model.lora is not None:
        _check_lora_file("--lora", model.lora)
    try:
        return model.resolved()
    except OptionError as err:
        raise UsageError(str(err.relabeled(ModelOptions.flag))) from None


def _check_lora_file(flag: str, lora: Path) -> None:
    """A LoRA file that exists and is one (not yet whether it fits the checkpoint: that needs the UNet)."""
    try:
        lora_files.check_lora_file(lora)
    except CheckpointError as err:
        raise CheckpointError(f"{flag} {err}") from None


def _check_paint_arguments(args: argparse.Namespace) -> None:
    """``pbe paint``'s own checks (seed, count, outputs), beside the shared options'."""
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


def _repeat_command(inputs: Mapping[str, Path], output: Path, *, seed: int, num_images: int, options: PaintOptions,
                    model: ModelOptions) -> str:
    """The ``pbe paint`` command line that repeats this run exactly (``model``: with device and dtype settled)."""
    words = ["pbe", "paint", *(word for flag in INPUT_FLAGS for word in (f"--{flag}", inputs[flag])), "-o", output,
             "--seed", seed, "--num-images", num_images, *options.flags(), *model.flags()]
    return shlex.join(str(word) for word in words)


def _check_sources(model: ModelOptions) -> None:
    """Refuse a ``--checkpoint`` that names a local path and a ``--config`` that are missing (usage errors), before
    loading; what they hold is read by the loader (a bad content is a failed run, exit status 1)."""
    if looks_like_path(model.checkpoint) and not Path(model.checkpoint).expanduser().exists():
        try:
            resolve_checkpoint(model.checkpoint)  # a missing path: refused at once, saying which part is missing
        except ValueError as err:
            raise UsageError(f"--checkpoint {err}") from None
    if model.config is not None and not model.config.expanduser().exists():
        raise UsageError(f"--config {model.config}: no such file or folder")


def _load_image(flag: str, path: Path) -> Image:
    try:
        return images.load_image(path)
    except OSError as err:  # missing, a folder, or not a picture: the argument names a bad input
        raise UsageError(f"--{flag}: {err}") from None


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _load_pipeline(options: PaintOptions, model: ModelOptions) -> PaintByExample:
    """The pipeline the painting options ask for (``paint`` and ``batch`` alike; ``model`` with ``auto`` settled)."""
    return PaintByExample.from_pretrained(model.checkpoint, dtype=model.torch_dtype, device=model.device,
                                          scheduler=options.scheduler, config=model.config, lora=model.lora,
                                          lora_scale=model.lora_scale)


def _paint(args: argparse.Namespace) -> int:
    options, model = _read_options(args)
    _check_paint_arguments(args)
    model, choice = _check_run(options, model)
    inputs = {name: _load_image(name, getattr(args, name)) for name in INPUT_FLAGS}
    if inputs["image"].size != inputs["mask"].size:
        raise UsageError(f"--mask is {'x'.join(map(str, inputs['mask'].size))} pixels but --image is "
                         f"{'x'.join(map(str, inputs['image'].size))}; they must be the same size")
    if not images.read_repaint_mask(inputs["mask"]).gt(0.5).any():  # as the pipeline reads it, alpha included
        print(f"warning: {args.mask} has no opaque white pixels: nothing will be repainted", file=sys.stderr)
    _check_sources(model)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(choice, file=sys.stderr)
    repeat = _repeat_command({name: getattr(args, name) for name in INPUT_FLAGS}, args.output, seed=seed,
                             num_images=args.num_images, options=options, model=model)
    print(f"to repeat this run: {repeat}", file=sys.stderr)

    pipe = _load_pipeline(options, model)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
    result = pipe(inputs["example"], inputs["image"], inputs["mask"], options=options,
                  num_images_per_prompt=args.num_images, generator=generator)
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
    _add_painting_flags(batch_)


def _batch(args: argparse.Namespace) -> int:
    ranks = devices.ranks_from_environment()
    # Everything that can be refused is refused before the model loads, on every rank alike.
    options, model = _read_options(args, device=devices.rank_device(args.device, ranks.local_rank))
    try:
        rows = batch.read_manifest(args.manifest)
    except OSError as err:  # a manifest that is missing or cannot be read: the argument names a bad input
        raise UsageError(str(err)) from None
    model, choice = _check_run(options, model)
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
        _check_sources(model)
    batch.join_ranks(ranks)
    if pending:
        pipe = _load_pipeline(options, model)
        outcomes = batch.paint_manifest(pipe, rows, args.output_dir, options=options, seed=args.seed,
                                        overwrite=args.overwrite, ranks=ranks, on_outcome=report)
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
        threads = f"OMP_NUM_THREADS={torch.get_num_threads()} " if torch.device(model.device).type == "cpu" else ""
        row = example.row
        repeat = _repeat_command({"image": row.image, "mask": row.mask, "example": row.example}, example.output,
                                 seed=example.seed, num_images=1, options=options, model=model)
        _say(f"to repeat {row.name} alone: {threads}{repeat}\n"
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
    if not math.isfinite(args.scale):
        raise UsageError(f"--scale: expected a finite number, got {args.scale}")
    _check_lora_file("LORA", args.lora)
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
