"""pbe.options: the painting options, defined and checked once, for ``pbe paint``/``pbe batch``, the pipeline and
``pbe serve``: each check, the flags round trip, one problem text under three names, the schema, and a guard that no
range comes back elsewhere."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import pbe
from pbe import ModelOptions, OptionError, PaintByExample, PaintOptions
from pbe.cli import main
from pbe.regions import STRATEGIES
from pbe.schedulers import SCHEDULERS, DDIMScheduler

from conftest import HUB
from conftest import centre_mask as _mask
from conftest import random_picture as _picture

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe() -> PaintByExample:
    return PaintByExample.from_pretrained(HUB)



# ---- each field's check ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "changes", "normalised"),
    [
        (PaintOptions, {"steps": 7.0}, {"steps": 7}),
        (PaintOptions, {"guidance": 7}, {"guidance": 7.0}),
        (PaintOptions, {"eta": 0}, {"eta": 0.0}),
        (PaintOptions, {"scheduler": "DDIM"}, {"scheduler": "ddim"}),
        (PaintOptions, {"hd_strategy": "Resize"}, {"hd_strategy": "resize"}),
        (PaintOptions, {"resolution": 640.0, "hd_trigger": 1, "hd_margin": 0}, {"resolution": 640, "hd_margin": 0}),
        (PaintOptions, {"keep_unmasked": True, "mask_blur": 3}, {"mask_blur": 3.0}),
        (ModelOptions, {"checkpoint": Path("a/b.ckpt")}, {"checkpoint": "a/b.ckpt"}),
        (ModelOptions, {"config": "unet.json", "dtype": "FP16"}, {"config": Path("unet.json"), "dtype": "fp16"}),
        (ModelOptions, {"lora": "l.safetensors", "lora_scale": 0}, {"lora": Path("l.safetensors"), "lora_scale": 0.0}),
    ],
)
def test_good_values_are_normalised(cls, changes, normalised) -> None:
    options = cls(**changes)
    for name, value in normalised.items():
        assert getattr(options, name) == value and type(getattr(options, name)) is type(value)


# The refusals of pbe.regions' plan/working_size/crop_boxes (strategy, resolution, trigger, margin) live here now.
@pytest.mark.parametrize(
    ("cls", "name", "value", "expected"),
    [
        (PaintOptions, "steps", 0, "a positive integer"),
        (PaintOptions, "steps", 2.5, "a positive integer"),
        (PaintOptions, "steps", True, "a positive integer"),
        (PaintOptions, "steps", "5", "a positive integer"),
        (PaintOptions, "guidance", math.nan, "a finite number"),
        (PaintOptions, "guidance", -math.inf, "a finite number"),
        (PaintOptions, "guidance", "5", "a finite number"),
        (PaintOptions, "eta", -0.1, "a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like)"),
        (PaintOptions, "eta", math.inf, "a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like)"),
        (PaintOptions, "keep_unmasked", 1, "true or false"),
        (PaintOptions, "mask_blur", -1.0, "a radius >= 0"),
        (PaintOptions, "scheduler", "heun", f"one of {', '.join(SCHEDULERS)}"),
        (PaintOptions, "scheduler", 3, f"one of {', '.join(SCHEDULERS)}"),
        (PaintOptions, "hd_strategy", "tile", "one of crop, resize, original"),
        (PaintOptions, "resolution", 500, "a positive multiple of 8 (pixels)"),
        (PaintOptions, "resolution", 0, "a positive multiple of 8 (pixels)"),
        (PaintOptions, "hd_trigger", 0, "a positive number of pixels"),
        (PaintOptions, "hd_margin", -1, "a number of pixels >= 0"),
        (PaintOptions, "hd_margin", 1.5, "a number of pixels >= 0"),
        (ModelOptions, "checkpoint", "", "a non-empty text"),
        (ModelOptions, "config", 3, "a path"),
        (ModelOptions, "dtype", "fp8", "one of auto, bf16, fp16, fp32"),
        (ModelOptions, "device", "", "a non-empty text"),
        (ModelOptions, "lora_scale", math.nan, "a finite number"),
    ],
)
def test_bad_values_are_refused_naming_the_field_the_expected_and_the_actual_value(cls, name, value, expected) -> None:
    # Set what a field applies with, so that the refusal is the value's own.
    base = {"keep_unmasked": True} if name == "mask_blur" else {"lora": "l.safetensors"} if name == "lora_scale" else {}
    with pytest.raises(OptionError) as caught:
        cls(**base, **{name: value})
    assert str(caught.value) == f"{name}: expected {expected}, got {value!r}"
    assert (caught.value.name, caught.value.problem) == (name, f"expected {expected}, got {value!r}")


@pytest.mark.parametrize(("cls", "name", "value", "needs"),
                         [(PaintOptions, "mask_blur", 2.0, "keep_unmasked"), (ModelOptions, "lora_scale", 0.5, "lora")])
def test_an_option_that_applies_only_with_another_is_refused_without_it(cls, name, value, needs) -> None:
    with pytest.raises(OptionError, match=f"^{name} only applies with {needs}$"):
        cls(**{name: value})
    assert getattr(cls(**{name: value, needs: True if needs == "keep_unmasked" else "l.safetensors"}), name) == value


def test_options_are_frozen_and_replace_checks() -> None:
    options = PaintOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelOptions().device = "cpu"
    assert options.replace(steps=3).steps == 3 and options.steps == 50
    with pytest.raises(OptionError, match="^steps: "):
        options.replace(steps=-3)


# ---- the command that repeats a run --------------------------------------------------------------------------------


ROUND_TRIPS = [
    (PaintOptions(), ModelOptions()),
    (PaintOptions(scheduler="ddim", steps=7, guidance=7.123456789, eta=0.3, keep_unmasked=True, mask_blur=1.5,
                  hd_strategy="resize", resolution=640, hd_trigger=1000, hd_margin=0),
     ModelOptions(checkpoint="some/repo", config=Path("my configs/unet.json"), dtype="bf16", device="cuda:1",
                  lora=Path("a lora.safetensors"), lora_scale=0.123456789)),
    (PaintOptions(guidance=-2.5, eta=1e-07, keep_unmasked=True, hd_strategy="original", steps=1),
     ModelOptions(lora=Path("l.safetensors"), lora_scale=-0.5, dtype="fp16", device="cpu")),
    (PaintOptions(keep_unmasked=True, guidance=0.1 + 0.2), ModelOptions(checkpoint="weights/model.ckpt")),
]


@pytest.mark.parametrize(("options", "model"), ROUND_TRIPS)
def test_flags_read_back_to_the_same_options(options, model) -> None:
    """Through a shell too: the CLI prints the words shlex-joined, the user's shell splits them. (A bad choice, such
    as --hd-strategy tile, is refused by argparse itself, from the same choices.)"""
    parser = argparse.ArgumentParser()
    PaintOptions.add_arguments(parser)
    ModelOptions.add_arguments(parser)
    words = shlex.split(shlex.join(options.flags() + model.flags()))
    args = parser.parse_args(words)
    assert PaintOptions.from_arguments(args) == options
    assert ModelOptions.from_arguments(args) == model


def test_flags_name_an_option_that_applies_with_another_only_with_it() -> None:
    assert "--mask-blur" not in PaintOptions().flags() and "--lora-scale" not in ModelOptions().flags()
    assert "--mask-blur" in PaintOptions(keep_unmasked=True).flags()


# ---- one check, three names ----------------------------------------------------------------------------------------


def _cli_error(tmp_path: Path, capsys, *flags: str) -> str:
    """The error line of ``pbe paint`` with these flags (refused before any input is read or anything loads)."""
    status = main(["paint", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--example",
                   str(tmp_path / "e.png"), "-o", str(tmp_path / "out.png"), "--checkpoint", str(HUB), *flags])
    err = capsys.readouterr().err
    assert status == 2 and err.count("error: ") == 1 and "Traceback" not in err, err
    return err.strip().removeprefix("error: ")


@pytest.mark.parametrize(
    ("field", "value", "more"),
    [
        ("steps", 0, {}),
        ("guidance", math.nan, {}),
        ("resolution", 500, {}),
        ("hd_margin", -1, {}),
        ("mask_blur", -2.0, {"keep_unmasked": True}),
        ("mask_blur", 2.0, {}),  # without keep_unmasked
        ("steps", 1000, {}),  # the sampler's own limit (check_run): PNDM with the test hub's config runs at most 999
        ("eta", 1.1, {"scheduler": "ddim", "steps": 5}),  # DDIM's largest eta for 5 steps (check_run)
    ],
)
def test_the_same_bad_value_is_the_same_problem_through_the_object_the_cli_and_the_pipeline(
        tmp_path, capsys, pipe, field, value, more) -> None:
    changes = {**more, field: value}
    try:
        options = PaintOptions(**changes)
        options.check_run(options.make_scheduler(pipe.scheduler_config))
    except OptionError as err:
        problem = err
    else:
        pytest.fail(f"{changes} was accepted")
    flags = [word for name, v in changes.items()
             for word in ([PaintOptions.flag(name)] if v is True else [PaintOptions.flag(name), str(v)])]
    keywords = {PaintOptions.keyword(name): v for name, v in changes.items()}
    with pytest.raises(OptionError) as through_pipeline:
        pipe(None, None, None, progress=False, **keywords)

    def expected(label) -> str:
        return str(problem.relabeled(label))

    assert str(problem).startswith(field)
    assert _cli_error(tmp_path, capsys, *flags) == expected(PaintOptions.flag)
    assert str(through_pipeline.value) == expected(PaintOptions.keyword)
    assert str(problem) == expected(str)  # the object names the field itself
    assert folder_is_empty(tmp_path)


def folder_is_empty(folder: Path) -> bool:
    return not any(folder.iterdir())


def test_model_options_are_named_by_their_flags_on_the_command_line(tmp_path, capsys) -> None:
    assert _cli_error(tmp_path, capsys, "--lora-scale", "2") == "--lora-scale only applies with --lora"
    assert _cli_error(tmp_path, capsys, "--device", "gpu") == ("--device: expected auto, cpu, cuda, cuda:N or mps, "
                                                               "got 'gpu'")


# ---- the pipeline takes the options object -------------------------------------------------------------------------


def test_the_pipeline_signature_shows_the_options_defaults() -> None:
    """diffusers users see num_inference_steps=50, ...: the same values as PaintOptions' (scheduler=None: the
    pipeline's own sampler)."""
    parameters = inspect.signature(PaintByExample.__call__).parameters
    defaults = PaintOptions().pipeline_keywords()
    assert {key: parameters[key].default for key in defaults} == {**defaults, "scheduler": None}


