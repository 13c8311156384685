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


class UsageError(ValueError):
    """A command used wrongly: a bad argument value or combination, a missing or unreadable input named by an
    argument, a device that does not exist here, a bad manifest. Refused before anything slow starts: exit status 2
    (``exit_status``)."""


# What a command reports as one ``error: ...`` line instead of a traceback: bad values and files, checkpoints,
# devices, torch's runtime errors (out of memory, an op missing for a dtype).
COMMAND_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, RuntimeError, MemoryError)


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line: torch's messages (out of memory, an op missing for a dtype) may span several."""
    return f"error: {' '.join(str(err).split()) or type(err).__name__}"


def exit_status(err: BaseException) -> int:
    """The exit status of a command that ended with ``err``: 2 for a usage error (as argparse's own), 1 for a run
    that started and failed (see the README, "Exit statuses")."""
    return 2 if isinstance(err, UsageError) else 1


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
