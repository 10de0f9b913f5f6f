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

What is copied (``intake.fetch``): ``all`` copies every instance whole. ``needed`` (the default)
reads each series' metadata in one DICOMweb request (``/dicom-web/studies/S/series/T/metadata``,
Orthanc's DICOMweb plugin), stores every instance as a header-only copy (retention's: the router,
an SR's evidence, retention and amendments already read those) and fetches whole only the
instances the pipeline reads pixels from: the image the router will route the series by (its
middle image, :func:`~onevlm.net.header_copies.whole_needed`; a VLM, a specialty model, a SEG's
source, the operator's page and ``labels export`` all read that one), every level of a whole
slide, and every instance of a series whose metadata cannot be read or encoded.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from onevlm.dicom.header import DicomReadError, read_header
from onevlm.net.config import OrthancSource
from onevlm.disk_full import is_disk_full
from onevlm.net.disk_space import DiskGuard
from onevlm.net.header_copies import HeaderCopy, HeaderEncoder, MetadataError, routing_view, whole_needed
from onevlm.net.journal import Journal
from onevlm.net.spool import Spool, StoredInstance, fsync_dir

logger = logging.getLogger(__name__)

CURSOR = "orthanc-changes"
#: Series onevlm wrote (routing SRs, box SEGs, annotations): never inputs.
OWN_SERIES_PREFIX = "onevlm"
CHANGES_PER_REQUEST = 100
#: Instances fetched and spooled at once.
COPY_THREADS = 4
#: Orthanc's DICOMweb plugin root (its default), below the REST URL.
DICOMWEB_ROOT = "/dicom-web"


@dataclass
class _SeriesPlan:
    """One series of a stable change: its instances in Orthanc (SOP UID → Orthanc ID), the new ones."""

    orthanc_id: str
    study_instance_uid: str
    series_instance_uid: str
    ids: dict[str, str]
    new: set[str]
    whole: set[str] = field(default_factory=set)
    metadata: dict[str, dict] = field(default_factory=dict)


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

    def _plans(self, series: list[dict]) -> list[_SeriesPlan]:
        """The series (not onevlm's own) with instances the journal does not hold yet."""
        plans = []
        study_uids: dict[str, str] = {}
        for one in series:
            tags = one.get("MainDicomTags", {})
            if str(tags.get("SeriesDescription", "")).lower().startswith(OWN_SERIES_PREFIX):
                continue
            ids = {}
            for instance in self._get(f"/series/{one['ID']}/instances"):
                sop = instance.get("MainDicomTags", {}).get("SOPInstanceUID", "")
                if sop:
                    ids[sop] = instance["ID"]
            new = {sop for sop in ids if not self.journal.has_instance(sop)}
            if not new:
                continue
            parent = one["ParentStudy"]
            if parent not in study_uids:
                study_uids[parent] = self._get(f"/studies/{parent}")["MainDicomTags"]["StudyInstanceUID"]
            plans.append(_SeriesPlan(one["ID"], study_uids[parent], str(tags.get("SeriesInstanceUID", "")), ids, new))
        return plans

    def _metadata(self, plan: _SeriesPlan) -> list[dict] | None:
        """The series' DICOMweb metadata (one request), or ``None`` where Orthanc has no DICOMweb plugin."""
        import requests

        try:
            return self._get(f"{DICOMWEB_ROOT}/studies/{plan.study_instance_uid}/series/"
                             f"{plan.series_instance_uid}/metadata")
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                return None
            raise

    def _plan_series(self, plan: _SeriesPlan, metadata: list[dict] | None) -> None:
        """Decide which instances of ``plan`` are fetched whole (the rest become header-only copies)."""
        if metadata is None:
            logger.warning("event=intake_whole source=orthanc series=%s reason=no_dicomweb_metadata "
                           "(is the DICOMweb plugin on, at %s?)", plan.series_instance_uid, DICOMWEB_ROOT)
            plan.whole = set(plan.new)
            return
        plan.metadata = {str((item.get("00080018", {}).get("Value") or [""])[0]): item for item in metadata}
        group = plan.study_instance_uid if self.spool.group_by == "study" else plan.series_instance_uid
        folder = self.spool.group_folder(group)
        members, held_whole = [], set()
        try:
            for sop in plan.ids:
                path = folder / f"{sop}.dcm"
                if sop not in plan.new:  # held: what the router reads of it is what the spool has
                    if not path.is_file():
                        continue  # expired by retention: the router will not read it
                    try:
                        if read_header(path).has_pixel_data:
                            held_whole.add(sop)
                    except DicomReadError:
                        continue
                if sop not in plan.metadata:
                    raise MetadataError(f"{sop}: not in the series' metadata")
                members.append(routing_view(plan.metadata[sop], path))
            plan.whole = whole_needed(members, held_whole, plan.new)
        except MetadataError as exc:  # safe and as before: every new instance of the series whole
            logger.warning("event=intake_whole source=orthanc series=%s reason=metadata (%s)",
                           plan.series_instance_uid, exc)
            plan.whole = set(plan.new)

    def _copy_needed(self, level: str, resource: str, series: list[dict]) -> int:
        """``fetch: needed``: header-only copies and the few whole instances; returns instances recorded."""
        plans = self._plans(series)
        if not plans:
            return 0
        encoder = HeaderEncoder()

        def fetch_whole(plan: _SeriesPlan, sop: str) -> StoredInstance | None:
            stored = self.spool.store(self._get(f"/instances/{plan.ids[sop]}/file", raw=True))
            return stored if sop in plan.new else None  # a held copy made whole: recorded already

        def write_copy(copy: HeaderCopy) -> StoredInstance:
            return self.spool.store_known(copy.encoded, copy.study_instance_uid, copy.series_instance_uid,
                                          copy.sop_instance_uid, copy.sop_class_uid, sync_folder=False)

        with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
            # Metadata of several series at once (Orthanc parses them on both cores). Each series is
            # planned as its metadata comes; its whole instances download while this thread encodes
            # the copies, which the pool writes (fsync) once the series' whole ones are in the spool:
            # a crash or a full disk never leaves a series as copies without the image it is routed by.
            wholes, writes = [], []
            for plan, metadata in zip(plans, pool.map(self._metadata, plans)):
                self._plan_series(plan, metadata)
                own = [pool.submit(fetch_whole, plan, sop) for sop in sorted(plan.whole)]
                wholes += own
                waiting: list[HeaderCopy] = []
                for sop in sorted(plan.new - plan.whole):
                    try:
                        waiting.append(encoder.encode(plan.metadata[sop]))
                    except MetadataError as exc:  # this one whole: still a correct (if extra) whole image
                        logger.warning("event=intake_whole source=orthanc sop=%s reason=metadata (%s)", sop, exc)
                        wholes.append(pool.submit(fetch_whole, plan, sop))
                        continue
                    if all(f.done() and f.exception() is None for f in own):
                        writes += [pool.submit(write_copy, copy) for copy in waiting]
                        waiting = []
                for f in own:
                    f.result()  # raises (disk full, Orthanc gone) before any copy of the series is written
                writes += [pool.submit(write_copy, copy) for copy in waiting]
            recorded = [stored for stored in (f.result() for f in wholes) if stored is not None]
            copies = [f.result() for f in writes]
        for folder in {stored.path.parent for stored in copies}:
            fsync_dir(folder)  # one fsync per folder: only now are the copies durable, and recorded
        groups = set()
        for stored in recorded + copies:
            self.journal.record_instance(stored.sop_instance_uid, stored.group_key, stored.path,
                                         stored.sop_class_uid, "orthanc")
            groups.add(stored.group_key)
        for group in groups:
            self.journal.mark_stable(group)
        logger.info("event=intake_copied source=orthanc fetch=needed %s=%s instances=%d whole=%d header_only=%d",
                    level, resource, len(recorded) + len(copies), len(recorded), len(copies))
        return len(recorded) + len(copies)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; an unreachable Orthanc is retried, never fatal."""
        while not stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # Orthanc restarting, network: try again at the next poll
                logger.warning("event=intake_error source=orthanc url=%s error=%s: %s", self.source.url,
                               type(exc).__name__, exc)
            stop.wait(self.source.poll_seconds)
