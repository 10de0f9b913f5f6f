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

What is copied (``intake.fetch``): ``all`` copies every instance whole after the stable change.
``needed`` (the default) reads each instance as it arrives: it follows ``NewInstance`` changes
too, reads the instance's header through Orthanc's ``/instances/{id}/tags`` (Orthanc reads its file
only up to the pixels; :mod:`onevlm.net.orthanc_tags` says what such a copy keeps) and stores a
header-only copy (retention's marker: the router, an SR's evidence, retention and amendments
already read those), several at once. At the stable change only what the pipeline reads pixels
from is fetched whole: the image the router will route the series by (its middle image,
:func:`~onevlm.net.header_copies.whole_needed`; a VLM, a specialty model, a SEG's source, the
operator's page and ``labels export`` all read that one), every level of a whole slide, and an
instance whose header cannot be encoded; then the series' instances are recorded in the journal
in one transaction and the group is due. So a study of thousands of slices is in the journal
moments after Orthanc calls it stable, not after thousands of requests. Copies made before a
restart, not yet recorded, are recorded by the service's start-up recovery (as a listener's
acknowledged files are) and processed after the idle time. A series Orthanc never calls stable
(it forgets settling resources when it restarts) is recorded anyway an hour after its last
instance (``SETTLE_SECONDS``), with a warning.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from pathlib import Path

from onevlm.dicom.header import DicomReadError, read_dicom, read_header
from onevlm.disk_full import is_disk_full
from onevlm.inputs.routing_input import RoutingInput
from onevlm.net.config import OrthancSource
from onevlm.net.disk_space import DiskGuard
from onevlm.net.header_copies import HeaderCopy, HeaderEncoder, MetadataError, routing_view, whole_needed
from onevlm.net.journal import Journal
from onevlm.net.orthanc_client import OrthancClient, OrthancError
from onevlm.net.orthanc_tags import dicom_json
from onevlm.net.retention import is_header_only
from onevlm.net.spool import Spool, StoredInstance

logger = logging.getLogger(__name__)

CURSOR = "orthanc-changes"
#: Series onevlm wrote (routing SRs, box SEGs, annotations): never inputs.
OWN_SERIES_PREFIX = "onevlm"
CHANGES_PER_REQUEST = 100
#: Copies of a series Orthanc has not called stable this long after its last instance are recorded anyway.
SETTLE_SECONDS = 3600.0
#: Instances fetched and spooled at once.
COPY_THREADS = 4


@dataclass(frozen=True)
class _Read:
    """One instance's header read from Orthanc: its copy to store, or the file the spool has for it
    already (stored whole, or by an earlier try), and how the router will see it once whole."""

    orthanc_id: str
    copy: HeaderCopy | None
    whole: StoredInstance | None
    view: RoutingInput


@dataclass(frozen=True)
class _Arrival:
    """One instance in the spool, not yet in the journal, and how the router will see it once whole."""

    orthanc_id: str
    stored: StoredInstance
    view: RoutingInput


