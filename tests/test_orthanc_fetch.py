"""The Orthanc intake reads what it needs (``intake.fetch``), with a real Orthanc on loopback.

``needed`` (default): every instance a header-only copy built from Orthanc's tags as it arrives,
recorded in the journal when Orthanc calls the study stable, whole only the image the router
routes the series by; the SR's evidence still lists every instance, results go back to Orthanc,
an amendment is routed by the middle image of the grown series. ``all``: every instance whole, as
before. A copy that fails mid-way (a crash) loses nothing and records nothing twice. Research use only.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pydicom
import pytest

from dicom_peers import Pacs, journal_query, make_copies, pydicom_file, running_service, service_config, storescu, \
    wait_until
from onevlm.net.config import ConfigError, OrthancSource, parse_config
from onevlm.net.header_copies import HeaderEncoder, routing_view, whole_needed
from onevlm.net.orthanc_tags import dicom_json
from onevlm.net.retention import is_header_only
from onevlm.reports.routing_metadata import DETAIL_FILE

def numbered(files: list[Path]) -> dict[int, str]:
    """Instance Number → SOP Instance UID of the test files."""
    out = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[int(ds.InstanceNumber)] = str(ds.SOPInstanceUID)
    return out


def spool_state(spool: Path) -> dict[str, tuple[bool, int]]:
    """SOP Instance UID → (header-only, bytes) of every instance in the spool."""
    return {p.stem: (is_header_only(pydicom.dcmread(p, stop_before_pixels=True)), p.stat().st_size)
            for p in (spool / "incoming").glob("*/*.dcm")}


def routed(spool: Path, group: str) -> str:
    detail = json.loads((spool / "results" / group / DETAIL_FILE).read_text())
    (entry,) = detail["entries"]
    return entry["routed_sop_instance_uid"]


def evidence(spool: Path, group: str) -> set[str]:
    """SOP Instance UIDs the group's (latest) routing SR lists as evidence."""
    srs = sorted((spool / "results" / group / "sr").glob("*.dcm"), key=lambda p: p.stat().st_mtime)
    sr = pydicom.dcmread(srs[-1])
    return {str(ref.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def stable_in_orthanc(pacs: Pacs, files: list[Path], spool_dir: Path):
    """Send ``files`` to Orthanc, wait for its StableStudy; a fresh spool and journal to copy into."""
    from onevlm.net.journal import Journal
    from onevlm.net.spool import Spool

    assert storescu(files, pacs.dicom_port, called=pacs.AE_TITLE).returncode == 0
    wait_until(lambda: any(c["ChangeType"] == "StableStudy" for c in pacs.get_json("/changes?limit=200")["Changes"]),
               30, 0.2, "Orthanc's StableStudy")
    return Spool(spool_dir), Journal(spool_dir / "journal.sqlite")


def routing_srs(pacs: Pacs, study: str, count: int):
    found = pacs.routing_srs().get(study, [])
    return found if len(found) >= count else None


# --------------------------------------------------------------------------- configuration


def test_the_fetch_setting_is_validated():
    base = {"spool_dir": "/tmp/onevlm-test-spool", "intake": {"orthanc": "http://127.0.0.1:8042"}}
    assert parse_config(base).intake.fetch == "needed"
    assert parse_config({**base, "intake": {**base["intake"], "fetch": "all"}}).intake.fetch == "all"
    with pytest.raises(ConfigError, match=r"^site.yaml: intake.fetch: 'pixels' must be one of needed, all$"):
        parse_config({**base, "intake": {**base["intake"], "fetch": "pixels"}}, source="site.yaml")
    with pytest.raises(ConfigError, match=r"intake.fetches: is not a known setting"):
        parse_config({**base, "intake": {**base["intake"], "fetches": "all"}})
    with pytest.raises(ValueError, match="fetch must be one of"):
        OrthancSource("http://127.0.0.1:8042", fetch="some")


# --------------------------------------------------------------------------- choosing the whole ones


def test_the_whole_ones_make_the_middle_image_the_routed_one(tmp_path):
    """Whatever is already whole, the chosen set's middle (the router's pick) is the series' middle image."""
    uids = [f"1.2.3.{i}" for i in range(1, 10)]

    def view(i: int) -> object:
        meta = {"00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00080018": {"vr": "UI", "Value": [uids[i]]}, "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}, "00200013": {"vr": "IS", "Value": [i + 1]},
                "7FE00010": {"vr": "OW", "BulkDataURI": "http://x"}}
        return routing_view(meta, tmp_path / f"{uids[i]}.dcm")

    members = [view(i) for i in (4, 0, 8, 2, 6, 1, 3, 5, 7)]  # any order: the router's reading order decides
    assert whole_needed(members, set(), set(uids)) == {uids[4]}
    for held_whole in ({uids[0]}, {uids[7], uids[8]}, {uids[0], uids[1], uids[2]}, {uids[4]}):
        chosen = whole_needed(members, held_whole, set(uids) - held_whole) | held_whole
        ordered = [u for u in uids if u in chosen]
        assert ordered[len(ordered) // 2] == uids[4], held_whole


def test_a_header_copy_reads_as_retentions_copy():
    source = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    metadata = source.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _: "http://x/bulk")
    copy = HeaderEncoder().encode(metadata)
    from io import BytesIO

    ds = pydicom.dcmread(BytesIO(copy.encoded))
    assert is_header_only(ds) and "PixelData" not in ds
    assert ds.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID == copy.sop_instance_uid
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient",
                    "Rows", "Columns", "Modality", "SOPClassUID"):
        assert ds[keyword].value == source[keyword].value, keyword
    tags = [int(e.tag) for e in ds]
    assert tags == sorted(tags)


def test_orthancs_tags_become_dicom_json():
    """VRs from the dictionary (private creators' too, US or SS by Pixel Representation); what Orthanc
    cannot give faithfully (binary, AT, too long, unknown private) is left out, Pixel Data marked."""
    tags = {
        "0008,0018": {"Name": "SOPInstanceUID", "Type": "String", "Value": "1.2.3.4"},
        "0010,0010": {"Name": "PatientName", "Type": "String", "Value": "Doe^J=Ideo^J"},
        "0018,0050": {"Name": "SliceThickness", "Type": "String", "Value": "1.25"},
        "0020,0032": {"Name": "ImagePositionPatient", "Type": "String", "Value": "-125\\-125.5\\10"},
        "0020,4000": {"Name": "ImageComments", "Type": "TooLong", "Value": None},
        "0028,0009": {"Name": "FrameIncrementPointer", "Type": "String", "Value": "0054,0010"},
        "0028,0010": {"Name": "Rows", "Type": "String", "Value": "512"},
        "0028,0103": {"Name": "PixelRepresentation", "Type": "String", "Value": "1"},
        "0028,0106": {"Name": "SmallestImagePixelValue", "Type": "String", "Value": "-1024"},
        "0028,1050": {"Name": "WindowCenter", "Type": "String", "Value": ""},
        "0043,0010": {"Name": "PrivateCreator", "Type": "String", "Value": "GEMS_PARM_01"},
        "0043,1010": {"Name": "WindowValue", "Type": "String", "Value": "400"},
        "0043,1028": {"Name": "UniqueImageIdentifier", "Type": "Null", "Value": None},
        "0045,0010": {"Name": "PrivateCreator", "Type": "String", "Value": "SOME VENDOR"},
        "0045,1001": {"Name": "Unknown Tag & Data", "Type": "String", "Value": "x"},
        "0008,1140": {"Name": "ReferencedImageSequence", "Type": "Sequence", "Value": [
            {"0008,1155": {"Name": "ReferencedSOPInstanceUID", "Type": "String", "Value": "1.2.3.5"}}]},
        "7fe0,0010": {"Name": "PixelData", "Type": "Null", "Value": None},
    }
    assert dicom_json(tags) == {
        "00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J", "Ideographic": "Ideo^J"}]},
        "00180050": {"vr": "DS", "Value": ["1.25"]},
        "00200032": {"vr": "DS", "Value": ["-125", "-125.5", "10"]},
        "00280010": {"vr": "US", "Value": [512]},
        "00280103": {"vr": "US", "Value": [1]},
        "00280106": {"vr": "SS", "Value": [-1024]},
        "00281050": {"vr": "DS"},
        "00430010": {"vr": "LO", "Value": ["GEMS_PARM_01"]},
        "00431010": {"vr": "US", "Value": [400]},
        "00450010": {"vr": "LO", "Value": ["SOME VENDOR"]},
        "00081140": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.5"]}}]},
        "7FE00010": {"vr": "OW", "BulkDataURI": ""},
    }


