"""Liveness and readiness of the running service, for ``/healthz`` and ``/readyz``.

- **Alive** (``/healthz``): every service thread (listener, assembler, workers, one exporter per
  destination, intake) is running and the journal takes a write. A failure here means the process
  should be restarted (a supervisor — systemd, Kubernetes — does that; the service itself never
  relies on it).
- **Ready** (``/readyz``): started, and the spool's disk keeps the configured free space
  (``disk.min_free_bytes`` and ``disk.min_free_percent``) and no write has just failed for lack of
  space. A failure here means: send nothing new now, but do not restart. The same bounds make the
  service refuse new data meanwhile (:mod:`onevlm.net.disk_space`).

Both answer in words (which thread, how much space), and reveal nothing about patients.

Research use only.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from onevlm.net.config import DiskConfig

if TYPE_CHECKING:  # disk_space imports this module
    from onevlm.net.disk_space import DiskGuard


@dataclass(frozen=True)
class Verdict:
    """A probe's answer: ``ok`` and the reasons it is not."""

    ok: bool
    problems: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"ok": self.ok, "problems": list(self.problems)}


@dataclass(frozen=True)
class DiskSpace:
    """The spool's file system: total and free bytes."""

    total: int
    free: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free / self.total if self.total else 0.0


def disk_space(folder: Path) -> DiskSpace:
    """Total and free bytes of the file system holding ``folder`` (free: what an unprivileged writer gets)."""
    usage = shutil.disk_usage(folder)
    return DiskSpace(usage.total, usage.free)


def disk_problem(space: DiskSpace, limits: DiskConfig) -> str | None:
    """Why the disk is nearly full, or ``None``."""
    if space.free < limits.min_free_bytes:
        return f"the spool's disk has {space.free:,} bytes free, below disk.min_free_bytes {limits.min_free_bytes:,}"
    if space.free_percent < limits.min_free_percent:
        return (f"the spool's disk has {space.free_percent:.1f} % free, below disk.min_free_percent "
                f"{limits.min_free_percent:g} %")
    return None


class ServiceHealth:
    """Answers the two probes for one service.

    Parameters
    ----------
    threads:
        Returns the service's threads (checked at each probe: one that has ended is a failure).
    journal_writable:
        Writes to the journal, raising if it cannot.
    spool_dir:
        The spool (its disk is checked).
    limits:
        The free-space bounds.
    started:
        Set once the service listens.
    disk_guard:
        The service's :class:`~onevlm.net.disk_space.DiskGuard`, if any: readiness then says what it
        says (the same bounds, plus a write that just failed for lack of space).
    """

    def __init__(self, threads: Callable[[], Sequence[threading.Thread]], journal_writable: Callable[[], None],
                 spool_dir: Path, limits: DiskConfig, started: threading.Event,
                 disk_guard: "DiskGuard | None" = None) -> None:
        self.disk_guard = disk_guard
        self.threads = threads
        self.journal_writable = journal_writable
        self.spool_dir = spool_dir
        self.limits = limits
        self.started = started

    def alive(self) -> Verdict:
        problems = [f"thread {t.name} has stopped" for t in self.threads() if not t.is_alive()]
        try:
            self.journal_writable()
        except Exception as exc:  # noqa: BLE001 (any failure to write is the answer)
            problems.append(f"the journal cannot be written: {type(exc).__name__}: {exc}")
        return Verdict(not problems, tuple(problems))

    def ready(self) -> Verdict:
        problems = [] if self.started.is_set() else ["the service is starting"]
        if self.disk_guard is not None:
            problem = self.disk_guard.problem()
        else:
            problem = disk_problem(disk_space(self.spool_dir), self.limits)
        if problem:
            problems.append(problem)
        return Verdict(not problems, tuple(problems))