class OrthancIntake:
    """Follows one Orthanc's changes feed into the spool and the journal."""

    def __init__(self, source: OrthancSource, spool: Spool, journal: Journal,
                 disk_guard: DiskGuard | None = None, settle_seconds: float = SETTLE_SECONDS) -> None:
        self.disk_guard = disk_guard
        self.settle_seconds = settle_seconds
        self.source = source
        self.spool = spool
        self.journal = journal
        password = os.environ.get(source.password_env or "", "") if source.username else None
        self.client = OrthancClient(source.url, source.username, password, connections=COPY_THREADS + 1)
        self.change_type = "StableStudy" if spool.group_by == "study" else "StableSeries"
        #: ``fetch: needed``: instances copied as they arrived, by Series Instance UID, until their stable change.
        self._arrived: dict[str, dict[str, _Arrival]] = {}
        self._last_arrival: dict[str, float] = {}  # by Series Instance UID, time.monotonic()
        self._local = threading.local()

    @property
    def pending_instances(self) -> int:
        """Instances copied as they arrived whose study (series) Orthanc has not called stable yet."""
        return sum(len(one) for one in list(self._arrived.values()))

    def status(self) -> dict:
        """For ``/status``: the changes-feed position and the copies waiting for Orthanc's stable change."""
        return {"url": self.source.url, "fetch": self.source.fetch, "changes_position": self.journal.cursor(CURSOR),
                "copied_awaiting_stable": self.pending_instances}

    def _get(self, path: str, raw: bool = False):
        return self.client.get(path) if raw else self.client.get_json(path)

    def poll_once(self) -> int:
        """Handle the changes since the durable position; returns instances recorded in the journal."""
        copied = 0
        while True:
            since = self.journal.cursor(CURSOR)
            page = self._get(f"/changes?since={since}&limit={CHANGES_PER_REQUEST}")
            arriving: list[dict] = []
            for change in page.get("Changes", []):
                kind = change.get("ChangeType")
                if kind == "NewInstance" and self.source.fetch == "needed":
                    arriving.append(change)  # read together, in parallel, before the next other change
                    continue
                if arriving:
                    if not self._arrive(arriving):
                        return copied
                    arriving = []
                if kind == self.change_type:
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
            if arriving and not self._arrive(arriving):
                return copied
            if page.get("Done", True) or not page.get("Changes"):
                return copied + self._settle_overdue()

    def _settle_overdue(self) -> int:
        """Record the series Orthanc has not called stable ``settle_seconds`` after their last instance.

        Orthanc forgets which resources were still settling when it restarts, so such a study
        would never get its stable change; its copies would wait for ever. Returns instances recorded.
        """
        now, recorded = time.monotonic(), 0
        for uid, arrived in list(self._arrived.items()):
            idle = now - self._last_arrival.get(uid, now)
            if not arrived or idle < self.settle_seconds:
                continue
            try:
                parent = self._get(f"/instances/{next(iter(arrived))}")["ParentSeries"]
                one = self._get(f"/series/{parent}")
            except OrthancError as exc:
                logger.warning("event=intake_error source=orthanc series=%s error=%s", uid, exc)
                continue
            logger.warning("event=intake_unsettled source=orthanc series=%s instances=%d idle_s=%.0f: Orthanc has "
                           "not called it stable; recorded as complete", uid, len(arrived), idle)
            recorded += self._copy_needed("series", parent, [one])
        return recorded

    def _copy(self, level: str, resource: str) -> int:
        kind = "studies" if level == "study" else "series"
        try:
            series = self._get(f"/{kind}/{resource}/series?expand") if kind == "studies" else \
                [self._get(f"/series/{resource}")]
        except OrthancError as exc:
            if exc.status == 404:
                logger.info("event=intake_gone source=orthanc %s=%s (deleted from Orthanc)", level, resource)
                return 0
            raise
        if self.source.fetch == "needed":
            return self._copy_needed(level, resource, series)
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
            logger.info("event=intake_copied source=orthanc fetch=all %s=%s instances=%d", level, resource, copied)
        return copied

    # -- fetch: needed -------------------------------------------------------------------------

    def _arrive(self, changes: list[dict]) -> bool:
        """Header-only copies of the instances ``changes`` announce (``NewInstance``), as they arrive.

        The copies are durable (:meth:`Spool.store_batch`) before the position moves past their
        changes; the journal records them when their study (series) is stable. Returns False, with
        the position left before these changes, while the spool's disk is too full.
        """
        if self.disk_guard is not None and self.disk_guard.problem() is not None:
            return False
        now = time.monotonic()
        for one in self._read_and_store([c["ID"] for c in changes]):
            self._arrived.setdefault(one.view.header.series_instance_uid, {})[one.orthanc_id] = one
            self._last_arrival[one.view.header.series_instance_uid] = now
        self.journal.set_cursor(CURSOR, int(changes[-1]["Seq"]))
        return True

    def _read_and_store(self, orthanc_ids: list[str]) -> list[_Arrival]:
        """Read the instances' headers (several requests at once), store the copies the spool lacks
        in one batch; returns those now in the spool and not yet in the journal."""
        try:
            with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
                read = [r for r in pool.map(self._read_instance, orthanc_ids) if r is not None]
            copies = [r for r in read if r.copy is not None]
            stored = self.spool.store_batch([r.copy for r in copies])
        except Exception as exc:
            if is_disk_full(exc) and self.disk_guard is not None:
                self.disk_guard.note_full(exc, "copying from Orthanc")
            raise
        arrived = [_Arrival(r.orthanc_id, s, r.view) for r, s in zip(copies, stored)]
        return arrived + [_Arrival(r.orthanc_id, r.whole, r.view) for r in read if r.whole is not None]

    def _read_instance(self, orthanc_id: str) -> _Read | None:
        """Read one instance's header from Orthanc (its tags: no pixels) and encode its header-only copy
        unless the spool has the instance. ``None`` for onevlm's own results, instances gone from
        Orthanc and instances the journal holds; an instance whose header cannot be encoded is stored whole."""
        try:
            tags = self._get(f"/instances/{orthanc_id}/tags")
        except OrthancError as exc:
            if exc.status == 404:
                logger.info("event=intake_gone source=orthanc instance=%s (deleted from Orthanc)", orthanc_id)
                return None
            raise
        metadata = dicom_json(tags)
        description = str((metadata.get("0008103E", {}).get("Value") or [""])[0])
        if description.lower().startswith(OWN_SERIES_PREFIX):
            return None
        try:
            copy = self._encoder().encode(metadata)
            target = self.spool.placement(copy.study_instance_uid, copy.series_instance_uid, copy.sop_instance_uid,
                                          copy.sop_class_uid)
            view = routing_view(metadata, target.path)
        except MetadataError as exc:  # this one whole: still a correct (if extra) whole image
            logger.warning("event=intake_whole source=orthanc instance=%s reason=metadata (%s)", orthanc_id, exc)
            stored = self.spool.store(self._get(f"/instances/{orthanc_id}/file", raw=True))
            if self.journal.has_instance(stored.sop_instance_uid):
                return None
            return _Read(orthanc_id, None, stored, RoutingInput(stored.path, "dicom", read_header(stored.path)))
        if self.journal.has_instance(copy.sop_instance_uid):
            return None  # held already
        if target.path.exists():  # stored by an earlier try that failed before the position moved: kept as it is
            return _Read(orthanc_id, None, target, view)
        return _Read(orthanc_id, copy, None, view)

    def _encoder(self) -> HeaderEncoder:
        encoder = getattr(self._local, "encoder", None)
        if encoder is None:  # one per thread: it is not thread-safe
            encoder = self._local.encoder = HeaderEncoder()
        return encoder

    def _series_members(self, one: dict) -> tuple[dict[str, _Arrival], dict[str, tuple[Path, str]]] | None:
        """A stable series' instances: those arrived since the last stable change (Orthanc ID → arrival),
        and those the journal holds (SOP Instance UID → path and Orthanc ID); ``None`` when nothing is new."""
        uid = str(one.get("MainDicomTags", {}).get("SeriesInstanceUID", ""))
        arrived = self._arrived.get(uid, {})
        ids = list(one.get("Instances") or [])
        unknown = [i for i in ids if i not in arrived]
        held: dict[str, tuple[Path, str]] = {}
        if unknown:  # an amendment or a restart: which of them does the journal hold?
            sops = {instance["ID"]: str(instance.get("MainDicomTags", {}).get("SOPInstanceUID", ""))
                    for instance in self._get(f"/series/{one['ID']}/instances")}
            paths = self.journal.instance_paths([sops[i] for i in unknown if sops.get(i)])
            held = {sops[i]: (paths[sops[i]], i) for i in unknown if sops.get(i) in paths}
            missing = [i for i in unknown if sops.get(i) and sops[i] not in held]
            for found in self._read_and_store(missing):
                arrived[found.orthanc_id] = found
        if not arrived:
            return None
        return arrived, held

    def _copy_needed(self, level: str, resource: str, series: list[dict]) -> int:
        """``fetch: needed`` at a stable change: the image each series is routed by fetched whole, every
        new instance recorded, the group due. Returns instances recorded."""
        recorded, whole_count = [], 0
        for one in series:
            if str(one.get("MainDicomTags", {}).get("SeriesDescription", "")).lower().startswith(OWN_SERIES_PREFIX):
                continue
            found = self._series_members(one)
            if found is None:
                continue
            arrived, held = found
            members, held_whole = [a.view for a in arrived.values()], set()
            for sop, (path, _) in held.items():
                try:  # held: what the router reads of it is what the spool has (retention may have cut it)
                    header, ds = read_dicom(path)
                except DicomReadError:
                    continue  # expired by retention: the router will not read it
                if header.has_pixel_data:
                    held_whole.add(sop)
                elif is_header_only(ds):
                    header = replace(header, has_pixel_data=True)  # an image, its pixels in Orthanc
                members.append(RoutingInput(path, "dicom", header))
            new = {a.view.header.sop_instance_uid: a for a in arrived.values()}
            orthanc_ids = {a.view.header.sop_instance_uid: a.orthanc_id for a in arrived.values()}
            orthanc_ids.update({sop: orthanc_id for sop, (_, orthanc_id) in held.items()})
            whole = whole_needed(members, held_whole, set(new))
            for sop in sorted(whole):  # usually one: the middle image
                stored = self.spool.store(self._get(f"/instances/{orthanc_ids[sop]}/file", raw=True))
                if sop in new:
                    whole_count += 1
                    new[sop] = _Arrival(orthanc_ids[sop], stored, new[sop].view)
            recorded += [a.stored for a in new.values()]
            self._arrived.pop(str(one.get("MainDicomTags", {}).get("SeriesInstanceUID", "")), None)
            self._last_arrival.pop(str(one.get("MainDicomTags", {}).get("SeriesInstanceUID", "")), None)
        if not recorded:
            return 0
        groups = self.journal.record_instances([(s.sop_instance_uid, s.group_key, s.path, s.sop_class_uid)
                                                for s in recorded], "orthanc")
        for group in groups:
            self.journal.mark_stable(group)
        logger.info("event=intake_copied source=orthanc fetch=needed %s=%s instances=%d whole=%d header_only=%d",
                    level, resource, len(recorded), whole_count, len(recorded) - whole_count)
        return len(recorded)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; an unreachable Orthanc is retried, never fatal."""
        while not stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # Orthanc restarting, network: try again at the next poll
                logger.warning("event=intake_error source=orthanc url=%s error=%s: %s", self.source.url,
                               type(exc).__name__, exc)
            stop.wait(self.source.poll_seconds)
