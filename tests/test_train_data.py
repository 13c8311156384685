"""pbe.train.data: the manifest and its refusals, the paper's sample geometry, determinism, the loader's order."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("albumentations", reason="the train extra: pip install 'pbe[train]'")

from pbe.images import CLIP_MEAN, CLIP_STD  # noqa: E402
from pbe.train.data import (  # noqa: E402
    DataConfig,
    ManifestError,
    PaintByExampleDataset,
    TrainRow,
    make_loader,
    read_manifest,
)

# The recipe at a size tests draw in milliseconds (0.4.3's affine warp in px, scaled from 224 to 32 px).
SMALL = DataConfig(resolution=64, reference_size=32, elastic_affine=50 * 32 / 224)


def _coordinates(path: Path, width: int, height: int) -> Path:
    """A picture whose red is x and green is y (both under 256), so a resized crop tells where it came from."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    PIL.Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)).save(path)
    return path


def _solid(path: Path, width: int, height: int, colour: tuple[int, int, int]) -> Path:
    PIL.Image.new("RGB", (width, height), colour).save(path)
    return path


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _dataset(tmp_path: Path, n: int = 6, *, config: DataConfig = SMALL, seed: int = 23) -> PaintByExampleDataset:
    """n rows over a wide, a tall and a square picture."""
    pictures = [("wide.png", 160, 96), ("tall.png", 96, 160), ("square.png", 128, 128)]
    for name, w, h in pictures:
        _coordinates(tmp_path / name, w, h)
    boxes = [[40, 20, 90, 70], [20, 50, 70, 110], [30, 30, 80, 90]]
    records = [{"image": pictures[i % 3][0], "box": boxes[i % 3]} for i in range(n)]
    return PaintByExampleDataset(_jsonl(tmp_path / "m.jsonl", records), config=config, seed=seed)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the sample


