"""pbe.evaluation and ``pbe eval``: the official eval code's picture preparation, and the metrics of files end to end
against references computed live (transformers' ``get_image_features``, pytorch-fid's distance, scikit-learn's
``score_samples``) on synthetic pictures and a tiny random CLIPModel."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from pbe.cli import main
from pbe.evaluation import features as feat
from pbe.evaluation import pictures_from_folders, score_pictures
from pbe.evaluation.metrics import GaussianMixture
from pbe.images import CLIP_MEAN, CLIP_STD
from test_clip_features import _tiny_clip
from test_evaluation_metrics import pytorch_fid_frechet_distance

SIZE = 64  # the tiny CLIP's input side


def _normalised(array: np.ndarray) -> torch.Tensor:
    """torchvision's ToTensor + Normalize(CLIP mean, std), written out: (x / 255 - mean) / std in float32."""
    x = torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def _picture(rng: np.random.Generator, width: int, height: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---- preparing pictures as the official eval code does -------------------------------------------------------------


def test_clip_preprocess_rounds_the_centre_crop_offsets() -> None:
    rng = np.random.default_rng(0)
    # Short side already 224: torchvision's Resize returns the picture itself; 3 columns to crop -> round(1.5) = 2.
    picture = _picture(rng, 227, 224)
    expected = _normalised(np.asarray(picture)[:, 2:226])
    torch.testing.assert_close(feat.clip_preprocess(picture), expected, rtol=0, atol=0)
    # 1 surplus column: round(0.5) = 0 (round half to even), as torchvision's int(round(...)).
    picture = _picture(rng, 225, 224)
    torch.testing.assert_close(feat.clip_preprocess(picture), _normalised(np.asarray(picture)[:, :224]), rtol=0,
                               atol=0)


def test_clip_preprocess_resizes_the_short_side_with_pil_bicubic_then_converts() -> None:
    rng = np.random.default_rng(1)
    picture = _picture(rng, 200, 301).convert("RGBA")  # RGB conversion comes last (after the crop), alpha dropped
    resized = picture.resize((224, int(224 * 301 / 200)), PIL.Image.Resampling.BICUBIC)  # (224, 337): floored
    top = int(round((337 - 224) / 2.0))  # 56.5 -> 56
    expected = _normalised(np.asarray(resized.crop((0, top, 224, top + 224)).convert("RGB")))
    torch.testing.assert_close(feat.clip_preprocess(picture), expected, rtol=0, atol=0)


def test_region_crop_is_the_official_crop_then_a_tensor_resize() -> None:
    rng = np.random.default_rng(2)
    result = _picture(rng, 96, 80)
    mask = np.zeros((80, 96), np.uint8)
    mask[10:50, 20:71] = 255
    # Normalise the whole picture, crop [10:49, 20:70] (the box's last row and column left out), resize as a tensor.
    crop = _normalised(np.asarray(result))[:, 10:49, 20:70]
    expected = F.interpolate(crop[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(feat.region_crop(result, PIL.Image.fromarray(mask), size=SIZE), expected, rtol=0,
                               atol=0)
    with pytest.raises(ValueError, match="mask of 96x81 for a result of 96x80"):
        feat.region_crop(result, PIL.Image.new("L", (96, 81), 255))


def test_reference_pixels_squash_with_pillows_default_filter() -> None:
    rng = np.random.default_rng(3)
    reference = _picture(rng, 90, 40)
    expected = _normalised(np.asarray(reference.resize((SIZE, SIZE), PIL.Image.Resampling.BICUBIC)))
    torch.testing.assert_close(feat.reference_pixels(reference, size=SIZE), expected, rtol=0, atol=0)


# ---- pbe eval on files ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cocoee(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny COCOEE-shaped data set: results `{id}_GT.png` (as pbe batch names them), `Ref/{id}_ref.png`,
    `Mask/{id}_mask.png`, real pictures, a tiny CLIPModel folder and a QS mixture fitted by scikit-learn."""
    root = tmp_path_factory.mktemp("cocoee")
    rng = np.random.default_rng(4)
    for folder in ("results", "Ref", "Mask", "real"):
        (root / folder).mkdir()
    for i in range(7):
        name = f"{i:012d}"
        _picture(rng, 80, 72).save(root / "results" / f"{name}_GT.png")
        _picture(rng, 50 + 3 * i, 60).save(root / "Ref" / f"{name}_ref.png")
        mask = np.zeros((72, 80), np.uint8)
        mask[5 + i: 40 + i, 10: 60 - i] = 255
        PIL.Image.fromarray(mask).save(root / "Mask" / f"{name}_mask.png")
    for i in range(9):
        _picture(rng, 70 + i, 64).save(root / "real" / f"{i}.jpg", quality=95)
    _tiny_clip(root / "clip")
    return root


def _reference_features(root: Path, pictures: list[torch.Tensor]) -> np.ndarray:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(root / "clip").eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.stack(pictures))
    out = getattr(out, "image_embeds", getattr(out, "pooler_output", out))
    return out.double().numpy()


def _fit_mixture(folder: Path) -> tuple[Path, object]:
    """A scikit-learn mixture fitted to random 24-dimensional features, saved as QS reads it; (path, the mixture)."""
    mixture = pytest.importorskip("sklearn.mixture")
    rng = np.random.default_rng(5)
    gmm = mixture.GaussianMixture(n_components=2, covariance_type="diag", random_state=0)
    gmm.fit(rng.normal(size=(100, 24)))
    GaussianMixture(gmm.weights_, gmm.means_, gmm.covariances_, gmm.covariance_type).save(folder / "gmm.npz")
    return folder / "gmm.npz", gmm


def test_pbe_eval_equals_the_references(cocoee: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gmm_path, gmm = _fit_mixture(tmp_path)
    out = tmp_path / "report.json"
    status = main(["eval", "--clip", str(cocoee / "clip"), "--results", str(cocoee / "results"), "--references",
                   str(cocoee / "Ref"), "--masks", str(cocoee / "Mask"), "--real", str(cocoee / "real"), "--qs-gmm",
                   str(gmm_path), "-o", str(out), "--device", "cpu", "--batch-size", "3", "--no-cache"])
    assert status == 0
    report = json.loads(out.read_text())

    ids = [f"{i:012d}" for i in range(7)]
    open_ = feat.open_picture
    results = [open_(cocoee / "results" / f"{i}_GT.png") for i in ids]
    full = _reference_features(cocoee, [feat.clip_preprocess(r, size=SIZE) for r in results])
    real = _reference_features(cocoee, [feat.clip_preprocess(open_(p), size=SIZE)
                                        for p in sorted((cocoee / "real").iterdir())])
    crops = _reference_features(cocoee, [feat.region_crop(r, open_(cocoee / "Mask" / f"{i}_mask.png"), size=SIZE)
                                         for r, i in zip(results, ids)])
    refs = _reference_features(cocoee, [feat.reference_pixels(open_(cocoee / "Ref" / f"{i}_ref.png"), size=SIZE)
                                        for i in ids])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected_fid = pytorch_fid_frechet_distance(full.mean(0), np.cov(full, rowvar=False), real.mean(0),
                                                    np.cov(real, rowvar=False))
    cosines = [(a / np.linalg.norm(a)) @ (b / np.linalg.norm(b)) for a, b in zip(crops, refs)]
    log_likelihoods = gmm.score_samples(full)

    assert report["pictures"] == 7 and report["real_pictures"] == 9
    assert report["fid"] == pytest.approx(expected_fid, rel=1e-4)
    assert report["clip_score"] == pytest.approx(100 * np.mean(cosines), rel=1e-4)
    assert report["qs"] == pytest.approx(np.clip(log_likelihoods / 300, 0, 1).mean() * 100, rel=1e-4, abs=1e-6)
    assert report["per_picture"][ids[0]]["log_likelihood"] == pytest.approx(log_likelihoods[0], rel=1e-4)
    printed = capsys.readouterr().out
    assert "FID" in printed and "CLIP score" in printed and "over 7 pictures" in printed
    assert "not the paper's ViT-B/32" in printed


def test_pbe_eval_reads_pbe_batchs_manifest_and_caches(cocoee: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "m.jsonl"
    rows = [{"image": str(cocoee / "results" / f"{i:012d}_GT.png"), "mask": str(cocoee / "Mask" / f"{i:012d}_mask.png"),
             "example": str(cocoee / "Ref" / f"{i:012d}_ref.png"), "output": f"{i}.png"} for i in range(4)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    painted = tmp_path / "painted"
    painted.mkdir()
    for i in range(4):  # what `pbe batch m.jsonl -o painted` would have written
        (painted / f"{i}.png").write_bytes((cocoee / "results" / f"{i:012d}_GT.png").read_bytes())
    argv = ["eval", "--clip", str(cocoee / "clip"), "--results", str(painted), "--manifest", str(manifest),
            "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "r.json"), "--device", "cpu"]
    assert main(argv) == 0
    first = json.loads((tmp_path / "r.json").read_text())
    assert sorted(first["per_picture"]) == ["0.png", "1.png", "2.png", "3.png"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # the crops and the references

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("features computed again despite the cache")

    monkeypatch.setattr(feat, "extract_features", no_model)
    monkeypatch.setattr(feat, "load_clip_features", no_model)  # all cached: the model is not even loaded
    assert main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["clip_score"] == first["clip_score"]


def test_score_pictures_equals_the_file_path(cocoee: Path) -> None:
    model = feat.load_clip_features(cocoee / "clip")
    pictures = pictures_from_folders(cocoee / "results", references=cocoee / "Ref", masks=cocoee / "Mask")
    open_ = feat.open_picture
    scores = score_pictures(model, [open_(p.result) for p in pictures],
                            references=[open_(p.reference) for p in pictures],
                            masks=[open_(p.mask) for p in pictures], batch_size=4)
    from pbe.evaluation import evaluate

    report = evaluate(pictures, clip=cocoee / "clip", progress=False)
    # Batches of 4 here, one of 7 there: equal up to float32 rounding.
    assert scores["clip_score"] == pytest.approx(report["clip_score"], rel=1e-6)
    assert scores["fid"] is None and scores["qs"] is None


def test_a_bad_mask_is_named(cocoee: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in (cocoee / "Mask").iterdir():
        (masks / p.name).write_bytes(p.read_bytes())
    PIL.Image.new("L", (80, 72), 0).save(masks / "000000000003_mask.png")
    argv = ["eval", "--clip", str(cocoee / "clip"), "--results", str(cocoee / "results"), "--references",
            str(cocoee / "Ref"), "--masks", str(masks), "--no-cache", "-o", str(tmp_path / "r.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: .*000000000003_GT.png with .*000000000003_mask.png: mask: no white", err), err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(("extra", "message"), [
    ([], "nothing to measure"),
    (["--references", "REF"], "--references and --masks go together"),
    (["--real", "MISSING"], "--real .*MISSING: no such folder"),
    (["--qs-gmm", "PICKLE"], "--qs-gmm .*pickled objects"),
    (["--references", "REF", "--masks", "SHORT"], "--masks: no picture for 1 result"),
    (["--real", "REAL", "-o", "FOLDER"], "-o .*: is a folder"),
    (["--real", "REAL", "--device", "cuda:7"], "--device cuda:7: no such device here"),
    (["--real", "REAL", "--batch-size", "0"], "--batch-size: expected a positive count, got 0"),
])
def test_usage_errors_exit_2_before_loading(cocoee: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, extra: list[str], message: str) -> None:
    short = tmp_path / "short"
    short.mkdir()
    for p in sorted((cocoee / "Mask").iterdir())[:-1]:
        (short / p.name).write_bytes(p.read_bytes())
    np.savez(tmp_path / "pickle.npz", weights=np.array([object()], dtype=object))
    names = {"REF": cocoee / "Ref", "MISSING": tmp_path / "MISSING", "PICKLE": tmp_path / "pickle.npz",
             "SHORT": short, "REAL": cocoee / "real", "FOLDER": tmp_path}
    monkeypatch.setattr(feat, "load_clip_features", lambda *a, **k: pytest.fail("loaded the model"))
    argv = ["eval", "--clip", str(cocoee / "clip"), "--results", str(cocoee / "results"), "--no-cache",
            *[str(names.get(a, a)) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
