"""pbe.evaluation.metrics against the implementations the paper's numbers come from: pytorch-fid's Frechet distance
(scipy ``sqrtm``), scikit-learn's ``GaussianMixture.score_samples``, the official eval_tool's CLIP score and QS."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from pbe.evaluation.metrics import (GaussianMixture, box_from_mask, clip_scores, feature_statistics, fid,
                                    frechet_distance, gmm_log_likelihood, load_gaussian_mixture, quality_scores)


def pytorch_fid_frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                                 eps: float = 1e-6) -> float:
    """pytorch-fid 0.3's ``calculate_frechet_distance`` (the official eval_tool/fid/fid_score.py's), line for line."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _features(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    """Correlated features of CLIP's scale (norms around 10)."""
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * (0.4 / np.sqrt(d)) + shift


@pytest.mark.parametrize(("n", "d"), [(600, 64), (3500, 512), (300, 512), (40, 64)],
                         ids=["well-conditioned", "cocoee-size", "fewer-pictures-than-dims", "singular"])
def test_frechet_distance_equals_pytorch_fid(n: int, d: int) -> None:
    pytest.importorskip("scipy")
    rng = np.random.default_rng(n + d)
    stats1 = feature_statistics(_features(rng, n, d))
    stats2 = feature_statistics(_features(rng, n, d, shift=0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy 1.17 deprecates sqrtm's disp (pytorch-fid's)
        expected = pytorch_fid_frechet_distance(*stats1, *stats2)
    assert frechet_distance(*stats1, *stats2) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_statistics_are_pytorch_fids() -> None:
    rng = np.random.default_rng(1)
    features = _features(rng, 200, 16)
    assert abs(fid(features, features)) < 1e-9
    mu, sigma = feature_statistics(features.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_array_equal(sigma, np.cov(features.astype(np.float32).astype(np.float64), rowvar=False))


def test_frechet_distance_refuses_bad_statistics() -> None:
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match=r"means \(4,\) and \(3,\)"):
        frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma2 holds values that are not finite"):
        frechet_distance(mu, sigma, mu, np.full((4, 4), np.nan))
    not_a_covariance = np.diag([1.0, 1.0, 1.0, -1.0])  # sqrt(-1) = 1j: pytorch-fid raises "Imaginary component"
    with pytest.raises(ValueError, match="covariance product has a negative eigenvalue.*imaginary component 1"):
        frechet_distance(mu, sigma, mu, not_a_covariance)
    with pytest.raises(ValueError, match="first covariance has a negative eigenvalue.*imaginary component 1"):
        frechet_distance(mu, not_a_covariance, mu, sigma)


def test_frechet_distance_retries_with_the_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    import pbe.evaluation.metrics as metrics

    calls = []
    original = metrics._trace_sqrt_product

    def failing_once(s1: np.ndarray, s2: np.ndarray) -> float:
        calls.append(np.diagonal(s1).copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return original(s1, s2)

    monkeypatch.setattr(metrics, "_trace_sqrt_product", failing_once)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        value = frechet_distance(np.zeros(3), np.eye(3), np.ones(3), np.eye(3))
    np.testing.assert_allclose(calls[1], 1 + 1e-6)
    # pytorch-fid offsets the covariances inside the root only: |1|^2 + 3 + 3 - 2 * 3 (1 + eps)
    assert value == pytest.approx(3 - 6e-6, rel=1e-12)


# ---- QS ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_log_likelihood_equals_sklearn_score_samples(kind: str, tmp_path: Path) -> None:
    mixture_module = pytest.importorskip("sklearn.mixture")
    rng = np.random.default_rng(2)
    real = _features(rng, 800, 12) * 10
    results = _features(rng, 60, 12, shift=0.2) * 10
    gmm = mixture_module.GaussianMixture(n_components=20, covariance_type=kind, random_state=0).fit(real)
    # How a user turns the fitted mixture into the .npz QS reads (README, "Measuring quality").
    GaussianMixture(gmm.weights_, gmm.means_, gmm.covariances_, gmm.covariance_type).save(tmp_path / "gmm.npz")
    ours = gmm_log_likelihood(results, load_gaussian_mixture(tmp_path / "gmm.npz"))
    np.testing.assert_allclose(ours, gmm.score_samples(results), rtol=1e-9, atol=1e-9)


def test_qs_is_the_official_mapping() -> None:
    log_likelihoods = np.array([-50.0, 0.0, 150.0, 300.0, 450.0])
    # gmm_score_coco.py: (score - 0) / (300 - 0), np.clip(.., 0, 1), sum / len * 100
    np.testing.assert_allclose(quality_scores(log_likelihoods), [0, 0, 0.5, 1, 1])
    assert quality_scores(log_likelihoods).mean() * 100 == pytest.approx(50.0)


def test_a_pickled_mixture_is_not_read(tmp_path: Path) -> None:
    np.savez(tmp_path / "gmm.npz", weights=np.ones(1), means=np.zeros((1, 2)),
             covariances=np.array([{"not": "an array"}], dtype=object))
    with pytest.raises(ValueError, match="pickled objects, which are not read"):
        load_gaussian_mixture(tmp_path / "gmm.npz")


def test_a_mixture_of_mismatched_shapes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"covariances \(2, 3\); expected \[K\], \[K, D\] and \[2, 3, 3\]"):
        GaussianMixture(np.ones(2) / 2, np.zeros((2, 3)), np.ones((2, 3)), "full")
    np.savez(tmp_path / "gmm.npz", weights=np.ones(1), means=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="no covariances array"):
        load_gaussian_mixture(tmp_path / "gmm.npz")
    mixture = GaussianMixture(np.ones(1), np.zeros((1, 2)), np.eye(2)[None])
    with pytest.raises(ValueError, match=r"features of shape \(4, 3\); the mixture's components have 2 dimensions"):
        gmm_log_likelihood(np.zeros((4, 3)), mixture)


# ---- CLIP score ----------------------------------------------------------------------------------------------------


def test_clip_score_is_100_times_the_cosine() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    # region_clip_score.py: normalise both, 100 * a @ b.T per pair
    expected = [100 * (x / np.linalg.norm(x)) @ (y / np.linalg.norm(y)) for x, y in zip(a, b)]
    np.testing.assert_allclose(clip_scores(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(clip_scores(a, 3 * a), 100.0)


def test_the_box_is_the_official_crop() -> None:
    mask = np.zeros((10, 12), np.uint8)
    mask[2:7, 3:9] = 255  # rows 2..6, columns 3..8
    # test_bench_dataset.py: first and last white pixel in reading order, crop [r0:r1, c0:c1] (last ones left out)
    assert box_from_mask(mask) == (2, 3, 6, 8)
    mask[5, 4] = 254  # not white: the official test is == 255
    assert box_from_mask(mask) == (2, 3, 6, 8)
    with pytest.raises(ValueError, match="no white"):
        box_from_mask(np.zeros((4, 4), np.uint8))
    one_row = np.zeros((4, 4), np.uint8)
    one_row[1, :] = 255
    with pytest.raises(ValueError, match="empty crop"):
        box_from_mask(one_row)
