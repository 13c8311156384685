"""What one ``pbe serve`` accepts (``Limits``): a leaf of pbe.serve that needs no FastAPI, so the command's flags can
show its defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one ``pbe serve`` accepts: each a positive integer, checked when built (ValueError naming the field)."""

    max_upload_bytes: int = 64 * 1024 * 1024  # one request's body, the three pictures together
    max_pixels: int = 4096 * 4096  # one picture's width x height, read from its header before decoding
    queue: int = 8  # requests that may wait while one paints; one more is answered 503 with Retry-After

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{spec.name}: expected a positive integer, got {value!r}")