def test_the_orthanc_client_authenticates_raises_on_errors_and_asks_again_after_a_dropped_answer():
    """Basic authentication on every request; an HTTP error is an OrthancError with its status (the intake
    treats 404 as "deleted from Orthanc"); a connection closed before its answer (a kept-alive connection
    Orthanc has just closed) is asked again, once."""
    import base64
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from onevlm.net.orthanc_client import OrthancClient, OrthancError

    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            if self.path == "/drop" and [p for p, _ in seen].count("/drop") == 1:
                self.close_connection = True  # no answer: the connection just closes
                return
            status, body = (404, b'{"Message": "Unknown resource"}') if self.path == "/missing" else (200, b'{"ok": 1}')
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = OrthancClient(f"http://127.0.0.1:{server.server_port}", "onevlm", "s3cret", timeout=10)
        assert client.get_json("/system") == {"ok": 1}
        assert seen[0] == ("/system", "Basic " + base64.b64encode(b"onevlm:s3cret").decode())
        with pytest.raises(OrthancError, match="HTTP 404 .*Unknown resource") as raised:
            client.get_json("/missing")
        assert raised.value.status == 404
        assert client.get_json("/drop") == {"ok": 1}
        assert [p for p, _ in seen].count("/drop") == 2
        client.close()
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- with Orthanc


