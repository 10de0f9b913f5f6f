"""Whether an error means the disk is full: the one test every writer shares (spool, journal, results).

Standard library only, so that the result writer (:mod:`onevlm.study.outputs`) and the service
(:mod:`onevlm.net.disk_space`) ask the same question without the one importing the other.
"""

from __future__ import annotations

import errno
import sqlite3

#: errno values that mean "no room to write" (a full disk, an exhausted quota).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: SQLite's primary result code for "database or disk is full".
SQLITE_FULL = 13


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk is full.

    Follows ``__cause__``/``__context__``, so a :class:`~onevlm.net.spool.SpoolError` wrapping an
    ``OSError(ENOSPC)``, or SQLite's "database or disk is full", count too.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL
                                               or "disk is full" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
