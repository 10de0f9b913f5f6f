"""Result versions kept in the service's journal: a study that grows gets amended results, not a second
copy under the same UID (:mod:`onevlm.study.result_versions` says what a version is)."""

from __future__ import annotations

import logging
from typing import Sequence

import pydicom
from pydicom.uid import generate_uid

from onevlm.net.journal import Journal, ResultVersion
from onevlm.study.result_versions import PreviousVersion, Rebuild, content_digest

logger = logging.getLogger(__name__)


class JournalVersions:
    """Settle each result object of one group against the journal's latest version of it.

    New versions are recorded only by :meth:`commit`, which the processor calls once the files are
    in place: a crash before that rebuilds the same version (same UID, derived from the result and
    its version number) when the group is processed again.
    """

    def __init__(self, journal: Journal, group_key: str) -> None:
        self.journal = journal
        self.group_key = group_key
        self._pending: list[ResultVersion] = []

    def settle(self, kind: str, first: pydicom.Dataset, rebuild: Rebuild) -> pydicom.Dataset:
        key = f"{self.group_key}|{kind}|{first.SeriesInstanceUID}"
        digest = content_digest(first)
        latest = self.journal.result_version(key)
        if latest is None:
            self._pending.append(ResultVersion(key, 1, str(first.SOPInstanceUID), digest))
            return first
        previous = [PreviousVersion(*p) for p in latest.previous]
        if latest.content_digest == digest:  # unchanged: the same object as sent before
            if latest.version == 1 and latest.sop_instance_uid == str(first.SOPInstanceUID):
                return first
            return rebuild(latest.sop_instance_uid, [p.as_dataset() for p in previous])
        version = latest.version + 1
        uid = generate_uid(entropy_srcs=[key, f"version {version}"])
        previous.append(PreviousVersion(str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                                        str(first.SOPClassUID), latest.sop_instance_uid))
        amended = rebuild(uid, [p.as_dataset() for p in previous])
        logger.info("event=amended group=%s kind=%s version=%d sop=%s predecessor=%s", self.group_key, kind, version,
                    uid, latest.sop_instance_uid)
        self._pending.append(ResultVersion(key, version, uid, digest, tuple(tuple(p.as_list()) for p in previous)))
        return amended

    def commit(self) -> Sequence[ResultVersion]:
        """Record the versions settled so far (call once their files are in place)."""
        pending, self._pending = self._pending, []
        if pending:
            self.journal.record_result_versions(pending)
        return pending