def test_a_sample_has_the_documented_shapes_ranges_and_clip_normalisation(tmp_path: Path) -> None:
    colour = (200, 100, 50)
    _solid(tmp_path / "p.png", 120, 90, colour)
    dataset = PaintByExampleDataset(_jsonl(tmp_path / "m.jsonl", [{"image": "p.png", "box": [30, 20, 80, 70]}]))
    sample = dataset[0]
    assert sample.keys() == {"image", "keep_mask", "reference"}
    assert sample["image"].shape == (3, 512, 512) and sample["image"].dtype == torch.float32
    assert sample["keep_mask"].shape == (1, 512, 512) and sample["keep_mask"].dtype == torch.float32
    assert sample["reference"].shape == (3, 224, 224) and sample["reference"].dtype == torch.float32
    # A one-colour picture stays one colour through every augmentation (borders are reflected): the pixels are
    # colour / 127.5 - 1 and the reference is CLIP's normalisation of colour / 255.
    expected_image = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    torch.testing.assert_close(sample["image"], expected_image.expand(3, 512, 512), rtol=0, atol=1e-6)
    clip = (torch.tensor(colour) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(sample["reference"], clip.view(3, 1, 1).expand(3, 224, 224), rtol=0, atol=1e-5)
    assert set(sample["keep_mask"].unique().tolist()) == {0.0, 1.0}


def test_a_row_with_its_own_reference_picture_uses_that_picture(tmp_path: Path) -> None:
    _coordinates(tmp_path / "scene.png", 100, 80)
    _solid(tmp_path / "ref.png", 40, 70, (10, 220, 90))
    manifest = _jsonl(tmp_path / "m.jsonl", [{"image": "scene.png", "box": [20, 20, 60, 60], "reference": "ref.png"}])
    reference = PaintByExampleDataset(manifest, config=SMALL)[0]["reference"]
    clip = (torch.tensor((10, 220, 90)) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(reference, clip.view(3, 1, 1).expand(3, 32, 32), rtol=0, atol=1e-5)


class _Recorder:
    """Stands in for a dataset's Compose: forwards every call and keeps what each applied."""

    def __init__(self, compose) -> None:
        self.compose, self.applied = compose, []
        compose.save_applied_params = True

    def set_random_state(self, *generators) -> None:
        self.compose.set_random_state(*generators)

    def __call__(self, **data):
        result = self.compose(**data)
        self.applied.append(dict(result.pop("applied_transforms")))
        return result


def test_the_reference_augmentations_fire_independently_with_the_recipes_probabilities(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 3, config=DataConfig(resolution=64))
    dataset.augment = recorder = _Recorder(dataset.augment)
    for epoch in range(70):
        for index in range(3):
            dataset[(epoch, index)]
    applied = recorder.applied
    fired = {name: [name in a for a in applied] for name in ("HorizontalFlip", "Rotate", "Blur", "ElasticTransform")}
    # Binomial(210, p) lies within these bounds but with probability under 1e-4.
    assert 75 <= sum(fired["HorizontalFlip"]) <= 135 and 75 <= sum(fired["Rotate"]) <= 135
    assert 35 <= sum(fired["Blur"]) <= 95 and 35 <= sum(fired["ElasticTransform"]) <= 95
    assert fired["HorizontalFlip"] != fired["Rotate"] and fired["Blur"] != fired["ElasticTransform"]
    assert {a["Blur"]["kernel"] for a in applied if "Blur" in a} == {3, 5, 7}
    # 0.4.3's affine warp inside the elastic transform, rebuilt by A.Affine: the linear part is I + D with each entry
    # of D of std 50 sqrt(2/3) / 148 = 0.276 at 224 px, the centre moves with std 50 / sqrt(6) = 20.4 px per axis.
    matrices = np.array([a["Affine"]["matrix"] for a in applied if "Affine" in a])
    assert len(matrices) == sum(fired["ElasticTransform"])
    spread = (matrices[:, :2, :2] - np.eye(2)).std(axis=0)
    assert ((spread > 0.2) & (spread < 0.36)).all(), spread
    centre = (matrices @ np.array([111.5, 111.5, 1.0]))[:, :2] - 111.5
    assert ((centre.std(axis=0) > 14) & (centre.std(axis=0) < 28)).all(), centre.std(axis=0)


@pytest.mark.parametrize("bezier", [0.0, 1.0], ids=["box", "bezier"])
def test_the_geometry_follows_the_recipe_and_the_pixels_follow_the_geometry(tmp_path: Path, bezier: float) -> None:
    config = dataclasses.replace(SMALL, bezier_mask_prob=bezier)
    dataset = _dataset(tmp_path, config=config)
    r = config.resolution
    for epoch in range(8):
        for index, row in enumerate(dataset.rows):
            geometry, sample = dataset.geometry((epoch, index)), dataset[(epoch, index)]
            (x0, y0, x1, y1), (w, h) = row.box, row.size
            ex0, ey0, ex1, ey1 = geometry.extended_box
            # Each side grows by randint(0, 0.4 x free space on that side).
            assert 0 <= x0 - ex0 <= int(0.4 * x0) and 0 <= y0 - ey0 <= int(0.4 * y0)
            assert 0 <= ex1 - x1 <= int(0.4 * (w - x1)) and 0 <= ey1 - y1 <= int(0.4 * (h - y1))
            # The scene crop lies in the picture, holds the extended box, and is square for these pictures.
            cx0, cy0, cx1, cy1 = geometry.crop
            assert 0 <= cx0 <= ex0 and 0 <= cy0 <= ey0 and ex1 <= cx1 <= w and ey1 <= cy1 <= h
            assert cx1 - cx0 == cy1 - cy0
            # Every output pixel's centre, in picture coordinates.
            xs = cx0 + (torch.arange(r) + 0.5) * (cx1 - cx0) / r
            ys = cy0 + (torch.arange(r) + 0.5) * (cy1 - cy0) / r
            y, x = torch.meshgrid(ys, xs, indexing="ij")
            # The picture's red is x and its green is y: the resized crop shows where it came from.
            pixels = (sample["image"] + 1) * 127.5
            inner = (slice(2, -2), slice(2, -2))
            assert (pixels[0][inner] - (x[inner] - 0.5)).abs().max() < 1.5
            assert (pixels[1][inner] - (y[inner] - 0.5)).abs().max() < 1.5
            assert sample["image"].min() >= -1 and sample["image"].max() <= 1
            # The mask: 0/1, 0 over the box's repaint region.
            mask = sample["keep_mask"][0]
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            repaint = mask == 0
            inside_box = (x > x0 + 1) & (x < x1 - 1) & (y > y0 + 1) & (y < y1 - 1)
            if bezier == 0.0:
                assert geometry.polygon is None
                inside_extended = (x > ex0 + 1) & (x < ex1 - 1) & (y > ey0 + 1) & (y < ey1 - 1)
                outside_extended = (x < ex0 - 1) | (x > ex1 + 1) | (y < ey0 - 1) | (y > ey1 + 1)
                assert repaint[inside_extended].all() and not repaint[outside_extended].any()
            else:
                # Within the extended box (give or take the +-5 px jitter); a filled region around the box's centre
                # that covers most of the box (the curves cut its corners).
                assert geometry.polygon is not None and len(geometry.polygon) == 4 * 18
                jitter = config.bezier_jitter + 1
                outside = (x < ex0 - jitter) | (x > ex1 + jitter) | (y < ey0 - jitter) | (y > ey1 + jitter)
                assert not repaint[outside].any()
                centre = ((y - (y0 + y1) / 2).abs() < 3) & ((x - (x0 + x1) / 2).abs() < 3)
                assert repaint[centre].all()
                assert repaint[inside_box].float().mean() > 0.7


def test_reference_quirks_where_one_square_window_or_none_fits_the_whole_picture_is_used(tmp_path: Path) -> None:
    _coordinates(tmp_path / "wide.png", 160, 96)
    _coordinates(tmp_path / "square.png", 100, 100)
    records = [{"image": "wide.png", "box": [5, 20, 150, 70]}, {"image": "square.png", "box": [20, 20, 60, 60]},
               {"image": "wide.png", "box": [0, 20, 50, 70]}]
    dataset = PaintByExampleDataset(_jsonl(tmp_path / "m.jsonl", records), config=SMALL)
    r = SMALL.resolution
    for epoch in range(10):
        assert dataset.geometry((epoch, 0)).crop == (0, 0, 160, 96)  # no square window holds 145+ px of width
        assert dataset.geometry((epoch, 1)).crop == (0, 0, 100, 100)  # never cropped, never shrunk
        # At the left edge the only window starts at 0: one position, which the official code does not take.
        assert dataset.geometry((epoch, 2)).crop == (0, 0, 160, 96)
    # The wide picture is squeezed into the square: x runs over 160 px, y over 96.
    pixels = (dataset[0]["image"] + 1) * 127.5
    x = (torch.arange(r) + 0.5) * 160 / r - 0.5
    y = (torch.arange(r) + 0.5) * 96 / r - 0.5
    assert (pixels[0, 2:-2, 2:-2] - x[2:-2]).abs().max() < 1.5
    assert (pixels[1, 2:-2, 2:-2] - y[2:-2, None]).abs().max() < 1.5


def test_the_mask_shape_is_drawn_with_the_papers_probability(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 3)
    kinds = [dataset.geometry((epoch, 0)).polygon is None for epoch in range(200)]
    assert 70 <= sum(kinds) <= 130  # p = 0.5: a binomial(200, 0.5) lies here but with probability ~1e-4


def test_boxes_outside_the_papers_area_range_are_left_out_with_a_warning(tmp_path: Path) -> None:
    _coordinates(tmp_path / "p.png", 100, 100)
    records = [{"image": "p.png", "box": [10, 10, 60, 60]}, {"image": "p.png", "box": [10, 10, 12, 12]},
               {"image": "p.png", "box": [0, 0, 100, 95]}]
    with pytest.warns(UserWarning, match=r"2 of 3 rows left out"):
        dataset = PaintByExampleDataset(_jsonl(tmp_path / "m.jsonl", records), config=SMALL)
    assert len(dataset) == 1 and dataset.skipped == 2 and dataset.rows[0].box == (10, 10, 60, 60)
    with pytest.raises(ManifestError, match="every one of the 1 rows"):
        PaintByExampleDataset(_jsonl(tmp_path / "one.jsonl", records[1:2]), config=SMALL)


# ---- determinism


def test_a_sample_depends_on_seed_epoch_and_index_only(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path)
    first = dataset[(1, 2)]
    dataset[(0, 0)], dataset[(3, 2)]  # other draws in between change nothing
    assert _equal(dataset[(1, 2)], first)
    dataset.set_epoch(1)
    assert _equal(dataset[2], first)
    assert _equal(_dataset(tmp_path)[(1, 2)], first)  # a second dataset, the same seed
    assert not _equal(_dataset(tmp_path, seed=24)[(1, 2)], first)
    # Different epochs: other crops (row 0: the wide picture; a square one is never cropped) and other pictures.
    crops = {dataset.geometry((epoch, 0)).crop for epoch in range(6)}
    assert len(crops) > 1
    assert not _equal(dataset[(2, 2)], first)


def test_the_worker_count_does_not_change_the_batches(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path)
    runs = []
    for workers in (0, 1, 2):
        loader = make_loader(dataset, batch_size=2, workers=workers, seed=5)
        batches = []
        for epoch in (0, 1):
            loader.batch_sampler.set_epoch(epoch)
            batches += list(loader)
        runs.append(batches)
        del loader  # ends its persistent workers
    assert len(runs[0]) == 6
    for other in runs[1:]:
        assert all(_equal(a, b) for a, b in zip(runs[0], other, strict=True))
    assert not _equal(runs[0][0], runs[0][3])  # epoch 1 is another order or other draws


# ---- the loader's order


def _order(loader) -> list[list[tuple[int, int]]]:
    return list(loader.batch_sampler)


def test_two_ranks_with_batch_one_see_what_one_process_with_batch_two_sees(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 7)
    single = make_loader(dataset, batch_size=2, workers=0, seed=11)
    ranks = [make_loader(dataset, batch_size=1, workers=0, seed=11, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 3):
        for loader in (single, *ranks):
            loader.batch_sampler.set_epoch(epoch)
        together = [a + b for a, b in zip(_order(ranks[0]), _order(ranks[1]), strict=True)]
        assert together == _order(single) and len(together) == 3  # 7 // 2, the last sample dropped
        for a, b, c in zip(single, *ranks, strict=True):
            assert all(torch.equal(a[k], torch.cat([b[k], c[k]])) for k in a)
    # Epochs are different orders of all samples.
    single.batch_sampler.set_epoch(0)
    zero = _order(single)
    single.batch_sampler.set_epoch(1)
    assert [i for _, i in sum(zero, [])] != [i for _, i in sum(_order(single), [])]


def test_skipping_the_first_batches_continues_the_uninterrupted_order(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 9)
    loader = make_loader(dataset, batch_size=2, workers=0, seed=3)
    loader.batch_sampler.set_epoch(2)
    whole = list(loader)
    resumed = make_loader(dataset, batch_size=2, workers=0, seed=3)
    resumed.batch_sampler.set_epoch(2, skip_batches=3)
    assert len(resumed) == 1 and len(whole) == 4
    rest = list(resumed)
    assert len(rest) == 1 and _equal(rest[0], whole[3])
    with pytest.raises(ValueError, match=r"skip_batches must be in \[0, 4\]"):
        resumed.batch_sampler.set_epoch(2, skip_batches=5)


def test_without_drop_last_every_sample_is_seen_and_ranks_get_equal_batches(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 5)
    ranks = [make_loader(dataset, batch_size=2, workers=0, seed=0, rank=r, world_size=2, drop_last=False)
             for r in (0, 1)]
    orders = [_order(loader) for loader in ranks]
    assert [len(b) for b in orders[0]] == [len(b) for b in orders[1]] == [2, 1]
    assert {i for order in orders for batch in order for _, i in batch} == set(range(5))


def test_make_loader_refuses_a_dataset_smaller_than_a_batch_and_a_bad_rank(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 3)
    with pytest.raises(ValueError, match=r"3 samples, fewer than one batch .* 2 x 2 = 4"):
        make_loader(dataset, batch_size=2, workers=0, seed=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\] for world_size 2, got 2"):
        make_loader(dataset, batch_size=1, workers=0, seed=0, rank=2, world_size=2)


# ---- the manifest


def test_jsonl_and_csv_manifests_read_the_same_rows(tmp_path: Path) -> None:
    _coordinates(tmp_path / "a.png", 100, 80)
    _solid(tmp_path / "r.png", 30, 30, (1, 2, 3))
    records = [{"image": "a.png", "box": [10, 5, 50.5, 60]},
               {"image": "a.png", "box": [0, 0, 100, 80], "reference": "r.png"}]
    jsonl = read_manifest(_jsonl(tmp_path / "m.jsonl", records))
    (tmp_path / "m.csv").write_text("image,box,reference\na.png,10 5 50.5 60,\na.png,\"[0, 0, 100, 80]\",r.png\n")
    (tmp_path / "columns.csv").write_text("image,x0,y0,x1,y1,reference\na.png,10,5,50.5,60,\na.png,0,0,100,80,r.png\n")
    expected = [TrainRow(image=tmp_path / "a.png", box=(10, 5, 51, 60), size=(100, 80),
                         where=f"{tmp_path / 'm.jsonl'}:1"),
                TrainRow(image=tmp_path / "a.png", box=(0, 0, 100, 80), size=(100, 80), reference=tmp_path / "r.png",
                         where=f"{tmp_path / 'm.jsonl'}:2")]
    assert jsonl == expected
    for name in ("m.csv", "columns.csv"):
        rows = read_manifest(tmp_path / name)
        assert [dataclasses.replace(r, where="") for r in rows] == [dataclasses.replace(r, where="") for r in expected]
        assert [r.where for r in rows] == [f"{tmp_path / name}:2", f"{tmp_path / name}:3"]


@pytest.mark.parametrize(("line", "message"), [
    ({"box": [1, 1, 5, 5]}, r"m.jsonl:2: missing field 'image'"),
    ({"image": "a.png"}, r"m.jsonl:2: missing field 'box'"),
    ({"image": "a.png", "box": [1, 2, 3]}, r"m.jsonl:2: box must be 4 numbers \[x0, y0, x1, y1\], got \[1, 2, 3\]"),
    ({"image": "a.png", "box": [1, 2, "x", 4]}, r"m.jsonl:2: box must be 4 numbers"),
    ({"image": "a.png", "box": [1, 2, True, 4]}, r"m.jsonl:2: box must be 4 numbers"),
    ({"image": "a.png", "box": "1 2 3 4"}, r"m.jsonl:2: box must be 4 numbers"),
    ({"image": "a.png", "box": [5, 2, 5, 4]}, r"m.jsonl:2: box .* must have x0 < x1 and y0 < y1, got \[5, 2, 5, 4\]"),
    ({"image": "a.png", "box": [1, 9, 5, 4]}, r"m.jsonl:2: box .* must have x0 < x1 and y0 < y1"),
    ({"image": "a.png", "box": [10, 10, 65, 20]}, r"m.jsonl:2: box \[10.0, 10.0, 65.0, 20.0\] lies outside its "
                                                  r"picture .*a.png \(64x48, width x height\)"),
    ({"image": "a.png", "box": [-1, 10, 20, 20]}, r"m.jsonl:2: box .* lies outside its picture"),
    ({"image": "a.png", "box": [1, 10, 20, 49]}, r"m.jsonl:2: box .* lies outside its picture .*\(64x48"),
    ({"image": "nope.png", "box": [1, 1, 5, 5]}, r"m.jsonl:2: image .*nope.png: no such file"),
    ({"image": "broken.png", "box": [1, 1, 5, 5]}, r"m.jsonl:2: image .*broken.png cannot be read as a picture"),
    ({"image": "a.png", "box": [1, 1, 5, 5], "reference": "broken.png"}, r"m.jsonl:2: reference .*broken.png cannot"),
    ({"image": 3, "box": [1, 1, 5, 5]}, r"m.jsonl:2: image must be a path"),
])
def test_a_bad_row_is_refused_naming_file_line_and_field(tmp_path: Path, line: dict, message: str) -> None:
    _coordinates(tmp_path / "a.png", 64, 48)
    (tmp_path / "broken.png").write_text("not a picture")
    manifest = _jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "box": [1, 1, 30, 30]}, line])
    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest)


