"""Send result files to the configured destinations by C-STORE or STOW-RS, from the persistent outbox.

One association per destination and round; TCP_NODELAY on the socket; a failed send is retried
with exponential backoff (capped), the outbox surviving restarts; after ``max_attempts`` the
item is marked failed and shows in the status counts. The service drains each destination in a
thread of its own (:meth:`Exporter.run_once` with ``destination``), so a slow or dead destination
holds back only its own items; each send is bounded by the destination's ``timeout_seconds``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Sequence

from onevlm.net.config import Destination
from onevlm.net.journal import Journal, OutboxItem
from onevlm.net.sender import AssociationError, send_files
from onevlm.net.tls import client_context

logger = logging.getLogger(__name__)


class Exporter:
    """Drains the outbox to the destinations."""

    def __init__(self, journal: Journal, destinations: Sequence[Destination], ae_title: str,
                 base_seconds: float = 2.0, max_seconds: float = 300.0, max_attempts: int = 20) -> None:
        self.journal = journal
        self.destinations = {d.name: d for d in destinations}
        self.ae_title = ae_title
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self.max_attempts = max_attempts

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure."""
        return min(self.max_seconds, self.base_seconds * (2 ** max(attempts - 1, 0)))

    def run_once(self, now: float | None = None, destination: str | None = None) -> int:
        """Send every due item (of one ``destination``, or all) once; returns how many were sent."""
        due = self.journal.due_exports(now, destination=destination)
        by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in due:
            by_destination[item.destination].append(item)
        sent = 0
        for name, items in by_destination.items():
            destination = self.destinations.get(name)
            if destination is None:
                for item in items:
                    self.journal.mark_failed_attempt(item.id, f"destination {name!r} is not configured", None)
                continue
            sent += self._send(destination, items)
        return sent

    def _fail(self, item: OutboxItem, error: str) -> None:
        attempts = item.attempts + 1
        retry_at = None if attempts >= self.max_attempts else time.time() + self.backoff(attempts)
        self.journal.mark_failed_attempt(item.id, error, retry_at)
        logger.warning("event=export_failed sop=%s destination=%s attempt=%d error=%s%s", item.sop_instance_uid,
                       item.destination, attempts, error, "" if retry_at else " (giving up)")

    def _send(self, destination: Destination, items: list[OutboxItem]) -> int:
        try:
            if destination.dicomweb:
                from onevlm.net.stow import stow_files

                results = stow_files([i.path for i in items], destination)
            else:
                results = send_files([i.path for i in items], destination.host, destination.port,
                                     destination.ae_title, self.ae_title, destination.timeout_seconds,
                                     client_context(destination.tls))
        except (AssociationError, OSError, ValueError) as exc:
            for item in items:
                self._fail(item, str(exc))
            return 0
        sent = 0
        for item, result in zip(items, results):
            if result.ok:
                self.journal.mark_sent(item.id)
                sent += 1
                logger.info("event=exported sop=%s destination=%s", item.sop_instance_uid, destination.name)
            else:
                self._fail(item, result.error or f"C-STORE status {getattr(result, 'status', None)!r}")
        return sent

    def fail_unconfigured(self) -> int:
        """Give up on pending items of destinations no longer configured (run once at start); returns how many."""
        due = [i for i in self.journal.due_exports(float("inf"), limit=10**9) if i.destination not in self.destinations]
        for item in due:
            self.journal.mark_failed_attempt(item.id, f"destination {item.destination!r} is not configured", None)
        return len(due)
