"""pbe: Paint by Example (exemplar-guided image inpainting) in pure PyTorch.

    from pbe import PaintByExample
    pipe = PaintByExample.from_pretrained("Fantasy-Studio/Paint-by-Example")
    painted = pipe(example_image, image, mask_image).images[0]   # white in the mask = repaint

``pbe.load(src)`` gives the three networks alone (``pbe.model`` holds their code).

The public names below are imported on first use (PEP 562), so ``import pbe.model`` loads the networks' code and
torch only, never the application (Pillow, safetensors, the hub client, the converter, the pipeline).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "CheckpointError": "pbe.errors",
    "ModelOptions": "pbe.options",
    "OptionError": "pbe.options",
    "PaintOptions": "pbe.options",
    "PaintByExample": "pbe.pipeline",
    "PaintByExampleNetworks": "pbe.loading",
    "PaintByExampleOutput": "pbe.pipeline",
    "load": "pbe.loading",
    "reuse_freed_memory": "pbe.memory",
}

__all__ = ["CheckpointError", "ModelOptions", "OptionError", "PaintByExample", "PaintByExampleNetworks",
           "PaintByExampleOutput", "PaintOptions", "__version__", "load", "reuse_freed_memory"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from .errors import CheckpointError
    from .loading import PaintByExampleNetworks, load
    from .memory import reuse_freed_memory
    from .options import ModelOptions, OptionError, PaintOptions
    from .pipeline import PaintByExample, PaintByExampleOutput


def __getattr__(name: str) -> Any:
    """A public name on first use; also a submodule by attribute (``pbe.loading`` after ``import pbe``)."""
    if name.startswith("__"):  # probes such as __wrapped__ (and never __main__, which would run the command)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists but one of ITS imports is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
