"""The paper's COCOEE metrics on CLIP features (Yang et al., arXiv 2211.13227, section 4; official ``eval_tool/``).

- FID: the Frechet distance between Gaussians fitted to the CLIP ViT-B/32 image features of the results and of real
  pictures (COCO test2017), d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), as pytorch-fid computes it.
- CLIP score: 100 x cosine between the features of the result cropped to the box and of the reference, averaged.
- QS: the log-likelihood of each result's features under a Gaussian mixture fitted to real pictures' features,
  mapped by ``clip((ll - 0) / 300, 0, 1)`` and averaged, x 100.

NumPy only (float64): no scipy, no scikit-learn at run time; the tests prove the equalities with both.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

QS_RANGE = (0.0, 300.0)  # the official gmm_score_coco.py's min_number and max_number
IMAGINARY_TOLERANCE = 1e-3  # pytorch-fid's bound on the imaginary part left by the matrix square root
GMM_COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")  # scikit-learn's GaussianMixture covariance_type


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, N - 1) of features ``[N, D]`` in float64: pytorch-fid's statistics."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features: expected an [N, D] array with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _symmetric_root(matrix: np.ndarray, *, name: str) -> np.ndarray:
    """The PSD square root of a symmetric matrix; eigenvalues below zero by more than rounding are refused."""
    values, vectors = np.linalg.eigh(matrix)
    _refuse_imaginary(values, name=name)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _refuse_imaginary(eigenvalues: np.ndarray, *, name: str) -> None:
    # A negative eigenvalue -v gives the root an imaginary part sqrt(v); pytorch-fid drops it below 1e-3, else raises.
    imaginary = math.sqrt(max(-float(eigenvalues.min()), 0.0))
    if imaginary > IMAGINARY_TOLERANCE:
        raise ValueError(f"Frechet distance: {name} has a negative eigenvalue ({eigenvalues.min():.3g}): its square "
                         f"root has an imaginary component {imaginary:.3g} (above {IMAGINARY_TOLERANCE})")


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = sum of sqrt(eig(S1^(1/2) S2 S1^(1/2))): the same eigenvalues, from symmetric matrices."""
    root1 = _symmetric_root(sigma1, name="the first covariance")
    product = root1 @ sigma2 @ root1
    values = np.linalg.eigvalsh((product + product.T) / 2)
    _refuse_imaginary(values, name="the covariance product")
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), equal to pytorch-fid's
    ``calculate_frechet_distance`` (scipy ``sqrtm``) without scipy.

    A singular product (fewer pictures than feature dimensions) needs no special care in the symmetric form; should
    the eigendecomposition fail anyway, it is retried with ``eps`` added to both diagonals, as pytorch-fid does.
    Raises ``ValueError`` for shapes that differ, values that are not finite, or a product whose square root has an
    imaginary part above 1e-3 (pytorch-fid's check).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"Frechet distance: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and "
                         f"{sigma2.shape}; expected [D] and [D, D] for one D")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"Frechet distance: {name} holds values that are not finite")
    try:
        trace_root = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        warnings.warn(f"Frechet distance: the decomposition failed; adding {eps} to the covariances' diagonals",
                      stacklevel=2)
        offset = np.eye(len(mu1)) * eps
        trace_root = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Frechet distance between two sets of features ``[N, D]``."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# ---- CLIP score ----------------------------------------------------------------------------------------------------