class SlowToSettle(Pacs):
    """Orthanc calls a study stable only 5 s after its last instance: time to look before it does."""

    def config(self) -> dict:
        return {**super().config(), "StableAge": 5}


def test_needed_copies_headers_as_they_arrive_and_records_a_series_orthanc_does_not_settle(tmp_path):
    """Before StableStudy: a header-only copy of every instance in the spool, none in the journal; the
    copy holds the original's header but what Orthanc's tags cannot give. Orthanc forgets a settling
    study when it restarts: past ``settle_seconds`` after its last instance the intake records the
    series as complete (the middle image whole, due at once), and Orthanc's late stable change adds nothing."""
    from onevlm.net.journal import Journal
    from onevlm.net.orthanc_intake import OrthancIntake
    from onevlm.net.spool import Spool

    (study, files), = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=5).items()
    by_number = numbered(files)
    with SlowToSettle(tmp_path / "pacs") as pacs:
        spool, journal = Spool(tmp_path / "spool"), Journal(tmp_path / "spool" / "journal.sqlite")
        intake = OrthancIntake(OrthancSource(pacs.url), spool, journal)
        assert storescu(files, pacs.dicom_port, called=pacs.AE_TITLE).returncode == 0
        assert intake.poll_once() == 0
        changes = [c["ChangeType"] for c in pacs.get_json("/changes?limit=1000")["Changes"]]
        assert "StableStudy" not in changes, "Orthanc called the study stable too early for this test"
        state = spool_state(tmp_path / "spool")
        assert set(state) == set(by_number.values()) and all(copy for copy, _ in state.values())
        assert journal.status()["received"] == 0 and intake.pending_instances == 5

        # the copy is the original's header, less what the module says Orthanc's tags cannot give
        original = pydicom.dcmread(files[0], stop_before_pixels=True)
        copy = pydicom.dcmread(tmp_path / "spool" / "incoming" / study / f"{original.SOPInstanceUID}.dcm")
        left_out = {str(e.tag) for e in original if e.tag not in copy}
        expected = {str(e.tag) for e in original
                    if e.tag.element == 0 or e.VR in ("OB", "OW", "UN", "AT")}
        assert left_out == expected, left_out ^ expected
        assert "(0043,1010)" in {str(e.tag) for e in copy}  # a GE private element, its creator known
        for element in original:
            if element.tag in copy and element.VR != "SQ":
                assert copy[element.tag].value == element.value, element.tag

        intake.settle_seconds = 0.0  # (an hour by default)
        assert intake.poll_once() == 5 and intake.pending_instances == 0
        assert "StableStudy" not in [c["ChangeType"] for c in pacs.get_json("/changes?limit=1000")["Changes"]]
        assert journal.due_groups(3600) == [study]  # due at once, as after a stable change
        wait_until(lambda: any(c["ChangeType"] == "StableStudy"
                               for c in pacs.get_json("/changes?limit=1000")["Changes"]), 30, 0.2, "StableStudy")
        assert intake.poll_once() == 0  # nothing twice
        counts, pending = journal.status(), intake.pending_instances
        journal.close()
    assert counts["received"] == 5 and counts["duplicates"] == 0 and pending == 0
    state = spool_state(tmp_path / "spool")
    assert {sop for sop, (copy, _) in state.items() if not copy} == {by_number[3]}



