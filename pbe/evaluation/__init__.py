"""Measuring quality: the paper's COCOEE metrics (FID, CLIP score, QS) on CLIP ViT-B/32 features.

``evaluate`` scores files (``pbe eval``: results, references, box masks, real pictures); ``score_pictures`` scores
pictures held in memory (a training loop's validation paintings). Both take the official ``eval_tool/`` semantics:
``pbe.evaluation.metrics`` for the numbers, ``pbe.evaluation.features`` for how a picture becomes features.

From Python::

    from pbe.evaluation import evaluate, load_gaussian_mixture, pictures_from_manifest
    pictures = pictures_from_manifest("cocoee.jsonl", "painted")  # what `pbe batch cocoee.jsonl -o painted` wrote
    report = evaluate(pictures, clip="clip-vit-base-patch32", real="coco/test2017_512",
                      mixture=load_gaussian_mixture("qs_gmm.npz"))
    print(report["fid"], report["clip_score"], report["qs"])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ..batch import read_manifest
from ..errors import UsageError
from ..model import CLIPFeaturesConfig
from . import features as feat
from .metrics import (GaussianMixture, clip_scores, feature_statistics, frechet_distance, gmm_log_likelihood,
                      load_gaussian_mixture, quality_scores)

__all__ = ["GaussianMixture", "Picture", "evaluate", "list_pictures", "load_gaussian_mixture", "pictures_from_folders",
           "pictures_from_manifest", "score_pictures"]

# The picture files a folder is read for (pytorch-fid's list, matched without regard to case).
IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# COCOEE names one picture's files `{id}_GT.png`, `{id}_ref.png`, `{id}_mask.png`; the official results `{id}.png`.
ID_SUFFIXES = ("_GT", "_ref", "_mask")
METRICS = ("fid", "clip_score", "qs")


@dataclass(frozen=True)
class Picture:
    """One evaluated result and what its CLIP score compares it with (the reference inside the mask's box)."""

    name: str
    result: Path
    reference: Path | None = None
    mask: Path | None = None  # white (255) = the box


def list_pictures(folder: str | os.PathLike[str], *, flag: str = "folder") -> list[Path]:
    """The picture files directly in ``folder``, sorted by name; ``UsageError`` naming ``flag`` if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{flag} {folder}: no pictures in it (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def picture_id(path: Path) -> str:
    """The id a file is paired by: its stem without COCOEE's ``_GT``/``_ref``/``_mask`` ending."""
    stem = path.stem
    return next((stem[: -len(s)] for s in ID_SUFFIXES if stem.endswith(s)), stem)


def _by_id(files: list[Path], flag: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        other = found.setdefault(picture_id(path), path)
        if other != path:
            raise UsageError(f"{flag}: {other.name} and {path.name} are both picture {picture_id(path)!r}")
    return found


def pictures_from_folders(results: str | os.PathLike[str], *, references: str | os.PathLike[str] | None = None,
                          masks: str | os.PathLike[str] | None = None) -> list[Picture]:
    """Every picture of ``results``, paired by id with its reference and mask (``12_GT.png``, ``12_ref.png``,
    ``12_mask.png`` and ``12.png`` are all picture ``12``). ``UsageError`` naming the first unpaired result."""
    result_files = _by_id(list_pictures(results, flag="--results"), "--results")
    others = {flag: _by_id(list_pictures(folder, flag=flag), flag) if folder is not None else None
              for flag, folder in (("--references", references), ("--masks", masks))}
    for flag, found in others.items():
        missing = [i for i in result_files if found is not None and i not in found]
        if missing:
            raise UsageError(f"{flag}: no picture for {len(missing)} result(s), first {result_files[missing[0]].name} "
                             f"(id {missing[0]!r}); files are paired by name without _GT/_ref/_mask")
    refs, mask_files = others["--references"], others["--masks"]
    return [Picture(i, path, refs[i] if refs else None, mask_files[i] if mask_files else None)
            for i, path in result_files.items()]


def pictures_from_manifest(manifest: str | os.PathLike[str], results: str | os.PathLike[str]) -> list[Picture]:
    """The pictures a ``pbe batch MANIFEST -o RESULTS`` run painted: each row's output, its example (the reference)
    and its mask (the box). ``UsageError`` if an output is missing (the run is not finished)."""
    rows = read_manifest(manifest)
    pictures = [Picture(row.output.as_posix(), Path(results) / row.output, row.example, row.mask) for row in rows]
    missing = [p for p in pictures if not p.result.is_file()]
    if missing:
        raise UsageError(f"--results {results}: {len(missing)} of {len(pictures)} outputs of {manifest} are missing, "
                         f"first {missing[0].result}; finish the pbe batch run first")
    return pictures


def describe(config: CLIPFeaturesConfig) -> str:
    """``ViT-B/32`` for the paper's CLIP, else the size of the one used (the paper's numbers do not compare)."""
    if config == CLIPFeaturesConfig():
        return "ViT-B/32"
    c = config.clip
    return (f"not the paper's ViT-B/32: width {c.width}, {c.layers} layers, patch {c.patch_size}, "
            f"image {c.image_size}, projection {config.projection_dim}")


def _real_features(real: str | os.PathLike[str], features_of: Callable[[list, str], np.ndarray], identity: str, *,
                   size: int, cache_dir: Path | None) -> np.ndarray:
    files = list_pictures(real, flag="--real")
    key = feat.cache_key("clip_preprocess", identity, [files])
    return feat.cached(_cache_path(cache_dir, "real", real, key), [f.name for f in files],
                       lambda: features_of([_prepared(feat.clip_preprocess, size, f) for f in files], "real"))


def _cache_path(cache_dir: Path | None, kind: str, folder: str | os.PathLike[str], key: str) -> Path | None:
    return None if cache_dir is None else cache_dir / f"{kind}-{Path(folder).resolve().name}-{key}.npz"


def _prepared(prepare: Callable[..., Any], size: int, *paths: Path) -> Callable[[], Any]:
    """``prepare`` on the pictures ``paths``, deferred; its errors name the files."""

    def run() -> Any:
        try:
            return prepare(*(feat.open_picture(p) for p in paths), size=size)
        except (OSError, ValueError) as err:
            raise type(err)(f"{' with '.join(str(p) for p in paths)}: {err}") from None

    return run


def evaluate(pictures: Sequence[Picture], *, clip: str | os.PathLike[str], real: str | os.PathLike[str] | None = None,
             mixture: GaussianMixture | None = None, device: str = "cpu", batch_size: int = 50,
             cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """The COCOEE metrics of ``pictures`` as a JSON-ready dict: ``fid`` (against the pictures of the folder ``real``),
    ``clip_score`` (pictures with a reference and a mask), ``qs`` (under ``mixture``); a metric without its inputs is
    None. ``per_picture`` holds each picture's CLIP score and QS log-likelihood.

    ``clip``: a transformers CLIP ViT-B/32 checkpoint (file or folder). Features are cached in ``cache_dir`` (one
    file per folder and preparation, keyed by the files' paths, sizes and times and the checkpoint's) when given.
    """
    if not pictures:
        raise UsageError("no pictures to evaluate")
    config = feat.clip_config(clip)
    size = config.clip.image_size
    loaded: list[feat.CLIPImageFeatures] = []  # the model loads on the first features the cache does not hold

    def features_of(prepared: list[Callable[[], Any]], desc: str) -> np.ndarray:
        if not loaded:
            loaded.append(feat.load_clip_features(clip, config=config, device=device))
        return feat.extract_features(loaded[0], prepared, batch_size=batch_size, desc=desc if progress else None)

    identity = feat.model_identity(clip)
    cache = Path(cache_dir) if cache_dir is not None else None
    results = [p.result for p in pictures]
    names = [p.name for p in pictures]
    folder = os.path.commonpath([str(r.parent.resolve()) for r in results])
    report: dict[str, Any] = {"pictures": len(pictures), "fid": None, "clip_score": None, "qs": None,
                              "clip_checkpoint": str(clip), "clip_model": describe(config)}
    per_picture: dict[str, dict[str, float]] = {n: {} for n in names}

    if real is not None or mixture is not None:
        key = feat.cache_key("clip_preprocess", identity, [results])
        result_features = feat.cached(
            _cache_path(cache, "results", folder, key), names,
            lambda: features_of([_prepared(feat.clip_preprocess, size, r) for r in results], "results"))
        if real is not None:
            real_features = _real_features(real, features_of, identity, size=size, cache_dir=cache)
            report["fid"] = frechet_distance(*feature_statistics(result_features), *feature_statistics(real_features))
            report["real_pictures"] = len(real_features)
        if mixture is not None:
            likelihoods = gmm_log_likelihood(result_features, mixture)
            report["qs"] = float(quality_scores(likelihoods).mean() * 100)
            for n, ll in zip(names, likelihoods):
                per_picture[n]["log_likelihood"] = float(ll)

    paired = [p for p in pictures if p.reference is not None and p.mask is not None]
    if paired:
        crops = [p.result for p in paired] + [p.mask for p in paired]
        key = feat.cache_key("region_crop", identity, [crops])
        crop_features = feat.cached(
            _cache_path(cache, "crops", folder, key), [p.name for p in paired],
            lambda: features_of([_prepared(feat.region_crop, size, p.result, p.mask) for p in paired], "crops"))
        references = [p.reference for p in paired]
        ref_folder = os.path.commonpath([str(r.parent.resolve()) for r in references])
        key = feat.cache_key("reference_pixels", identity, [references])
        reference_features = feat.cached(
            _cache_path(cache, "references", ref_folder, key), [p.name for p in paired],
            lambda: features_of([_prepared(feat.reference_pixels, size, r) for r in references], "references"))
        scores = clip_scores(crop_features, reference_features)
        report["clip_score"] = float(scores.mean())
        for p, s in zip(paired, scores):
            per_picture[p.name]["clip_score"] = float(s)
    report["per_picture"] = per_picture
    return report


def score_pictures(model: feat.CLIPImageFeatures, results: Sequence[PIL.Image.Image], *,
                   references: Sequence[PIL.Image.Image] | None = None,
                   masks: Sequence[PIL.Image.Image] | None = None,
                   real_statistics: tuple[np.ndarray, np.ndarray] | None = None,
                   mixture: GaussianMixture | None = None, batch_size: int = 50) -> dict[str, float | None]:
    """The metrics of pictures in memory (a training loop's validation paintings): ``fid`` against
    ``real_statistics`` (mean and covariance of real pictures' features: ``feature_statistics``; needs 2 or more
    results), ``clip_score`` with ``references`` and box ``masks``, ``qs`` under ``mixture``; None where not asked.

    ``model``: ``pbe.evaluation.features.load_clip_features(...)``, loaded once by the caller.
    """
    if references is not None and masks is not None and not len(references) == len(masks) == len(results):
        raise ValueError(f"score_pictures: {len(results)} results, {len(references)} references, {len(masks)} masks")
    scores: dict[str, float | None] = {m: None for m in METRICS}
    size = model.config.clip.image_size
    if real_statistics is not None or mixture is not None:
        features = feat.extract_features(model, [lambda r=r: feat.clip_preprocess(r, size=size) for r in results],
                                         batch_size=batch_size)
        if real_statistics is not None and len(results) >= 2:
            scores["fid"] = frechet_distance(*feature_statistics(features), *real_statistics)
        if mixture is not None:
            scores["qs"] = float(quality_scores(gmm_log_likelihood(features, mixture)).mean() * 100)
    if references is not None and masks is not None:
        crops = feat.extract_features(model, [lambda r=r, m=m: feat.region_crop(r, m, size=size)
                                                    for r, m in zip(results, masks)],
                                      batch_size=batch_size)
        refs = feat.extract_features(model, [lambda r=r: feat.reference_pixels(r, size=size) for r in references],
                                     batch_size=batch_size)
        scores["clip_score"] = float(clip_scores(crops, refs).mean())
    return scores
