"""Orthanc as the intake: Orthanc receives the C-STOREs; the service follows its changes feed.

Orthanc acknowledges an instance once it is stored (``SyncStorageArea`` makes that durable) and
announces a study (series) as complete with a ``StableStudy`` (``StableSeries``) change after its
own ``StableAge``. For each such change the intake copies the study's instances that the journal
does not hold yet into the spool (atomic, fsync'd writes, as the listener's), records them, and
marks the group due at once; the ordinary workers route it and the outbox sends the results
(a ``dicomweb:`` destination pointing at Orthanc's DICOMweb root writes them back into Orthanc).
The changes-feed position is durable in the journal and advances only after a change's instances
are in the spool, so a restart resumes where it stopped and loses nothing; instances already in
the journal are not fetched again, and onevlm's own results coming back (series described
``onevlm ...``) are ignored, so they never trigger a new round. While the spool's disk is too full
(the service's :class:`~onevlm.net.disk_space.DiskGuard`) nothing is copied and the position stays
put: Orthanc keeps the instances, and the next poll after space returns copies them.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from onevlm.net.config import OrthancSource
from onevlm.net.disk_space import DiskGuard, is_disk_full
from onevlm.net.journal import Journal
from onevlm.net.spool import Spool

logger = logging.getLogger(__name__)

CURSOR = "orthanc-changes"
#: Series onevlm wrote (routing SRs, box SEGs, annotations): never inputs.
OWN_SERIES_PREFIX = "onevlm"
CHANGES_PER_REQUEST = 100
#: Instances fetched and spooled at once.
COPY_THREADS = 4


class OrthancIntake:
    """Follows one Orthanc's changes feed into the spool and the journal."""

    def __init__(self, source: OrthancSource, spool: Spool, journal: Journal,
                 disk_guard: DiskGuard | None = None) -> None:
        import requests

        self.disk_guard = disk_guard
        self.source = source
        self.spool = spool
        self.journal = journal
        self.session = requests.Session()
        if source.username:
            self.session.auth = (source.username, os.environ.get(source.password_env or "", ""))
        self.change_type = "StableStudy" if spool.group_by == "study" else "StableSeries"

    def _get(self, path: str, raw: bool = False):
        response = self.session.get(self.source.url + path, timeout=60)
        response.raise_for_status()
        return response.content if raw else response.json()

    def poll_once(self) -> int:
        """Handle the changes since the durable position; returns instances copied into the spool."""
        copied = 0
        while True:
            since = self.journal.cursor(CURSOR)
            page = self._get(f"/changes?since={since}&limit={CHANGES_PER_REQUEST}")
            for change in page.get("Changes", []):
                if change.get("ChangeType") == self.change_type:
                    reason = self.disk_guard.problem() if self.disk_guard is not None else None
                    if reason is not None:  # the guard logs the pause; this change is copied at a later poll
                        return copied
                    try:
                        copied += self._copy(change["ResourceType"].lower(), change["ID"])
                    except Exception as exc:
                        if is_disk_full(exc) and self.disk_guard is not None:
                            self.disk_guard.note_full(exc, "copying from Orthanc")
                        raise
                self.journal.set_cursor(CURSOR, int(change["Seq"]))  # only once its instances are spooled
            if page.get("Done", True) or not page.get("Changes"):
                return copied

    def _copy(self, level: str, resource: str) -> int:
        kind = "studies" if level == "study" else "series"
        series = self._get(f"/{kind}/{resource}/series?expand") if kind == "studies" else \
            [self._get(f"/series/{resource}")]
        wanted = []
        for one in series:
            description = str(one.get("MainDicomTags", {}).get("SeriesDescription", ""))
            if description.lower().startswith(OWN_SERIES_PREFIX):
                continue
            for instance in self._get(f"/series/{one['ID']}/instances"):
                sop = instance.get("MainDicomTags", {}).get("SOPInstanceUID", "")
                if sop and not self.journal.has_instance(sop):
                    wanted.append(instance["ID"])

        def copy_one(orthanc_id: str) -> str:
            stored = self.spool.store(self._get(f"/instances/{orthanc_id}/file", raw=True))
            self.journal.record_instance(stored.sop_instance_uid, stored.group_key, stored.path,
                                         stored.sop_class_uid, "orthanc")
            return stored.group_key

        # Download and fsync overlap across instances; every one is in the spool before the position moves.
        with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
            groups = set(pool.map(copy_one, wanted))
        copied = len(wanted)
        for group in groups:
            self.journal.mark_stable(group)
        if copied:
            logger.info("event=intake_copied source=orthanc %s=%s instances=%d", level, resource, copied)
        return copied

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; an unreachable Orthanc is retried, never fatal."""
        while not stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # Orthanc restarting, network: try again at the next poll
                logger.warning("event=intake_error source=orthanc url=%s error=%s: %s", self.source.url,
                               type(exc).__name__, exc)
            stop.wait(self.source.poll_seconds)
