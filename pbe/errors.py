"""The error types of pbe and how a command shows an error: a leaf module (imports nothing).

Every layer raises these, so they live below all of them: ``weights_convert`` and ``pbe`` share them without
importing each other's application code.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the file and the problem."""


# What a command reports as one ``error: ...`` line instead of a traceback: bad values and files, checkpoints,
# devices, torch's runtime errors (out of memory, an op missing for a dtype).
COMMAND_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, RuntimeError, MemoryError)


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line: torch's messages (out of memory, an op missing for a dtype) may span several."""
    return f"error: {' '.join(str(err).split()) or type(err).__name__}"