def test_a_manifest_that_is_missing_empty_malformed_or_of_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"manifest .*none.jsonl: no such file"):
        read_manifest(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match=r"manifest .*empty.jsonl is empty: no rows"):
        read_manifest(tmp_path / "empty.jsonl")
    (tmp_path / "empty.csv").write_text("image,box\n")
    with pytest.raises(ManifestError, match=r"empty.csv is empty"):
        PaintByExampleDataset(tmp_path / "empty.csv")
    (tmp_path / "m.txt").write_text("a.png 1 1 5 5\n")
    with pytest.raises(ManifestError, match=r"unknown format '.txt', expected .jsonl or .csv"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "box": [1, 1, 5, 5]\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:1: not valid JSON"):
        read_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('\n["a.png", [1, 1, 5, 5]]\n')
    with pytest.raises(ManifestError, match=r"list.jsonl:2: expected a JSON object, got list"):
        read_manifest(tmp_path / "list.jsonl")
    (tmp_path / "a.png").write_bytes(b"")  # never opened: the box is refused first
    (tmp_path / "badbox.csv").write_text("image,box\na.png,1 2 x 4\n")
    with pytest.raises(ManifestError, match=r"badbox.csv:2: box must be 4 numbers .*got \[1.0, 2.0, 'x', 4.0\]"):
        read_manifest(tmp_path / "badbox.csv")
    (tmp_path / "nobox.csv").write_text("image,x0,y0\na.png,1,1\n")
    with pytest.raises(ManifestError, match=r"nobox.csv:2: missing field 'box'"):
        read_manifest(tmp_path / "nobox.csv")


def test_the_manifest_check_reads_headers_only_and_a_broken_picture_is_named_when_drawn(tmp_path: Path) -> None:
    # The header says 64x48 but the pixel data is cut short: the manifest reads (headers only), the sample names it.
    data = (_coordinates(tmp_path / "cut.png", 64, 48)).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    manifest = _jsonl(tmp_path / "m.jsonl", [{"image": "cut.png", "box": [10, 10, 40, 40]}])
    dataset = PaintByExampleDataset(manifest, config=SMALL)
    with pytest.raises(ManifestError, match=r"m.jsonl:1: image .*cut.png cannot be read as a picture"):
        dataset[0]
    _coordinates(tmp_path / "cut.png", 64, 40)  # replaced by a picture of another size after the check
    with pytest.raises(ManifestError, match=r"m.jsonl:1: image .*cut.png is 64x40 now, 64x48 when the manifest was"):
        dataset[0]


def test_bad_settings_are_refused_naming_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"DataConfig.flip_prob must be in \[0, 1\], got 1.5"):
        DataConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match=r"DataConfig.resolution must be a positive multiple of 8, got 500"):
        DataConfig(resolution=500)
    affine = r"DataConfig.elastic_affine must be in .* = \[0, 14.1\) px for reference_size 32, got 50.0"
    with pytest.raises(ValueError, match=affine):
        DataConfig(reference_size=32)
    dataset = _dataset(tmp_path, 3)
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0, got -1"):
        dataset.set_epoch(-1)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -3"):
        PaintByExampleDataset(dataset.rows, seed=-3)
    with pytest.raises(IndexError, match="index 3 out of range for a dataset of 3 samples"):
        dataset[3]
