"""Imports flow one way: every module imports alone, ``pbe.model`` loads nothing of the application, the layers hold."""

from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pbe", "weights_convert")

# The module map, lowest layer first. A module may import from lower layers, and from its own entry (pbe.model.unet
# from pbe.model.layers, weights_convert.convert from weights_convert.mapping), never from above or beside it.
LAYERS = [
    ("pbe", "pbe.errors", "pbe.files", "pbe.memory", "pbe.devices"),  # leaves; `pbe` imports its public names lazily
    ("pbe.model",),  # the networks: torch (and einops) only
    ("pbe.schedulers", "pbe.images"),
    ("pbe.regions",),  # large pictures: crops and paste-back, on top of pbe.images
    ("pbe.checkpoint",),  # pbe's file format and the safetensors reader, shared by the converter and the loader
    ("weights_convert",),  # the foreign layouts -> pbe's names
    ("pbe.loading",),
    ("pbe.lora_files",),  # LoRA files (pbe's and diffusers'/peft's) and merging one into a checkpoint
    ("pbe.options",),  # the painting options, defined once: paint, batch, serve and the pipeline use them
    ("pbe.pipeline",),
    ("pbe.batch",),  # many pictures, many processes: on top of the pipeline
    ("pbe.evaluation",),  # quality metrics (FID, CLIP score, QS) of painted pictures: reads pbe batch's manifests
    ("pbe.train",),  # training: recipe, step, loop, data, processes; validation paints through the pipeline
    ("pbe.serve",),  # `pbe serve`: the web page and its HTTP API, one model for many users
    ("pbe.cli",),
    ("pbe.__main__",),  # `python -m pbe`
]


def _env() -> dict[str, str]:
    """This interpreter's environment with the repository first on PYTHONPATH (and whatever was there kept)."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def _modules() -> list[str]:
    """Every module of both packages, found by pkgutil (subpackages included)."""
    names = []
    for package in PACKAGES:
        names.append(package)
        names += [info.name for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}.")]
    return sorted(names)


def _source(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _entry(module: str) -> str:
    """The LAYERS entry a module belongs to (the longest matching prefix)."""
    # `pbe` (the package's lazy __init__) matches only itself: a new module must be placed in LAYERS on purpose.
    matches = [e for layer in LAYERS for e in layer if module == e or (e != "pbe" and module.startswith(f"{e}."))]
    assert matches, f"{module} is in no layer of LAYERS: add it where it belongs"
    return max(matches, key=len)


def _layer(module: str) -> int:
    entry = _entry(module)
    return next(i for i, layer in enumerate(LAYERS) if entry in layer)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(module: str, ours: set[str]) -> set[str]:
    """The modules ``module`` imports at run time (anywhere in the file, ``if TYPE_CHECKING:`` blocks excepted)."""
    is_package = _source(module).name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from . import images` imports the submodule pbe.images; `from . import __version__` only pbe.
            subs = {f"{base}.{alias.name}" for alias in node.names} & ours
            found.update(subs or {base})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(_source(module).read_text(encoding="utf-8")))
    return found


MODULES = _modules()


def test_the_walk_finds_both_packages_whole() -> None:
    # A guard on the walk itself: a module the walk missed would go untested below.
    files = {p.relative_to(ROOT).with_suffix("") for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    expected = {".".join(p.parts[:-1]) if p.name == "__init__" else ".".join(p.parts) for p in files}
    assert set(MODULES) == expected


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """No import works only because another module happened to be imported first (no cycles, no hidden order)."""

    def import_alone(module: str) -> str | None:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=_env(),
                              cwd=ROOT, timeout=300)
        return None if proc.returncode == 0 else f"{module}:\n{proc.stderr.strip()}"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [f for f in pool.map(import_alone, MODULES) if f]
    assert not failures, "\n\n".join(failures)


def test_importing_pbe_model_loads_nothing_beyond_torch_and_einops() -> None:
    code = ("import sys, json\nimport torch\nbefore = set(sys.modules)\nimport pbe.model\n"
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert "pbe.model.unet" in loaded  # the measurement sees what pbe.model loads
    # Beyond what torch loaded itself: the standard library, einops, and pbe's network code only.
    foreign = [m for m in loaded if m.partition(".")[0] not in {*sys.stdlib_module_names, "einops", "pbe"}]
    application = [m for m in loaded if m.startswith("pbe.") and not m.startswith("pbe.model.") and m != "pbe.model"]
    assert not foreign, f"import pbe.model loads third-party modules: {foreign}"
    assert not application, f"import pbe.model loads pbe's application: {application}"


def test_imports_follow_the_layers() -> None:
    ours = set(MODULES)
    wrong = []
    for module in MODULES:
        for imported in sorted(_imports(module, ours)):
            if imported.partition(".")[0] not in PACKAGES:
                continue
            same_entry = _entry(imported) == _entry(module)
            if not same_entry and _layer(imported) >= _layer(module):
                wrong.append(f"{module} imports {imported} (layer {_layer(imported)} >= {_layer(module)})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_converter_and_pbe_meet_in_few_places() -> None:
    ours = set(MODULES)
    # weights_convert uses pbe's networks, error types, file format and file writing only.
    allowed = ("pbe.model", "pbe.errors", "pbe.checkpoint", "pbe.files")
    used = {(m, i) for m in MODULES if m.startswith("weights_convert") for i in _imports(m, ours)
            if i.partition(".")[0] == "pbe"}
    assert {i for _, i in used if not any(i == a or i.startswith(f"{a}.") for a in allowed)} == set()
    # pbe reaches the converter from its loading layer, its LoRA files (diffusers' LoRA names), and `pbe convert` runs
    # the converter's command; the paper's initialisation reads Stable Diffusion and CLIP through it, the metrics
    # CLIP ViT-B/32.
    reaching = {m for m in MODULES if m.startswith("pbe") and any(i.startswith("weights_convert") for i in _imports(m, ours))}
    assert reaching == {"pbe.loading", "pbe.lora_files", "pbe.cli", "pbe.train.init", "pbe.evaluation.features"}


def test_pbe_model_imports_only_torch_and_einops() -> None:
    ours = set(MODULES)
    third_party = {i.partition(".")[0] for m in MODULES if m == "pbe.model" or m.startswith("pbe.model.")
                   for i in _imports(m, ours)} - set(sys.stdlib_module_names) - {"pbe"}
    assert third_party <= {"torch", "einops"}, third_party


@pytest.mark.parametrize("name", ["PaintByExample", "PaintByExampleOutput", "PaintByExampleNetworks", "load",
                                  "CheckpointError", "reuse_freed_memory"])
def test_the_public_names_resolve(name: str) -> None:
    import pbe

    module = {"PaintByExample": "pipeline", "PaintByExampleOutput": "pipeline", "PaintByExampleNetworks": "loading",
              "load": "loading", "CheckpointError": "errors", "reuse_freed_memory": "memory"}[name]
    assert name in pbe.__all__
    assert getattr(pbe, name) is getattr(importlib.import_module(f"pbe.{module}"), name)


def test_the_version_is_the_package_version() -> None:
    import pbe

    assert pbe.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_checkpoint_error_is_one_class_under_its_three_names() -> None:
    import pbe
    import pbe.checkpoint
    import pbe.errors

    assert pbe.CheckpointError is pbe.checkpoint.CheckpointError is pbe.errors.CheckpointError
    assert issubclass(pbe.CheckpointError, ValueError)


def test_an_unknown_attribute_is_an_attribute_error() -> None:
    import pbe

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pbe.nope  # noqa: B018
