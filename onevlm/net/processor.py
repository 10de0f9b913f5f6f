"""Run the pipeline on a complete group (study or series) and queue its results for export.

The pipeline is the router, then, when the service has a specialty model, route -> execute: each
routed card that an adapter can run runs, and its result joins the SR (boxes: also a SEG).

A full disk never leaves a half-written result: while the service's disk guard says the spool's disk is
too full the group is not started, and a write that fails for lack of space (ENOSPC) removes what was
staged; either way the group stays pending (``receiving``, the reason in its error) and is processed
again once space returns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from typing import Callable, Sequence

import pydicom

from onevlm.cards.repository import CardRepository
from onevlm.net.config import Destination
from onevlm.disk_full import is_disk_full
from onevlm.net.disk_space import DiskGuard
from onevlm.net.journal import Journal
from onevlm.net.result_versions import JournalVersions
from onevlm.net.spool import Spool
from onevlm.reports.series_figures import SeriesFigures
from onevlm.router.pipeline import Router
from onevlm.study.execution import execute_study
from onevlm.study.outputs import write_study_outputs
from onevlm.study.result_versions import content_digest
from onevlm.study.routing import route_study

logger = logging.getLogger(__name__)


def _digest(dataset: pydicom.Dataset) -> str:
    """The outbox digest of a result: its content (without creation times, :func:`content_digest`) under its
    identity, so processing a group again with the same instances gives the same digest and the unchanged
    result is not queued again."""
    return hashlib.sha256(f"{dataset.SOPInstanceUID}|{content_digest(dataset)}".encode()).hexdigest()


class GroupProcessor:
    """Route a group's series (and run their cards), write its SRs, and put every result file in the outbox."""

    def __init__(self, router: Router, cards: CardRepository, spool: Spool, journal: Journal,
                 destinations: Sequence[Destination], specialty=None, disk_guard: DiskGuard | None = None) -> None:
        #: Called with each processed group's seconds (the service's metrics), if set.
        self.on_processed: Callable[[float], None] | None = None
        #: Holds groups back (pending) while the spool's disk is too full to write results.
        self.disk_guard = disk_guard
        self.router = router
        self.specialty = specialty
        self.cards = cards
        self.spool = spool
        self.journal = journal
        self.destinations = destinations

    def process(self, group_key: str) -> None:
        """Process one queued group; its status ends ``done`` (or ``failed``, or ``receiving`` again
        if instances arrived meanwhile, or while the disk is too full to write its results)."""
        started = time.time()
        reason = self.disk_guard.problem() if self.disk_guard is not None else None
        if reason is not None:
            self._wait_for_space(group_key, reason)
            return
        try:
            self.journal.set_group(group_key, "processing")  # in the try: a full journal disk is waited out too
            study = route_study(self.router, [self.spool.group_folder(group_key)])
            execution = execute_study(self.specialty, study, self.cards) if self.specialty is not None else None
            # Write next to the final folder, then swap it in: readers never see half the results.
            final = self.spool.result_folder(group_key)
            staging = final.with_name(f".{final.name}.staging")
            shutil.rmtree(staging, ignore_errors=True)
            versions = JournalVersions(self.journal, group_key)
            outputs = write_study_outputs(study, staging, self.cards, execution=execution, versions=versions)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            # what /status and /metrics count, kept with the group: a scrape never walks the results folders
            self.journal.record_series_figures(group_key, [SeriesFigures.from_entry(entry)
                                                           for entry in outputs.detail["entries"]])
            for version in versions.commit():
                if version.previous:  # the amended version's file is gone: if unsent, its successor goes instead
                    self.journal.supersede_exports(version.previous[-1][3])
            queued = 0
            meta = outputs.metadata
            review_files = {e["sr_file"] for e in outputs.detail["entries"] if e["needs_review"] and e["sr_file"]}
            for kind in ("sr", "seg", "annotations"):
                for path in sorted((final / kind).glob("*.dcm")):
                    header = pydicom.dcmread(path)
                    digest = _digest(header)
                    needs_review = str(path.relative_to(final)) in review_files
                    for destination in self.destinations:
                        if not destination.wants(str(header.SOPClassUID), needs_review):
                            continue
                        queued += self.journal.enqueue_export(group_key, destination.name, str(header.SOPInstanceUID),
                                                              str(header.SOPClassUID), path, digest)
            logger.info("event=processed group=%s series=%d outcome=%s routed=%d routed_sets=%d reviews=%d executed=%d "
                        "skipped=%d errors=%d queued_exports=%d seconds=%.2f", group_key, meta["series"],
                        meta["outcome"], meta["routed"], meta["routed_sets"], meta["reviews"], meta["executed"],
                        meta["skipped"], meta["errors"], queued, time.time() - started)
            if self.on_processed is not None:
                self.on_processed(time.time() - started)
        except Exception as exc:
            if is_disk_full(exc):
                # Nothing half-written stays: the staged results go, the group is written again once there is room.
                final = self.spool.result_folder(group_key)
                shutil.rmtree(final.with_name(f".{final.name}.staging"), ignore_errors=True)
                if self.disk_guard is not None:
                    self.disk_guard.note_full(exc, "writing a result")
                self._wait_for_space(group_key, f"writing its results failed, the spool's disk is full: {exc}")
                return
            logger.exception("event=processing_failed group=%s", group_key)
            self.journal.set_group(group_key, "failed", f"{type(exc).__name__}: {exc}")
            return
        if self.journal.group_received_since(group_key, started):
            self.journal.set_group(group_key, "receiving")  # more arrived: process again after the idle time
        else:
            self.journal.set_group(group_key, "done")

    def _wait_for_space(self, group_key: str, reason: str) -> None:
        """Put the group back to pending (``receiving``): processed again once the disk has room."""
        logger.warning("event=result_pending group=%s reason=%s", group_key, reason)
        try:
            self.journal.set_group(group_key, "receiving", f"waiting for disk space: {reason}")
        except Exception as exc:  # the journal shares the disk: a restart's recovery puts the group back
            logger.error("event=journal_failed group=%s error=%s", group_key, exc)
