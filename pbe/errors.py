"""The error types of pbe and how a command shows an error or an interrupt: a leaf module (imports only the stdlib).

Every layer raises these, so they live below all of them: ``weights_convert`` and ``pbe`` share them without
importing each other's application code.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the file and the problem."""


# What a command reports as one ``error: ...`` line instead of a traceback: bad values and files, checkpoints,
# devices, torch's runtime errors (out of memory, an op missing for a dtype).
COMMAND_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, RuntimeError, MemoryError)


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line: torch's messages (out of memory, an op missing for a dtype) may span several."""
    return f"error: {' '.join(str(err).split()) or type(err).__name__}"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does, so the same cleanup runs (temporary files
    removed) and the command ends the same way. Only the main thread can set signal handlers; elsewhere this does
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