def test_options_paint_as_the_keywords_do(pipe) -> None:
    options = PaintOptions(scheduler="ddim", steps=2, guidance=3.0, eta=0.5, keep_unmasked=True, mask_blur=1.0)
    image, mask, example = _picture(40, 48, 1), _mask(40, 48), _picture(30, 30, 2)

    def paint(**kwargs) -> np.ndarray:
        return pipe(example, image, mask, generator=torch.Generator().manual_seed(3), output_type="np",
                    progress=False, **kwargs).images

    by_keywords = paint(**options.pipeline_keywords())
    np.testing.assert_array_equal(paint(options=options), by_keywords)
    # A keyword left at its default beside options is no conflict.
    np.testing.assert_array_equal(paint(options=options, num_inference_steps=50), by_keywords)


@pytest.mark.parametrize(("keyword", "value"), [("num_inference_steps", 3), ("guidance_scale", 7.5),
                                                ("scheduler", "ddim"), ("scheduler", DDIMScheduler()),
                                                ("keep_unmasked", True)])
def test_options_and_a_painting_keyword_is_a_type_error_naming_both(pipe, keyword, value) -> None:
    with pytest.raises(TypeError, match=f"^options and {keyword}="):
        pipe(None, None, None, options=PaintOptions(), progress=False, **{keyword: value})


