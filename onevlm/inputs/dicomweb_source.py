"""Route straight from a DICOMweb archive: a study or series reference becomes local DICOM files.

``https://pacs.example/dicom-web/studies/<Study UID>[/series/<Series UID>]`` names what to route.
QIDO-RS lists its instances; WADO-RS fetches each one — only its metadata (a header-only DICOM file,
no pixel data moved) when the backend reads no pixels, the whole instance otherwise — into a
temporary folder, and the ordinary file path routes them. Credentials come from the environment:
``ONEVLM_DICOMWEB_TOKEN`` (bearer), else ``ONEVLM_DICOMWEB_USER`` and ``ONEVLM_DICOMWEB_PASSWORD``
(basic). Uses ``dicomweb-client``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REFERENCE = re.compile(r"^(?P<root>https?://\S+?)/studies/(?P<study>[0-9.]+)"
                       r"(?:/series/(?P<series>[0-9.]+)(?:/instances/(?P<instance>[0-9.]+))?)?/?$")
#: Elements whose values WADO-RS metadata gives as bulk data (not moved for a header-only file).
BULK_VALUE_KEYS = ("BulkDataURI", "InlineBinary")
PIXEL_DATA_TAGS = ("7FE00010", "7FE00008", "7FE00009")


class DicomWebError(RuntimeError):
    """A DICOMweb reference that cannot be fetched (the message names it)."""


@dataclass(frozen=True)
class DicomWebReference:
    """A study (or one of its series) on a DICOMweb service."""

    root: str
    study_instance_uid: str
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None

    @classmethod
    def parse(cls, text: str) -> "DicomWebReference | None":
        """The reference ``text`` names, or ``None`` when it is not a DICOMweb study/series/instance URL."""
        match = REFERENCE.match(str(text).strip())
        if match is None:
            return None
        return cls(match["root"], match["study"], match["series"], match["instance"])

    def __str__(self) -> str:
        series = f"/series/{self.series_instance_uid}" if self.series_instance_uid else ""
        instance = f"/instances/{self.sop_instance_uid}" if self.sop_instance_uid else ""
        return f"{self.root}/studies/{self.study_instance_uid}{series}{instance}"


def _session():
    import requests

    session = requests.Session()
    token = os.environ.get("ONEVLM_DICOMWEB_TOKEN")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif os.environ.get("ONEVLM_DICOMWEB_USER"):
        session.auth = (os.environ["ONEVLM_DICOMWEB_USER"], os.environ.get("ONEVLM_DICOMWEB_PASSWORD", ""))
    return session


def _header_only(metadata: dict, origin: str):
    """A Part 10 dataset from WADO-RS metadata, bulk values (pixels) left out.

    A private element (``ONEVLM`` block, (0009,xx01)) records where the pixels stayed, so the header
    reader knows the copy is of an image (these copies are routing inputs, never results).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from onevlm.dicom.header import PIXELS_ON_SERVER_ELEMENT, PIXELS_ON_SERVER_GROUP, PRIVATE_CREATOR

    kept = {tag: value for tag, value in metadata.items()
            if tag not in PIXEL_DATA_TAGS and not any(key in value for key in BULK_VALUE_KEYS)}
    ds = pydicom.Dataset.from_json(kept)
    if any(tag in metadata for tag in PIXEL_DATA_TAGS):
        ds.private_block(PIXELS_ON_SERVER_GROUP, PRIVATE_CREATOR, create=True).add_new(
            PIXELS_ON_SERVER_ELEMENT, "UR", origin)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def fetch(reference: DicomWebReference, folder: str | Path, metadata_only: bool) -> list[Path]:
    """Fetch the reference's instances into ``folder`` as DICOM files (header-only with ``metadata_only``).

    Raises
    ------
    DicomWebError
        When the service cannot be reached, answers with an error, or holds no such study/series.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    client = DICOMwebClient(url=reference.root, session=_session())
    try:
        if reference.sop_instance_uid:  # one instance: nothing to search
            found = [(reference.series_instance_uid, reference.sop_instance_uid)]
        else:
            found = [(item["0020000E"]["Value"][0], item["00080018"]["Value"][0])
                     for item in client.search_for_instances(study_instance_uid=reference.study_instance_uid,
                                                             series_instance_uid=reference.series_instance_uid)]
        if not found:
            raise DicomWebError(f"{reference}: no instances there")
        paths = []
        for series, sop in found:
            if metadata_only:
                metadata = client.retrieve_instance_metadata(reference.study_instance_uid, series, sop)
                origin = f"{reference.root}/studies/{reference.study_instance_uid}/series/{series}/instances/{sop}"
                dataset = _header_only(metadata[0] if isinstance(metadata, list) else metadata, origin)
            else:
                dataset = client.retrieve_instance(reference.study_instance_uid, series, sop)
            path = folder / f"{sop}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(path)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise DicomWebError(f"{reference}: the DICOMweb service answered HTTP {status}") from exc
    except requests.RequestException as exc:
        raise DicomWebError(f"{reference}: cannot reach the DICOMweb service ({type(exc).__name__})") from exc
    logger.info("fetched %d instance(s) of %s (%s)", len(paths), reference.study_instance_uid,
                "metadata only" if metadata_only else "whole instances")
    return paths
