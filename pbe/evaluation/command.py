"""The ``pbe eval`` command: the COCOEE metrics of painted pictures, as a JSON report and a printed table.

    pbe eval --clip CLIP --results PAINTED (--manifest MANIFEST | --references REFS --masks MASKS)
             [--real REAL] [--qs-gmm GMM.npz] [-o REPORT.json]

Everything named is checked before the CLIP model loads (usage errors exit 2); features are cached per folder
(``--cache-dir``), so a second run with other options reads no picture twice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import UsageError
from ..files import check_can_write, write_atomically
from . import evaluate, list_pictures, load_gaussian_mixture, pictures_from_folders, pictures_from_manifest

DESCRIPTION = ("Measure quality as the paper does on COCOEE: FID between the CLIP ViT-B/32 features of the results and "
               "of real pictures (--real), CLIP score of the result inside the mask's box against the reference, and "
               "QS under a Gaussian mixture (--qs-gmm). Works on pbe batch's output with its manifest (--manifest), "
               "or on folders paired by name (--references, --masks).")


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pbe" / "eval"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``pbe eval``'s arguments to ``parser``; return it."""
    parser.add_argument("--clip", required=True, type=Path,
                        help="CLIP ViT-B/32 as a transformers CLIPModel folder or weights file "
                             "(openai/clip-vit-base-patch32)")
    parser.add_argument("--results", required=True, type=Path, help="the painted pictures (pbe batch's -o folder)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="the pbe batch manifest that painted --results: each row's example is the reference, "
                             "its mask the box")
    parser.add_argument("--references", type=Path, default=None,
                        help="without --manifest: the reference pictures, paired with results by name "
                             "(12.png, 12_GT.png ~ 12_ref.png)")
    parser.add_argument("--masks", type=Path, default=None,
                        help="without --manifest: the box masks (white = box), paired by name (12_mask.png)")
    parser.add_argument("--real", type=Path, default=None,
                        help="real pictures for FID (COCOEE: COCO test2017, resized to 512 and centre-cropped)")
    parser.add_argument("--qs-gmm", type=Path, default=None,
                        help="QS's Gaussian mixture as .npz (weights, means, covariances, covariance_type)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--batch-size", type=int, default=50, help="pictures per forward pass (default 50)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--cache-dir", type=Path, default=_default_cache(),
                        help=f"where features are cached (default {_default_cache()})")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    return parser


def _check(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected a positive count, got {args.batch_size}")
    if not args.clip.exists():
        raise UsageError(f"--clip {args.clip}: no such file or folder")
    if args.manifest is not None and (args.references is not None or args.masks is not None):
        raise UsageError("--manifest gives the references and masks; drop --references/--masks")
    if (args.references is None) != (args.masks is None):
        raise UsageError("--references and --masks go together (the CLIP score needs both)")
    if args.manifest is None and args.references is None and args.real is None and args.qs_gmm is None:
        raise UsageError("nothing to measure: give --real (FID), --manifest or --references and --masks "
                         "(CLIP score), or --qs-gmm (QS)")
    if args.real is not None:
        list_pictures(args.real, flag="--real")
    if args.qs_gmm is not None and not args.qs_gmm.is_file():
        raise UsageError(f"--qs-gmm {args.qs_gmm}: no such file")
    if args.output is not None:
        if args.output.is_dir():
            raise UsageError(f"-o {args.output}: is a folder; give a file name such as {args.output / 'report.json'}")
        try:
            check_can_write(args.output)
        except OSError as err:
            raise UsageError(f"-o {args.output}: {err}") from None


def _device(requested: str) -> torch.device:
    """The device ``--device`` names, refused (usage error) if it does not exist here."""
    try:
        device = resolve_device(requested)
    except ValueError:
        device = torch.device("meta")  # refused below with the same message as any other kind
    present = {"cpu": lambda: True, "cuda": lambda: (device.index or 0) < torch.cuda.device_count(),
               "mps": torch.backends.mps.is_available}
    if device.type not in present:
        raise UsageError(f"--device {requested}: expected auto, cpu, cuda, cuda:N or mps")
    if not present[device.type]():
        raise UsageError(f"--device {requested}: no such device here (PyTorch {torch.__version__})")
    return device


def table(report: dict) -> str:
    """The report's metrics as a small text table (the paper's columns and direction)."""
    rows = [("FID", report["fid"], "lower is better"), ("QS", report["qs"], "higher is better"),
            ("CLIP score", report["clip_score"], "higher is better")]
    lines = [f"{'metric':<11}{'value':>10}", *(f"{name:<11}{'-' if value is None else f'{value:.3f}':>10}   {note}"
                                              for name, value, note in rows)]
    return "\n".join([*lines, f"over {report['pictures']} pictures, CLIP {report['clip_model']}"])


def run(args: argparse.Namespace) -> int:
    """Run ``pbe eval`` (arguments from ``add_arguments``); 0 on success."""
    _check(args)
    device = _device(args.device)
    try:
        mixture = load_gaussian_mixture(args.qs_gmm) if args.qs_gmm is not None else None
    except ValueError as err:
        raise UsageError(f"--qs-gmm {err}") from None
    if args.manifest is not None:
        pictures = pictures_from_manifest(args.manifest, args.results)
    else:
        pictures = pictures_from_folders(args.results, references=args.references, masks=args.masks)
    print(f"pbe eval: {len(pictures)} pictures on {device}", file=sys.stderr)
    report = evaluate(pictures, clip=args.clip, real=args.real, mixture=mixture, device=str(device),
                      batch_size=args.batch_size, cache_dir=None if args.no_cache else args.cache_dir)
    if args.output is not None:
        text = json.dumps(report, indent=2) + "\n"
        write_atomically(args.output, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {args.output}", file=sys.stderr)
    print(table(report))
    return 0