def test_a_scheduler_object_is_what_the_steps_and_eta_are_checked_against(pipe) -> None:
    """Checked against the scheduler given, though the options' default sampler is PNDM (which ignores eta): a
    default-config DDIMScheduler takes eta up to 1.0000 with 5 steps (the test hub's DDIM, steps_offset 1, 1.0026)."""
    with pytest.raises(OptionError, match=r"^eta: expected at most 1.0000 for DDIMScheduler with 5 steps"):
        pipe(None, None, None, scheduler=DDIMScheduler(), eta=1.001, num_inference_steps=5, progress=False)
    with pytest.raises(OptionError, match=r"^eta: expected at most 1.0026 for DDIMScheduler with 5 steps"):
        pipe(None, None, None, scheduler="ddim", eta=1.1, num_inference_steps=5, progress=False)
    with pytest.raises(TypeError, match="^options: expected a pbe.PaintOptions, got dict$"):
        pipe(None, None, None, options={"steps": 2}, progress=False)


def test_paint_manifest_refuses_options_the_sampler_cannot_run_before_any_row(tmp_path, pipe) -> None:
    def never_called(*args, **kwargs):
        raise AssertionError("a row was painted")

    rows = pbe.batch.parse_rows([{"image": "a.png", "mask": "m.png", "example": "e.png"}], base_dir=tmp_path)
    with pytest.raises(OptionError, match="^steps: expected an integer from 1 to 999 for PNDMScheduler"):
        pbe.batch.paint_manifest(never_called, rows, tmp_path / "out", options=PaintOptions(steps=1000),
                                 progress=False)
    assert not (tmp_path / "out").exists()


