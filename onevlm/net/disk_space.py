"""A full disk loses nothing: the guard that pauses intake and result writing when the spool's disk runs low.

Below ``disk.min_free_bytes`` or ``disk.min_free_percent`` (the bounds ``/readyz`` uses) the service
writes nothing new: the listener answers C-STORE "Refused: out of resources" (0xA700) instead of
acknowledging what it may not be able to keep (associations and C-ECHO are still answered), the
Orthanc intake stops copying (Orthanc keeps the instances; the changes cursor does not move), and
complete groups wait, pending, instead of having their results written. A write that fails anyway
(the disk filled between the check and the write: ENOSPC) pauses the same way for a short hold.
Everything resumes by itself once the space is back: the free space is measured again at most
every ``max_age_seconds``.

Each pause and resume is logged once (with the reason and how many instances were refused
meanwhile), never once per refused C-STORE.

Research use only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from onevlm.net.config import DiskConfig
from onevlm.net.health import disk_problem, disk_space

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeState:
    """Whether the service accepts new data now, and if not, why (for ``/status`` and the page)."""

    accepting: bool
    reason: str | None
    since: float
    refused: int

    def as_dict(self) -> dict:
        return {"accepting": self.accepting, "reason": self.reason, "since": self.since,
                "refused_since": self.refused}


class DiskGuard:
    """Decides, cheaply and thread-safely, whether anything new may be written to the spool's disk.

    Parameters
    ----------
    folder:
        A folder on the spool's file system (the spool itself).
    limits:
        The free-space bounds (``disk`` in the configuration; 0 and 0: no bound, only ENOSPC pauses).
    max_age_seconds:
        How long a measured free space is reused (``statvfs`` is cheap, but C-STOREs come by the hundred).
    hold_seconds:
        How long a write that failed for lack of space (ENOSPC) pauses writing, whatever ``statvfs``
        says (the failed write's own bytes were given back, so the disk may look fine again).
    """

    def __init__(self, folder: str | Path, limits: DiskConfig, max_age_seconds: float = 1.0,
                 hold_seconds: float = 5.0) -> None:
        if not isinstance(limits, DiskConfig):
            raise TypeError("limits must be a DiskConfig")
        if max_age_seconds < 0 or hold_seconds < 0:
            raise ValueError("max_age_seconds and hold_seconds must be >= 0")
        self.folder = Path(folder)
        self.limits = limits
        self.max_age_seconds = float(max_age_seconds)
        self.hold_seconds = float(hold_seconds)
        self._lock = threading.Lock()
        self._measured_at = float("-inf")
        self._measured: str | None = None
        self._full_until = float("-inf")
        self._full_reason: str | None = None
        self._reason: str | None = None  # the state last reported (None: accepting)
        self._since = time.time()
        self._refused = 0
        self._refusal_logged = False

    def _measure(self) -> str | None:
        try:
            return disk_problem(disk_space(self.folder), self.limits)
        except OSError as exc:  # the spool vanished or is unreadable: writing there would fail too
            return f"the spool's disk cannot be measured: {type(exc).__name__}: {exc}"

    def problem(self) -> str | None:
        """Why nothing new may be written now, or ``None`` (logs the change when the answer changes)."""
        with self._lock:
            now = time.monotonic()
            if now - self._measured_at >= self.max_age_seconds:
                self._measured = self._measure()
                self._measured_at = now
            held = now < self._full_until
            reason = self._full_reason if held else self._measured
            self._report(reason, "disk_full" if held else "low_disk_space")
            return reason

    def accepting(self) -> bool:
        """``True`` when nothing holds writing back (:meth:`problem` is ``None``)."""
        return self.problem() is None

    def note_full(self, exc: BaseException | None = None, what: str = "a write") -> None:
        """A write failed for lack of space: pause for ``hold_seconds`` and measure again after that."""
        with self._lock:
            detail = f": {exc.strerror or exc}" if isinstance(exc, OSError) else ""
            self._full_reason = f"{what} failed, the spool's disk is full{detail}"
            self._full_until = time.monotonic() + self.hold_seconds
            self._measured_at = float("-inf")  # measure afresh once the hold is over
            self._report(self._full_reason, "disk_full")

    def note_refusal(self) -> bool:
        """Count one refused instance; ``True`` for the first since the pause began (log that one)."""
        with self._lock:
            self._refused += 1
            first, self._refusal_logged = not self._refusal_logged, True
            return first

    def state(self) -> IntakeState:
        """The current state (measures if the last measurement is older than ``max_age_seconds``)."""
        self.problem()
        with self._lock:
            return IntakeState(self._reason is None, self._reason, self._since, self._refused)

    def _report(self, reason: str | None, cause: str) -> None:
        # Called with the lock held. One log line per change between accepting and paused, never per C-STORE
        # nor per new figure of free bytes (the reason's wording changes as the disk does).
        if (reason is None) != (self._reason is None):
            if reason is None:
                logger.warning("event=intake_resumed refused_while_paused=%d paused_seconds=%.1f", self._refused,
                               time.time() - self._since)
            else:
                logger.warning("event=intake_paused cause=%s reason=%s", cause, reason)
            self._since = time.time()
            self._refused = 0
            self._refusal_logged = False
        self._reason = reason