def test_needed_fetches_only_the_routed_image_whole_and_an_amendment_works(tmp_path):
    spool = tmp_path / "spool"
    (study, files), = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=8).items()
    by_number = numbered(files)
    with Pacs(tmp_path / "pacs") as pacs:
        config = service_config(spool, intake={"orthanc": pacs.url, "poll_seconds": 0.2},
                                destinations=[{"name": "orthanc", "dicomweb": f"{pacs.url}/dicom-web"}])
        with running_service(config) as service:
            assert storescu(files[:5], pacs.dicom_port, called=pacs.AE_TITLE).returncode == 0
            wait_until(lambda: routing_srs(pacs, study, 1), 60, 0.3, "the routing SR written back into Orthanc")
            wait_until(lambda: service.status()["exported"] == 1, 30, 0.2, "the export recorded")
            state = spool_state(spool)
            assert set(state) == {by_number[n] for n in range(1, 6)}
            # only the middle image (Instance Number 3 of 5) is whole; the copies are tiny
            assert {sop for sop, (copy, _) in state.items() if not copy} == {by_number[3]}
            assert all(size < 8192 for sop, (copy, size) in state.items() if copy)
            assert routed(spool, study) == by_number[3]
            assert evidence(spool, study) == set(state)  # the SR's evidence lists every instance

            # an amendment: three more slices; the grown series is routed by its middle image (5 of 8)
            assert storescu(files[5:], pacs.dicom_port, called=pacs.AE_TITLE).returncode == 0
            wait_until(lambda: routing_srs(pacs, study, 2), 60, 0.3, "the amended SR in Orthanc")
            wait_until(lambda: service.status()["exported"] == 2, 30, 0.2, "the amended export recorded")
            state = spool_state(spool)
            status = service.status()
        assert status["received"] == 8 and status["failed"] == 0 and status["duplicates"] == 0
        assert status["orthanc_intake"]["copied_awaiting_stable"] == 0 and status["orthanc_intake"]["fetch"] == "needed"
        assert status["orthanc_intake"]["changes_position"] > 0
        assert {sop for sop, (copy, _) in state.items() if not copy} == {by_number[3], by_number[5]}
        assert routed(spool, study) == by_number[5]
        assert evidence(spool, study) == set(by_number.values())


def test_all_copies_every_instance_whole(tmp_path):
    from onevlm.net.orthanc_intake import OrthancIntake

    (study, files), = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=4).items()
    with Pacs(tmp_path / "pacs") as pacs:
        spool, journal = stable_in_orthanc(pacs, files, tmp_path / "spool")
        intake = OrthancIntake(OrthancSource(pacs.url, fetch="all"), spool, journal)
        assert intake.poll_once() == 4
        assert intake.poll_once() == 0  # nothing twice
        journal.close()
    state = spool_state(tmp_path / "spool")
    assert set(state) == set(numbered(files).values()) and not any(copy for copy, _ in state.values())


@pytest.mark.parametrize("then", ["restart", "retry"])
def test_a_copy_that_fails_midway_loses_nothing(tmp_path, monkeypatch, then):
    """The copy breaks after a few header copies: the position stays. A restarted service (journal
    recovery, the same changes again) or the same intake's next poll (an error it logged) ends with
    every instance once and the middle one whole."""
    from onevlm.net import orthanc_intake
    from onevlm.net.journal import Journal
    from onevlm.net.orthanc_intake import CURSOR, OrthancIntake
    from onevlm.net.spool import Spool

    (study, files), = make_copies(pydicom_file("CT_small.dcm"), tmp_path / "data", studies=1, per_study=7).items()
    by_number = numbered(files)
    with Pacs(tmp_path / "pacs") as pacs:
        spool, journal = stable_in_orthanc(pacs, files, tmp_path / "spool")
        written = []
        real = Spool.store_batch

        def crashing(self, items):
            written.extend(real(self, items[:3]))  # up to three copies made, then the process dies
            raise RuntimeError("killed")

        intake = OrthancIntake(OrthancSource(pacs.url), spool, journal)
        monkeypatch.setattr(orthanc_intake.Spool, "store_batch", crashing)
        with pytest.raises(RuntimeError, match="killed"):
            intake.poll_once()
        monkeypatch.setattr(orthanc_intake.Spool, "store_batch", real)
        assert journal.status()["received"] == 0 and journal.cursor(CURSOR) < pacs.get_json("/changes?limit=0")["Last"]
        assert written and all(copy for copy, _ in spool_state(tmp_path / "spool").values())

        if then == "restart":
            journal.close()
            journal = Journal(tmp_path / "spool" / "journal.sqlite")  # recovery, then a new intake
            held = journal.recover(spool.scan())
            assert held == len(spool.scan()) == len(written)
            intake = OrthancIntake(OrthancSource(pacs.url), spool, journal)
        else:
            held = 0  # the copies stay in the spool, unrecorded; the next poll records them with the rest
        assert intake.poll_once() == 7 - held
        counts = journal.status()
        journal.close()
    state = spool_state(tmp_path / "spool")
    assert counts["received"] == 7 and counts["duplicates"] == 0
    assert set(state) == set(by_number.values())
    assert {sop for sop, (copy, _) in state.items() if not copy} == {by_number[4]}
    rows = journal_query(tmp_path / "spool", "SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM instances")
    assert rows == [(7, 7)]


@pytest.mark.slow
def test_the_intake_bench_runs_both_modes(tmp_path):
    """bench/orthanc_intake_bench.py at its smallest (its figures are in bench/RESULTS.md, not here)."""
    import subprocess
    import sys

    out = tmp_path / "intake.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "orthanc_intake_bench.py"
    done = subprocess.run([sys.executable, str(bench), "--instances", "4", "--json", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["all"]["whole_instances"] == 4 and result["needed"]["whole_instances"] == 1
    assert all(result[mode]["follow_files_per_s"] > 0 for mode in ("all", "needed"))
