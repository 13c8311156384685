"""``pbe serve``: a web page and an HTTP API that paint with one model for many users (FastAPI + uvicorn, the
``serve`` extra).

``create_app(pipe, model=..., limits=Limits(...), token=...)`` builds the application (``pbe.serve.app``);
``pbe.serve.command`` is the ``pbe serve`` command. The names load on first use, so that ``pbe`` and its command
line work without the ``serve`` extra installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .limits import Limits

__all__ = ["Limits", "create_app"]


def __getattr__(name: str) -> Any:
    """``create_app`` and ``Limits`` on first use (they import FastAPI)."""
    if name in __all__:
        return getattr(importlib.import_module("pbe.serve.limits" if name == "Limits" else "pbe.serve.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