def test_eta_on_the_command_line_reaches_the_repeat_command(tmp_path, capsys) -> None:
    image, mask, example = tmp_path / "in.png", tmp_path / "m.png", tmp_path / "e.png"
    _picture(40, 48, 1).save(image)
    _mask(40, 48).save(mask)
    _picture(30, 30, 2).save(example)
    assert main(["paint", "--image", str(image), "--mask", str(mask), "--example", str(example), "-o",
                 str(tmp_path / "out.png"), "--checkpoint", str(HUB), "--steps", "2", "--scheduler", "ddim",
                 "--eta", "0.25", "--device", "cpu", "--dtype", "fp32", "--seed", "1"]) == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("to repeat this run: "))
    words = shlex.split(line.removeprefix("to repeat this run: "))
    assert words[words.index("--eta") + 1] == "0.25" and words[words.index("--scheduler") + 1] == "ddim"


# ---- the schema ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PaintOptions, ModelOptions])
def test_describe_lists_every_field_as_the_dataclass_defines_it(cls) -> None:
    described = cls.describe()
    fields = dataclasses.fields(cls)
    assert [entry["name"] for entry in described] == [spec.name for spec in fields]
    for entry, spec in zip(described, fields):
        default = str(spec.default) if isinstance(spec.default, Path) else spec.default
        assert entry["default"] == default and entry["flag"] == cls.flag(spec.name)
        assert entry["help"] == spec.metadata["help"] and entry["only_with"] == spec.metadata["only_with"]
        if entry["choices"]:  # every choice is accepted, and nothing else of that kind
            assert [getattr(cls(**{spec.name: choice}), spec.name) for choice in entry["choices"]] == entry["choices"]
        if entry["minimum"] is not None:  # the minimum is accepted, just below it is refused
            below = entry["minimum"] - (1 if entry["type"] == "integer" else 0.5)
            base = {"keep_unmasked": True} if spec.metadata["only_with"] == "keep_unmasked" else {}
            smallest = 8 if spec.name == "resolution" else entry["minimum"]  # resolution: multiples of 8
            assert getattr(cls(**base, **{spec.name: smallest}), spec.name) == smallest
            with pytest.raises(OptionError, match=f"^{spec.name}: "):
                cls(**base, **{spec.name: below})
    by_name = {entry["name"]: entry for entry in described}
    if cls is PaintOptions:
        assert by_name["scheduler"]["choices"] == list(SCHEDULERS)
        assert by_name["hd_strategy"]["choices"] == list(STRATEGIES)
        assert {name: by_name[name]["type"] for name in ("steps", "guidance", "keep_unmasked", "scheduler")} == {
            "steps": "integer", "guidance": "number", "keep_unmasked": "boolean", "scheduler": "string"}
        assert {name: by_name[name]["minimum"] for name in ("steps", "resolution", "hd_trigger", "hd_margin", "eta",
                                                            "mask_blur")} == {
            "steps": 1, "resolution": 8, "hd_trigger": 1, "hd_margin": 0, "eta": 0, "mask_blur": 0}


# ---- a guard: no painting option is defined or checked anywhere else -----------------------------------------------