def box_from_mask(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the white (255) pixels of a box mask ``[H, W]`` uint8, as the official code finds
    them: the first and the last white pixel in reading order. Raises ``ValueError`` if the box is empty.

    Reference quirk: the official crop ``result[top:bottom, left:right]`` uses the last white pixel's row and column
    as exclusive ends, so it leaves out the box's last row and column; ``crop_box`` keeps that.
    """
    white = np.flatnonzero(np.asarray(mask).ravel() == 255)
    if white.size == 0:
        raise ValueError("mask: no white (255) pixel; the CLIP score needs the box as white pixels")
    (top, bottom), (left, right) = np.unravel_index([white[0], white[-1]], np.shape(mask))
    if bottom <= top or right <= left:
        raise ValueError(f"mask: the box from its first to its last white pixel, rows {top}..{bottom}, columns "
                         f"{left}..{right}, leaves an empty crop (the official code drops the last row and column)")
    return int(top), int(left), int(bottom), int(right)


def clip_scores(result_features: np.ndarray, reference_features: np.ndarray) -> np.ndarray:
    """100 x the cosine similarity of each pair of feature rows ``[N, D]`` (the official region CLIP score per
    picture; the reported score is their mean)."""
    a = np.asarray(result_features, np.float64)
    b = np.asarray(reference_features, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"CLIP score: result features {a.shape} and reference features {b.shape}; expected two "
                         f"[N, D] arrays of one shape")
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * (a * b).sum(axis=-1)


# ---- QS: a Gaussian mixture's log-likelihood ----------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianMixture:
    """A Gaussian mixture as plain arrays: scikit-learn's ``weights_``, ``means_``, ``covariances_`` and
    ``covariance_type``. Saved and read as an ``.npz`` file, never a pickle."""

    weights: np.ndarray  # [K], summing to 1
    means: np.ndarray  # [K, D]
    covariances: np.ndarray  # full [K, D, D], tied [D, D], diag [K, D], spherical [K]
    covariance_type: str = "full"

    def __post_init__(self) -> None:
        k, d = np.shape(self.means) if np.ndim(self.means) == 2 else (None, None)
        expected = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}
        if self.covariance_type not in expected:
            raise ValueError(f"Gaussian mixture: covariance_type {self.covariance_type!r}; expected one of "
                             f"{', '.join(GMM_COVARIANCE_TYPES)}")
        if k is None or np.shape(self.weights) != (k,) or np.shape(self.covariances) != expected[self.covariance_type]:
            raise ValueError(f"Gaussian mixture: weights {np.shape(self.weights)}, means {np.shape(self.means)}, "
                             f"covariances {np.shape(self.covariances)}; expected [K], [K, D] and "
                             f"{list(expected[self.covariance_type])} for covariance_type {self.covariance_type!r}")

    def full_covariances(self) -> np.ndarray:
        """Every component's covariance as a [D, D] matrix: [K, D, D] float64."""
        k, d = self.means.shape
        cov = np.asarray(self.covariances, np.float64)
        if self.covariance_type == "tied":
            return np.broadcast_to(cov, (k, d, d))
        if self.covariance_type == "diag":
            return cov[:, :, None] * np.eye(d)
        if self.covariance_type == "spherical":
            return cov[:, None, None] * np.eye(d)
        return cov

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the mixture as an ``.npz`` file of plain arrays (``load_gaussian_mixture`` reads it)."""
        np.savez(path, weights=self.weights, means=self.means, covariances=self.covariances,
                 covariance_type=np.array(self.covariance_type))


def load_gaussian_mixture(path: str | os.PathLike[str]) -> GaussianMixture:
    """Read a mixture saved as ``.npz`` (arrays ``weights``, ``means``, ``covariances``, optional ``covariance_type``,
    default "full"). Pickled objects are refused: an ``.npz`` holding one is an error, not code to run."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("weights", "means", "covariances") if k not in data]
            if missing:
                raise ValueError(f"{path}: no {', '.join(missing)} array; expected a Gaussian mixture saved as .npz "
                                 f"(weights, means, covariances, covariance_type)")
            kind = str(data["covariance_type"]) if "covariance_type" in data else "full"
            return GaussianMixture(np.array(data["weights"], np.float64), np.array(data["means"], np.float64),
                                   np.array(data["covariances"], np.float64), kind)
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    except ValueError as err:
        if "pickle" in str(err):
            raise ValueError(f"{path}: holds pickled objects, which are not read; save plain arrays") from None
        raise


def gmm_log_likelihood(features: np.ndarray, mixture: GaussianMixture) -> np.ndarray:
    """log p(x) per row of ``features`` [N, D] under ``mixture``: scikit-learn's ``score_samples``, in float64.

    log p(x) = logsumexp_k [log w_k - (D log 2 pi + log det S_k + (x - mu_k)^T S_k^-1 (x - mu_k)) / 2].
    """
    x = np.asarray(features, np.float64)
    k, d = mixture.means.shape
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"QS: features of shape {x.shape}; the mixture's components have {d} dimensions")
    per_component = np.empty((len(x), k))
    for i, (mean, cov) in enumerate(zip(mixture.means, mixture.full_covariances())):
        chol = np.linalg.cholesky(cov)  # S = L L^T: the Mahalanobis term is |L^-1 (x - mu)|^2
        whitened = np.linalg.solve(chol, (x - mean).T)
        log_det = 2 * np.log(np.diagonal(chol)).sum()
        per_component[:, i] = -0.5 * (d * math.log(2 * math.pi) + log_det + (whitened**2).sum(axis=0))
    per_component += np.log(mixture.weights)
    top = per_component.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(per_component - top).sum(axis=1, keepdims=True)))[:, 0]


def quality_scores(log_likelihoods: np.ndarray) -> np.ndarray:
    """Each picture's QS term: ``clip((ll - 0) / 300, 0, 1)`` (the official mapping); QS is their mean x 100."""
    low, high = QS_RANGE
    return np.clip((np.asarray(log_likelihoods, np.float64) - low) / (high - low), 0, 1)
