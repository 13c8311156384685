"""The convert command, ONE parser for both entry points: ``pbe convert`` and ``python -m weights_convert``.

    SRC OUT.safetensors [--dtype fp32|bf16|fp16] [--config CONFIG.json | --config HUB_FOLDER]

Converts a hub-layout folder or an original ``model.ckpt`` into pbe's native single-file checkpoint and prints what
was mapped and what was skipped on purpose. Writes atomically, never over its input, and leaves nothing on failure,
on Ctrl-C or on SIGTERM (handled alike); a SIGKILL leaves a ``.OUT.pbe-partial-*`` folder that the next write to OUT
removes (see ``pbe.files``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pbe.checkpoint import DTYPES, save_native
from pbe.errors import COMMAND_ERRORS, CheckpointError, error_line, sigterm_as_interrupt

from .convert import convert, read_config

DESCRIPTION = "Convert a Paint by Example checkpoint to pbe's native format."


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the convert command's arguments to ``parser`` (a top-level parser or a subcommand's); return it."""
    parser.add_argument("src", type=Path, help="hub-layout folder, or original model.ckpt / original-layout .safetensors")
    parser.add_argument("out", type=Path, help="the native .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of the written tensors (default fp32)")
    parser.add_argument("--config", type=Path, default=None,
                        help="the networks' config for an original-layout checkpoint of a NON-official structure (head "
                             "counts and GroupNorm groups cannot be read from weights): a pbe config JSON or a "
                             "hub-layout folder with unet/, vae/, image_encoder/ config.json (default: the official "
                             "values, used only when the checkpoint's structure is the official one)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert as ``args`` (from a parser given ``add_arguments``) says; print the report. Returns the exit status 0.

    Raises ``CheckpointError`` (bad source, config or output name) or ``OSError`` (writing failed); the file ``out`` is
    then left as it was. SIGTERM raises ``KeyboardInterrupt`` meanwhile, as Ctrl-C does, so nothing is left behind.
    """
    with sigterm_as_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    src, out = args.src, args.out
    base = None if args.config is None else read_config(args.config, name="--config")
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the output must end in .safetensors")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: refusing to overwrite the input")
    if out.is_dir():
        raise CheckpointError(f"{out}: is a folder; give a file name ending in .safetensors")
    converted = convert(src, base=base)
    save_native(converted.state_dicts, converted.config, out, dtype=DTYPES[args.dtype])
    print(converted.report())
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0


def main(argv: list[str] | None = None, *, prog: str = "python -m weights_convert") -> int:
    """The whole command: parse ``argv``, convert; errors end as one ``error: ...`` line on stderr and status 1."""
    args = add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION)).parse_args(argv)
    try:
        return run(args)
    except COMMAND_ERRORS as err:
        print(error_line(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
