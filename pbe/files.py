"""Writing files so that a failure never leaves half a file under the final name, and a kill leaves a known name.

``write_atomically(path, write)`` has ``write`` fill a file in a private folder ``.NAME.pbe-partial-PID-XXXX`` beside
``path``, then renames the file to ``path``. Whatever the writer puts beside its own file (safetensors' Rust writer
makes a ``.tmpXXXXXX`` next to the file it writes, then renames it) stays inside that folder. Any failure, Ctrl-C or
a SIGTERM turned into one (``pbe.errors.sigterm_as_interrupt``) removes the folder. A SIGKILL cannot be caught: it
leaves the folder, and the next write to the same ``path`` removes it (its process id no longer runs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

PARTIAL_MARK = "pbe-partial"
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows.

    ``os.umask`` can only read by setting: between ``umask(0)`` and the reset another thread's new file would get full
    permissions. Linux shows the value in ``/proc/self/status``; elsewhere the set-and-reset runs under a lock (which
    protects pbe's own writes only).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_stale_partials(path: str | Path) -> list[Path]:
    """Remove the leftovers of killed writes to ``path`` (folders ``.NAME.pbe-partial-PID-*`` whose PID is gone).

    Returns what was removed. A write still running (its PID alive) is left alone.
    """
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(f".{path.name}.{PARTIAL_MARK}-*"):
        pid = leftover.name.removeprefix(f".{path.name}.{PARTIAL_MARK}-").partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def check_can_write(path: str | Path) -> None:
    """Raise ``OSError("cannot write to FOLDER: why")`` unless ``write_atomically(path, ...)`` can create its files:
    the nearest existing folder above ``path`` (the missing ones are created) must be a folder that takes a new file.

    Asked before anything slow starts, so a read-only output folder is named as the user gave it, not as a failure
    inside the private ``.NAME.pbe-partial-*`` folder after minutes of work.
    """
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write to {folder}: a file, not a folder")
    try:  # os.access is not enough: root passes it everywhere, read-only mounts and /proc take no file
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OSError(f"cannot write to {folder}: {err.strerror or err}") from None


def write_atomically(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a file in a private folder beside ``path``, then rename that file to ``path``.

    On any failure (an interrupt included) the private folder is removed and ``path`` is left as it was. Leftovers of
    earlier killed writes to ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.{PARTIAL_MARK}-{os.getpid()}-", dir=path.parent))
    try:
        tmp = folder / path.name
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # the permissions a plain open() would give
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