USERS = [ROOT / "pbe" / name for name in ("cli.py", "pipeline.py", "batch.py", "regions.py")]
USERS += sorted((ROOT / "pbe" / "serve").rglob("*.py"))
# What the range checks say: none of it may be raised outside pbe.options.
RANGE_TEXTS = ("multiple of 8", "number of pixels", "radius >= 0", "DDPM-like", "only applies with",
               "positive integer (pixels)", "int >= 0")
# Messages that name an option for another reason than its range (what an argument's TYPE must be, a combination).
NOT_RANGES = ("scheduler: expected a name (", "keep_unmasked: pasting pixels back needs decoded images")


def _option_names() -> set[str]:
    """PaintOptions' fields under all their names; ModelOptions' flags only: ``dtype`` and ``device`` are also torch's
    words (``to(dtype=...)`` checks a torch.dtype), and ``pbe merge-lora`` has a --dtype and a --config of its own."""
    names = {"strategy", "trigger", "margin"}  # pbe.regions' names of hd_strategy, hd_trigger, hd_margin
    for spec in dataclasses.fields(PaintOptions):
        names |= {spec.name, PaintOptions.flag(spec.name), PaintOptions.keyword(spec.name)}
    return names | {"--checkpoint", "--device", "--lora", "--lora-scale"}


def _raised_texts(tree: ast.AST) -> list[str]:
    return [node.value for raised in ast.walk(tree) if isinstance(raised, ast.Raise)
            for node in ast.walk(raised) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _problems(source: str) -> list[str]:
    """Hand-written painting flags and range checks of painting options in ``source``."""
    tree, names, found = ast.parse(source), _option_names(), []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and any(isinstance(a, ast.Constant) and a.value in names for a in node.args)):
            found.append(f"add_argument({ast.unparse(node.args[0])}, ...)")
    for text in _raised_texts(tree):
        if any(text.startswith(allowed) for allowed in NOT_RANGES):
            continue
        said = [name for name in names if text.startswith((f"{name}:", f"`{name}`", f"{name} only"))]
        found += [f"raise ...{text!r}" for _ in said[:1]]
        found += [f"raise ...{text!r}" for range_text in RANGE_TEXTS if range_text in text][:1]
    return found


@pytest.mark.parametrize("path", USERS, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_painting_option_is_defined_or_range_checked_outside_pbe_options(path) -> None:
    assert _problems(path.read_text()) == []


def test_the_guard_catches_what_it_looks_for() -> None:
    """The guard above would fail on the code this change removed."""
    assert _problems('parser.add_argument("--steps", type=int, default=50)')
    assert _problems('p.add_argument("--hd-margin")')
    assert _problems('raise UsageError(f"--resolution: expected a positive multiple of 8, got {args.resolution}")')
    assert _problems('raise ValueError(f"`margin` must be an int >= 0, got {margin!r}")')
    assert _problems('raise ValueError(f"mask_blur: applies only with keep_unmasked=True")')
    assert _problems('raise ValueError(f"hd_trigger: expected a positive integer (pixels), got {trigger!r}")')
    assert _problems('raise UsageError("--mask-blur only applies with --keep-unmasked")')
    assert not _problems('parser.add_argument("--num-images", type=int)')
    assert not _problems('raise ValueError(f"num_images_per_prompt: expected a positive integer, got {n!r}")')


# ---- training's validation paintings -------------------------------------------------------------------------------


def test_training_refuses_validation_options_at_config_time_not_at_the_first_grid() -> None:
    """The validation pipeline runs the official sampler: a step count it cannot run is refused when the config is
    built, hours before the first validation grid would have failed."""
    from pbe.train.config import TrainConfig

    assert TrainConfig(validation_steps=7, validation_guidance=3).validation_options == PaintOptions(steps=7,
                                                                                                     guidance=3.0)
    with pytest.raises(ValueError, match=r"^validation_steps: expected an integer from 1 to 999 for PNDMScheduler\("):
        TrainConfig(validation_steps=1000)
    with pytest.raises(ValueError, match="^validation_steps: expected a positive integer, got 0$"):
        TrainConfig(validation_steps=0)
    with pytest.raises(ValueError, match="^validation_guidance: expected a finite number, got nan$"):
        TrainConfig(validation_guidance=math.nan)
