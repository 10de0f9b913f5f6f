"""End to end in a real browser: studies sent with dcmtk storescu to ``onevlm serve``, the operator's
page opened in headless Chromium (playwright-core, Debian's /usr/bin/chromium), a review answer
recorded through the page, exported with ``onevlm labels export`` and fitted with ``onevlm calibrate
fit``. Screenshots of every page go to test-artifacts/dashboard/ and tmp_path. Research use only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pydicom
import pytest

from dicom_peers import ONEVLM, REPO, SAMPLES, ServeProcess, journal_query, journal_status, listener_port, storescu, \
    wait_until, write_service_config
from ohif_support import ARTIFACTS, CHROMIUM, free_port, require_node_modules, run_node, stop_process

pytestmark = pytest.mark.slow

VIEWER = "http://viewer.example/viewer?StudyInstanceUIDs={study}"
PAGES = ("overview", "studies", "decision", "review", "reviewed", "calibration")


def _uids(path: Path) -> tuple[str, str]:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


def post_answer(base: str, group: str, series: str, answer: str, reviewer: str) -> None:
    """Record an answer with the review form's fields over plain HTTP (its key read from the page)."""
    with urllib.request.urlopen(f"{base}/review", timeout=30) as response:
        form_key = re.search(r'name=form_key value="([^"]+)"', response.read().decode()).group(1)
    data = urlencode({"form_key": form_key, "group": group, "series": series, "answer": answer,
                      "reviewer": reviewer}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{base}/review", data=data), timeout=30) as response:
        assert response.status == 200 and "Answer recorded." in response.read().decode()


def test_operator_page_in_a_browser(tmp_path):
    require_node_modules("playwright-core")
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/test-deps.sh)", pytrace=False)
    review_file = SAMPLES / "mr_small_no_bodypart.dcm"  # brain/kidney MRI tie: review
    set_file = SAMPLES / "ct_head_routine_brain.dcm"  # the brain CT cards as a set: routed-set
    other_file = SAMPLES / "mr_brain_pilot.dcm"
    files = [review_file, set_file, other_file]
    (review_study, review_series), (set_study, set_series) = _uids(review_file), _uids(set_file)
    spool = tmp_path / "spool"
    config = write_service_config(tmp_path / "service.yaml", spool, status_port=free_port(),
                                  dashboard={"viewer_url": VIEWER})
    artifacts = ARTIFACTS / "dashboard"
    shutil.rmtree(artifacts, ignore_errors=True)
    serve = ServeProcess(config, tmp_path / "serve.log")
    with serve:
        printed = re.search(r"operator's page: open (http://127\.0\.0\.1:\d+/)", serve.log_path.read_text())
        assert printed, serve.log_tail()
        base = printed.group(1).rstrip("/")
        sent = storescu(files, listener_port(config))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: journal_status(config)["processed"] == len(files), 90, 0.3,
                   lambda: f"the studies to be processed ({serve.log_tail()})")

        # One answer over plain HTTP first (the form as the page serves it): the third study's set held the card
        other_study, other_series = _uids(other_file)
        post_answer(base, other_study, other_series, "card:MODEL_06", "QA0")

        spec = {
            "baseUrl": base, "chromium": str(CHROMIUM), "userDataDir": str(tmp_path / "chromium-profile"),
            "timeoutMs": 20000, "decisionGroup": set_study,
            "review": {"series": review_series, "answer": "card:MODEL_05", "reviewer": "QA1",
                       "comment": "glioma protocol, brain MRI"},
            "screenshots": {name: [str(artifacts / f"{name}.png"), str(tmp_path / "shots" / f"{name}.png")]
                            for name in PAGES},
        }
        spec_path = tmp_path / "dashboard_spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        result = run_node("dashboard_e2e.mjs", str(spec_path), timeout=120)
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"dashboard_e2e.mjs gave no report ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        assert report["ok"], (f"failed at step '{report['step']}': {report.get('error')}\n"
                              f"page: {report.get('bodyText')}\n{serve.log_tail()}")
        assert not report["pageErrors"] and not report["failedResponses"], report

        # Overview: the counts the journal holds, a chart, and an uncalibrated service says so
        status = journal_status(config)
        overview = report["overview"]
        assert int(overview["received"]) == status["received"] == len(files)
        assert int(overview["processed"]) == status["processed"] == len(files)
        assert int(overview["failed"]) == 0 and int(overview["quarantined"]) == 0
        assert overview["chartHasBars"] == 1 and "uncalibrated" in overview["calibration"]
        assert overview["calibratedShare"].startswith(f"Outputs calibrated: 0 of {len(files)}")
        # No VLM configured: the header decided every series, no call made, nothing to disagree with
        assert (int(overview["vlmCalls"]), int(overview["seriesWithoutVlm"]), int(overview["disagreements"])) == \
            (0, len(files), 0)

        # Studies: every study sent, newest first, each with its outcome and the viewer link
        studies = {row["group"]: row for row in report["studies"]}
        assert set(studies) == {_uids(f)[0] for f in files}
        assert studies[review_study]["outcome"] == "review"
        assert studies[set_study]["outcome"] == "routed-set"
        assert studies[set_study]["viewer"] == VIEWER.format(study=set_study)
        assert "MODEL_01" in " ".join(studies[set_study]["cells"]) and "(uncalibrated)" in " ".join(
            studies[set_study]["cells"])
        assert report["filteredOutcomes"] and set(report["filteredOutcomes"]) == {"review"}

        # The decision page: three stages with candidates and probabilities, the viewer link
        decision = report["decision"]
        assert decision["stages"] == 3 and "brain CT scan" in decision["text"]
        assert decision["viewerLink"] == VIEWER.format(study=set_study)

        # The review queue: both cases waited; the answer recorded through the page leaves the queue
        assert {review_series, set_series} <= set(report["queueBefore"])
        after = report["afterReview"]
        assert after["flash"] == "Answer recorded."
        assert review_series not in after["queue"] and set_series in after["queue"]
        assert any("MODEL_05" in row and "QA1" in row for row in after["answered"])
        stored = journal_query(spool, "SELECT group_key, series_instance_uid, kind, card, reviewer, comment FROM reviews "
                                      "WHERE reviewer = 'QA1'")
        assert stored == [(review_study, review_series, "card", "MODEL_05", "QA1", "glioma protocol, brain MRI")]
        log = serve.log_path.read_text()
        assert f"event=review_recorded group={review_study} series={review_series} answer=card card=MODEL_05 " \
               "reviewer=QA1" in log
        assert "glioma protocol" not in log  # the comment is stored, never logged

        # Calibration health without a calibration: the reviewed set counted, its reliability drawn, no promise
        health = report["calibration"]
        assert health["verdict"] == "No drift detected." and health["reliability"] == 1
        assert all("no promise" in row for row in health["checks"])
        assert re.match(r"routed sets: the right card is in the set\s+1\s+1\s+1\.000", health["checks"][0])

        post_answer(base, set_study, set_series, "not-routable", "QA2")  # a second answer over HTTP

    # With the service stopped: `onevlm dashboard` shows the same spool, answers included
    dashboard = subprocess.Popen([*ONEVLM, "dashboard", "--config", str(config), "--port", "0"], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = dashboard.stdout.readline()
        url = re.search(r"operator's page: open (http://127\.0\.0\.1:\d+/)", line)
        assert url, line + dashboard.stdout.read(2000) if dashboard.poll() is not None else line
        with urllib.request.urlopen(url.group(1) + "review", timeout=30) as response:
            page = response.read().decode()
        assert page.count("<tr class=answered>") == 3 and "QA2" in page
    finally:
        stop_process(dashboard)

    # ... export the labels and fit a calibration on them
    labels = tmp_path / "labels.csv"
    exported = subprocess.run([*ONEVLM, "labels", "export", "--config", str(config), "-o", str(labels)],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
    assert exported.returncode == 0, exported.stderr
    assert "3 labelled input(s)" in exported.stdout
    rows = labels.read_text().splitlines()
    assert rows[0] == "path,modality,finding,card"
    by_path = {Path(line.split(",")[0]).name: line.split(",")[1:] for line in rows[1:]}
    review_sop = str(pydicom.dcmread(review_file, stop_before_pixels=True).SOPInstanceUID)
    set_sop = str(pydicom.dcmread(set_file, stop_before_pixels=True).SOPInstanceUID)
    other_sop = str(pydicom.dcmread(other_file, stop_before_pixels=True).SOPInstanceUID)
    assert by_path == {f"{review_sop}.dcm": ["brain MRI scan", "", "MODEL_05"], f"{set_sop}.dcm": ["", "", ""],
                       f"{other_sop}.dcm": ["brain MRI scan", "", "MODEL_06"]}
    calibration = tmp_path / "calibration.json"
    fitted = subprocess.run([*ONEVLM, "calibrate", "fit", str(labels), "-o", str(calibration)],
                            capture_output=True, text=True, timeout=180, cwd=REPO)
    assert fitted.returncode == 0, fitted.stderr
    assert json.loads(calibration.read_text())["calibration_id"].startswith("cal-")
    assert json.loads(calibration.read_text())["fitted"]["inputs"] == 3
    for name in PAGES:
        assert (artifacts / f"{name}.png").stat().st_size > 10_000
