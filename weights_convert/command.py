"""The convert command, ONE parser for both entry points: ``pbe convert`` and ``python -m weights_convert``.

    SRC OUT.safetensors [--dtype fp32|bf16|fp16] [--config CONFIG.json | --config HUB_FOLDER] [--overwrite]

Converts a hub-layout folder or an original ``model.ckpt`` into pbe's native single-file checkpoint (or re-saves a
native file, e.g. in another dtype) and prints what was mapped and what was skipped on purpose. Writes atomically,
never over its input, over an existing OUT only with ``--overwrite``, and leaves nothing on failure, on Ctrl-C or on
SIGTERM (handled alike); a SIGKILL leaves a ``.OUT.pbe-partial-*`` folder that the next write to OUT removes (see
``pbe.files``). Usage errors (a bad OUT, an existing OUT, a missing SRC or --config, an output folder that takes no
file) are refused before SRC is read, with exit status 2; a conversion that fails exits 1 (``pbe.errors.exit_status``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pbe.checkpoint import DTYPES, save_native
from pbe.errors import COMMAND_ERRORS, UsageError, error_line, exit_status, sigterm_as_interrupt
from pbe.files import check_can_write

from .convert import convert, read_config

DESCRIPTION = "Convert a Paint by Example checkpoint to pbe's native format."


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the convert command's arguments to ``parser`` (a top-level parser or a subcommand's); return it."""
    parser.add_argument("src", type=Path, help="hub-layout folder, original model.ckpt / original-layout .safetensors, "
                                               "or a pbe native .safetensors (re-saved, e.g. in another --dtype)")
    parser.add_argument("out", type=Path, help="the native .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of the written tensors (default fp32)")
    parser.add_argument("--config", type=Path, default=None,
                        help="the networks' config for an original-layout checkpoint of a NON-official structure (head "
                             "counts and GroupNorm groups cannot be read from weights): a pbe config JSON or a "
                             "hub-layout folder with unet/, vae/, image_encoder/ config.json (default: the official "
                             "values, used only when the checkpoint's structure is the official one)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert as ``args`` (from a parser given ``add_arguments``) says; print the report. Returns the exit status 0.

    Raises ``UsageError`` (bad output name, existing output without ``overwrite``, missing source or config, an
    output folder that takes no file: all before the source is read), ``CheckpointError`` (a source or config that
    cannot be read or converted) or ``OSError`` (writing failed); the file ``out`` is then left as it was. SIGTERM
    raises ``KeyboardInterrupt`` meanwhile, as Ctrl-C does, so nothing is left behind.
    """
    with sigterm_as_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    src, out = args.src, args.out
    if out.suffix != ".safetensors":
        raise UsageError(f"{out}: the output must end in .safetensors")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise UsageError(f"{out}: refusing to overwrite the input")
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; give a file name ending in .safetensors")
    for name, path in (("", src), ("--config ", args.config)):
        if path is not None and not path.exists():
            raise UsageError(f"{name}{path}: no such file or folder")
    if out.exists() and not args.overwrite:
        # Swapped arguments (`pbe convert pbe.safetensors model.safetensors`) must not destroy a downloaded checkpoint.
        raise UsageError(f"{out}: already exists; pass --overwrite to replace it")
    try:
        check_can_write(out)
    except OSError as err:
        raise UsageError(str(err)) from None
    base = None if args.config is None else read_config(args.config, name="--config")
    converted = convert(src, base=base)
    save_native(converted.state_dicts, converted.config, out, dtype=DTYPES[args.dtype])
    print(converted.report())
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0


def main(argv: list[str] | None = None, *, prog: str = "python -m weights_convert") -> int:
    """The whole command: parse ``argv``, convert; errors end as one ``error: ...`` line on stderr, with exit status 2
    for usage errors and 1 for a conversion that failed."""
    args = add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION)).parse_args(argv)
    try:
        return run(args)
    except COMMAND_ERRORS as err:
        print(error_line(err), file=sys.stderr)
        return exit_status(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
