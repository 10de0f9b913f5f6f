"""One service per spool: an exclusive lock held for the service's lifetime.

Two services on one spool would clear each other's partial writes on start, process the same groups
twice and clean up under each other's feet; a clean-up run by hand (``onevlm retention run``) must
not race the service's own. The lock is ``fcntl.flock`` on ``<spool>/service.lock``: the kernel
releases it when the process ends however it ends (kill -9 included), so a crash never leaves the
spool locked. The file holds the owner's PID, for the message only. Research use only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "service.lock"


class SpoolBusy(RuntimeError):
    """Another process (a running service) owns the spool."""


class SpoolOwner:
    """The spool's exclusive lock; :meth:`acquire` takes it or raises :class:`SpoolBusy`."""

    def __init__(self, spool_dir: str | Path) -> None:
        self.path = Path(spool_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, what: str = "the service") -> None:
        """Take the lock for ``what`` (named in the other process' error).

        Raises
        ------
        SpoolBusy
            If another process holds it.
        """
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SpoolBusy(f"{self.path.parent}: the spool is in use by another onevlm process (PID {owner}: a running "
                            f"service); {what} needs it to itself") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
