"""``python -m weights_convert SRC OUT.safetensors [--dtype fp32|fp16|bf16]``

Converts a hub-layout folder or an original ``model.ckpt`` into pbe's native single-file checkpoint and prints what
was mapped and what was skipped on purpose. Writes atomically, never over its input, and leaves nothing on failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pbe.checkpoint import CheckpointError, config_from_json, save_native

from .convert import convert

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser(prog: str = "python -m weights_convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Convert a Paint by Example checkpoint to pbe's native format.")
    parser.add_argument("src", type=Path, help="hub-layout folder, or original model.ckpt / original-layout .safetensors")
    parser.add_argument("out", type=Path, help="the native .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written tensors (default fp32)")
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON config (pbe's schema) for an original-layout checkpoint of a NON-official structure: "
                             "head counts and GroupNorm groups cannot be read from weights (default: official values)")
    return parser


def run(src: Path, out: Path, dtype: str, config: Path | None = None) -> int:
    """Convert; on a bad source print one line to stderr and return 1."""
    try:
        base = None
        if config is not None:
            try:
                base = config_from_json(config.read_text())
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{config}: not a pbe config JSON ({err})") from None
        if out.suffix != ".safetensors":
            raise CheckpointError(f"{out}: the output must end in .safetensors")
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise CheckpointError(f"{out}: refusing to overwrite the input")
        if out.is_dir():
            raise CheckpointError(f"{out}: is a folder; give a file name ending in .safetensors")
        converted = convert(src, base=base)
        save_native(converted.state_dicts, converted.config, out, dtype=DTYPES[dtype])
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(converted.report())
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {dtype})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.src, args.out, args.dtype, args.config)


if __name__ == "__main__":
    sys.exit(main())
