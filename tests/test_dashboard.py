"""The operator's page without a browser: the drift check's arithmetic, the access-token rule over
real HTTP, review answers and their validation, and the labels export. Research use only."""

from __future__ import annotations

import csv
import http.client
import re
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from conftest import SAMPLES
from onevlm.calibration.selective import clopper_pearson_upper
from onevlm.dashboard.calibration_health import PromiseCheck, ReviewedCase, calibration_health
from onevlm.dashboard.study_index import SeriesCase
from onevlm.net.config import ConfigError, parse_config
from onevlm.net.review_answers import ReviewAnswer

TOKEN_ENV = "ONEVLM_TEST_DASHBOARD_TOKEN"
TOKEN = "s3cret-token-for-tests"


# --------------------------------------------------------------------------- drift arithmetic


def test_promise_check_matches_clopper_pearson_and_finds_the_tolerance_edge():
    check = PromiseCheck("x", n=100, hits=80, promised=0.9, delta=0.1)
    assert check.rate == 0.8
    assert check.upper_bound == pytest.approx(clopper_pearson_upper(80, 100, 0.1))
    assert check.broken  # the upper bound on the hit rate (0.851) is below the promised 0.9
    edge = check.lowest_consistent_rate
    k = round(edge * 100)
    # k hits still reach the promise, k - 1 do not: the tolerance is exactly the binomial edge
    assert clopper_pearson_upper(k, 100, 0.1) >= 0.9 > clopper_pearson_upper(k - 1, 100, 0.1)
    assert not PromiseCheck("x", n=100, hits=k, promised=0.9).broken
    assert PromiseCheck("x", n=100, hits=k - 1, promised=0.9).broken


def test_promise_check_few_cases_no_promise_and_bad_input():
    assert not PromiseCheck("x", n=3, hits=2, promised=0.9).broken  # 2 of 3 is within chance of 0.9
    assert PromiseCheck("x", n=3, hits=0, promised=0.9).broken  # 0 of 3 is not
    assert not PromiseCheck("x", n=0, hits=0, promised=0.9).broken
    assert PromiseCheck("x", n=0, hits=0, promised=0.9).lowest_consistent_rate is None
    uncalibrated = PromiseCheck("x", n=50, hits=0, promised=None)
    assert not uncalibrated.broken and uncalibrated.lowest_consistent_rate is None
    with pytest.raises(ValueError, match="hits"):
        PromiseCheck("x", n=2, hits=3, promised=0.9)
    with pytest.raises(ValueError, match="promised"):
        PromiseCheck("x", n=2, hits=1, promised=1.0)


def _case(outcome: str, cards: tuple[str, ...], series: str, confidence: float | None = 0.8) -> SeriesCase:
    return SeriesCase(group_key="1.2.3", study_instance_uid="1.2.3", series_instance_uid=series, dicom_modality="CT",
                      outcome=outcome, cards=cards, confidence=confidence, calibrated=True, modality="brain CT scan",
                      finding=None, reasons=(), candidates=cards, executions=(), instance_path=None, decision=None,
                      error=None)


def _answer(series: str, kind: str, card: str | None = None) -> ReviewAnswer:
    return ReviewAnswer("1.2.3", series, kind, card, "AB", "", 1.0)


def test_calibration_health_counts_hits_per_outcome_and_flags_drift():
    cal = "cal-000000000001"
    reviewed = [
        ReviewedCase(_case("routed-set", ("MODEL_01", "MODEL_02"), "1.1"), _answer("1.1", "card", "MODEL_02"), cal),
        ReviewedCase(_case("routed-set", ("MODEL_01", "MODEL_02"), "1.2"), _answer("1.2", "none-of-these"), cal),
        ReviewedCase(_case("routed", ("MODEL_03",), "1.3"), _answer("1.3", "card", "MODEL_04"), cal),
        ReviewedCase(_case("routed", ("MODEL_03",), "1.4"), _answer("1.4", "not-routable"), cal),
        ReviewedCase(_case("review", (), "1.5", None), _answer("1.5", "card", "MODEL_01"), cal),
        ReviewedCase(_case("routed", ("MODEL_03",), "1.6"), _answer("1.6", "card", "MODEL_03"), "cal-other"),
    ]
    health = calibration_health(reviewed, cal, alpha=0.1, delta=0.1, policy="sets")
    assert (health.routed_set.n, health.routed_set.hits) == (2, 1)
    assert (health.routed.n, health.routed.hits) == (2, 0)
    assert (health.combined.n, health.combined.hits) == (4, 1)
    assert health.other_calibration == 1
    assert health.combined.promised == pytest.approx(0.9)
    assert health.drift == (clopper_pearson_upper(1, 4, 0.1) < 0.9) and health.drift
    confidences, hits = health.reliability_pairs()
    assert len(confidences) == 5 and hits.count(True) == 2  # the review case has no confidence
    # uncalibrated: the same answers promise nothing, so no drift
    uncalibrated = calibration_health([ReviewedCase(r.case, r.answer, None) for r in reviewed], None, None, None, None)
    assert not uncalibrated.drift and uncalibrated.combined.n == 5 and uncalibrated.combined.promised is None


def test_review_answer_validation():
    with pytest.raises(ValueError, match="reviewer"):
        ReviewAnswer("1.2", "1.3", "card", "MODEL_01", "", "")
    with pytest.raises(ValueError, match="must be one of"):
        ReviewAnswer("1.2", "1.3", "maybe", None, "AB")
    with pytest.raises(ValueError, match="names no card"):
        ReviewAnswer("1.2", "1.3", "not-routable", "MODEL_01", "AB")
    with pytest.raises(ValueError, match="not a UID"):
        ReviewAnswer("x'; DROP", "1.3", "not-routable", None, "AB")


# --------------------------------------------------------------------------- configuration


def test_dashboard_configuration_rules(tmp_path, monkeypatch):
    base = {"spool_dir": str(tmp_path / "spool")}
    assert parse_config(base).dashboard.loopback
    with pytest.raises(ConfigError, match="dashboard.host.*not loopback.*token_env"):
        parse_config({**base, "dashboard": {"host": "0.0.0.0"}})
    with pytest.raises(ConfigError, match="environment variable ONEVLM_UNSET_VAR is not set"):
        parse_config({**base, "dashboard": {"host": "0.0.0.0", "token_env": "ONEVLM_UNSET_VAR"}})
    with pytest.raises(ConfigError, match="viewer_url"):
        parse_config({**base, "dashboard": {"viewer_url": "http://viewer/?study={uid}"}})
    with pytest.raises(ConfigError, match="show_patient_ids"):
        parse_config({**base, "dashboard": {"show_patient_ids": "yes"}})
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    # off loopback without TLS the token would cross the network in clear text: refused unless said so
    with pytest.raises(ConfigError, match="dashboard.host.*not loopback.*dashboard.tls.*insecure_http"):
        parse_config({**base, "dashboard": {"host": "0.0.0.0", "token_env": TOKEN_ENV}})
    with pytest.raises(ConfigError, match="dashboard.insecure_http"):
        parse_config({**base, "dashboard": {"host": "0.0.0.0", "token_env": TOKEN_ENV, "insecure_http": "true"}})
    with pytest.raises(ConfigError, match="dashboard.tls.private_key: is required"):
        parse_config({**base, "dashboard": {"tls": {"certificate": str(tmp_path)}}})
    with pytest.raises(ConfigError, match="dashboard.tls.certificate: .*does not exist"):
        parse_config({**base, "dashboard": {"tls": {"certificate": "nowhere.pem", "private_key": "nowhere.key"}}})
    config = parse_config({**base, "dashboard": {"host": "0.0.0.0", "token_env": TOKEN_ENV, "insecure_http": True}})
    assert not config.dashboard.loopback and config.dashboard.token() == TOKEN
    assert parse_config({**base, "dashboard": {"host": "::1"}}).dashboard.loopback


# --------------------------------------------------------------------------- HTTP


def process_samples(root: Path, names, router=None) -> dict[str, tuple[str, str]]:
    """Store the samples in a spool under ``root`` and process each as the service does: {name: (group, series)}.

    ``router`` None: the service's default router for a configuration without a VLM (``build_router``).
    """
    from onevlm.net.journal import Journal
    from onevlm.net.processor import GroupProcessor
    from onevlm.net.service import build_router
    from onevlm.net.spool import Spool

    config = parse_config({"spool_dir": str(root / "spool")})
    spool, journal = Spool(config.spool_dir), Journal(config.journal_path)
    router, cards = build_router(config) if router is None else (router, router.cards)
    groups = {}
    for name in names:
        stored = spool.store((SAMPLES / name).read_bytes())
        journal.record_instance(stored.sop_instance_uid, stored.group_key, stored.path, stored.sop_class_uid, "TEST")
        journal.set_group(stored.group_key, "queued")
        GroupProcessor(router, cards, spool, journal, ()).process(stored.group_key)
        groups[name] = (stored.group_key, stored.series_instance_uid)
    journal.close()
    return groups


@pytest.fixture(scope="module")
def processed_spool(tmp_path_factory):
    """A spool with two processed studies (a review case and a routed set), as the service leaves it."""
    root = tmp_path_factory.mktemp("dashboard")
    return root / "spool", process_samples(root, ("mr_small_no_bodypart.dcm", "ct_head_routine_brain.dcm"))


class Page:
    """The dashboard over real HTTP on loopback (whatever host its configuration names)."""

    def __init__(self, spool: Path, dashboard: dict) -> None:
        from onevlm.cards.repository import CardRepository, default_cards_dir
        from onevlm.dashboard.server import DashboardApp
        from onevlm.dashboard.web import make_page_server
        from onevlm.net.journal import Journal

        self.config = parse_config({"spool_dir": str(spool), "dashboard": dashboard})
        self.journal = Journal(self.config.journal_path)
        self.app = DashboardApp(self.config, self.journal, CardRepository.load(default_cards_dir()), None,
                                self.journal.status)
        self.server = make_page_server(self.app, "127.0.0.1", 0)  # bound to loopback whatever the config says
        self.server.start()
        self.port = self.server.port

    def request(self, method: str, path: str, form: dict | None = None, headers: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = urlencode(form).encode() if form is not None else None
        all_headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        data = response.read().decode()
        connection.close()
        return response.status, response.headers, data  # names case-insensitive

    def close(self) -> None:
        self.server.shutdown()
        self.journal.close()


@pytest.fixture
def page_factory():
    pages = []

    def make(spool, dashboard):
        pages.append(Page(spool, dashboard))
        return pages[-1]

    yield make
    for page in pages:
        page.close()


def test_token_required_off_loopback(processed_spool, page_factory, monkeypatch):
    spool, groups = processed_spool
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    page = page_factory(spool, {"host": "0.0.0.0", "token_env": TOKEN_ENV, "insecure_http": True})
    status, headers, _ = page.request("GET", "/studies")
    assert status == 303 and headers["Location"].startswith("/login")
    assert page.request("GET", "/status")[0] == 401
    assert page.request("GET", "/status", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, _, body = page.request("GET", "/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and '"processed": 2' in body
    key = page.app.form_key
    group, series = groups["mr_small_no_bodypart.dcm"]
    answer = {"form_key": key, "group": group, "series": series, "answer": "not-routable", "reviewer": "AB"}
    status, _, body = page.request("POST", "/review", answer)
    assert status == 401 and "access token" in body
    # the login form sets a cookie that opens the pages
    assert page.request("POST", "/login", {"form_key": key, "token": "nope", "next": "/"})[0] == 401
    status, headers, _ = page.request("POST", "/login", {"form_key": key, "token": TOKEN, "next": "/studies"})
    assert status == 303 and headers["Location"] == "/studies"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    status, _, body = page.request("GET", "/studies", headers={"Cookie": cookie})
    assert status == 200 and group in body
    assert page.request("POST", "/review", answer, headers={"Cookie": cookie})[0] == 303


def test_token_needed_for_answers_on_loopback_when_configured(processed_spool, page_factory, monkeypatch):
    spool, groups = processed_spool
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    page = page_factory(spool, {"token_env": TOKEN_ENV})
    assert page.request("GET", "/review")[0] == 200  # reading on loopback is open
    group, series = groups["ct_head_routine_brain.dcm"]
    answer = {"form_key": page.app.form_key, "group": group, "series": series, "answer": "card:MODEL_01",
              "reviewer": "CD"}
    assert page.request("POST", "/review", answer)[0] == 401
    assert page.request("POST", "/review", answer, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 303


def test_bad_requests_get_clear_errors(processed_spool, page_factory):
    spool, groups = processed_spool
    page = page_factory(spool, {})
    group, series = groups["mr_small_no_bodypart.dcm"]
    good = {"form_key": page.app.form_key, "group": group, "series": series, "answer": "card:MODEL_05",
            "reviewer": "EF", "comment": "patient-free comment", "next": "/review"}
    cases = [
        ({**good, "form_key": "forged"}, 403, "another site"),
        ({**good, "group": "1.2.3.4"}, 404, "no routed series"),
        ({**good, "group": "../etc"}, 400, "is not a study or series UID"),
        ({**good, "series": "9.9"}, 404, "no routed series"),
        ({**good, "answer": "card:MODEL_999"}, 400, "is not a card"),
        ({**good, "answer": "maybe"}, 400, "must be one of"),
        ({**good, "reviewer": ""}, 400, "reviewer"),
        ({**good, "comment": "x" * 2001}, 400, "longer than"),
    ]
    for form, status, message in cases:
        got, _, body = page.request("POST", "/review", form)
        assert got == status and message in body, (form, got, body[-400:])
        assert "Traceback" not in body
    for path, status, message in (("/studies?outcome=bogus", 400, "unknown outcome"), ("/studies/1.2.3", 404, "no study"),
                                  ("/studies/abc", 400, "not a study"), ("/nowhere", 404, "no page"),
                                  ("/studies?limit=0", 400, "limit")):
        got, _, body = page.request("GET", path)
        assert got == status and message in body, (path, got)
    status, headers, _ = page.request("POST", "/review", {**good, "next": "//evil.example/"})
    assert status == 303 and headers["Location"].startswith("/review?recorded=1")  # never off-site
    latest = page.journal.latest_reviews()[(group, series)]
    assert (latest.kind, latest.card, latest.reviewer, latest.comment) == ("card", "MODEL_05", "EF",
                                                                          "patient-free comment")


def test_pages_render_outcomes_definitions_and_no_patient_data(processed_spool, page_factory):
    import pydicom

    spool, groups = processed_spool
    page = page_factory(spool, {"viewer_url": "http://viewer.example/viewer?StudyInstanceUIDs={study}"})
    header = pydicom.dcmread(SAMPLES / "ct_head_routine_brain.dcm", stop_before_pixels=True)
    started = time.perf_counter()
    bodies = {path: page.request("GET", path) for path in ("/", "/studies", "/review", "/calibration",
                                                           f"/studies/{groups['ct_head_routine_brain.dcm'][0]}")}
    assert time.perf_counter() - started < 10
    assert all(status == 200 for status, _, _ in bodies.values())
    studies = bodies["/studies"][2]
    assert re.search(r'data-outcome="routed-set"', studies) and re.search(r'data-outcome="review"', studies)
    assert "(uncalibrated)" in studies and 'href="/#definitions"' in studies
    assert f"StudyInstanceUIDs={header.StudyInstanceUID}" in studies
    assert 'id=definitions' in bodies["/"][2] and "<svg" in bodies["/"][2]
    decision = bodies[f"/studies/{groups['ct_head_routine_brain.dcm'][0]}"][2]
    assert "MODEL_01" in decision and "table class=stages" in decision
    for text in bodies.values():
        assert str(header.PatientID) not in text and str(header.PatientName) not in text


def test_labels_export_writes_what_calibrate_reads(processed_spool, tmp_path):
    from onevlm.cards.repository import CardRepository, default_cards_dir
    from onevlm.dashboard.labels_export import label_rows, write_labels
    from onevlm.dashboard.study_index import StudyIndex
    from onevlm.router.evaluation import read_labels

    spool, groups = processed_spool
    mr_group, mr_series = groups["mr_small_no_bodypart.dcm"]
    ct_group, ct_series = groups["ct_head_routine_brain.dcm"]
    answers = {(mr_group, mr_series): ReviewAnswer(mr_group, mr_series, "card", "MODEL_05", "AB"),
               (ct_group, ct_series): ReviewAnswer(ct_group, ct_series, "none-of-these", None, "AB"),
               ("1.2.3", "1.2.3.4"): ReviewAnswer("1.2.3", "1.2.3.4", "not-routable", None, "AB")}
    export = label_rows(StudyIndex(spool), answers, CardRepository.load(default_cards_dir()))
    assert (len(export.rows), export.none_of_these, export.unknown_series, export.missing_file) == (1, 1, 1, 0)
    path = write_labels(export, tmp_path / "labels.csv")
    rows = read_labels(path)
    assert rows[0].modality == "brain MRI scan" and rows[0].card == "MODEL_05" and rows[0].path.is_file()
    assert rows[0].path.parent.name == mr_group
    with path.open() as handle:
        assert next(csv.reader(handle)) == ["path", "modality", "finding", "card"]


def test_drift_warning_when_a_calibration_in_force_misses_on_reviewed_cases(processed_spool, tmp_path, page_factory):
    """Both studies as a calibrated service leaves them (routed sets under one calibration), both answered
    'none of these': 0 of 2 is below the promised 0.9 beyond chance, so every page warns."""
    import json
    import shutil

    from onevlm.calibration.site import SiteCalibration
    from onevlm.net.journal import Journal

    spool, groups = processed_spool
    copy = tmp_path / "spool"
    shutil.copytree(spool, copy)
    calibration = SiteCalibration(risk=0.1, delta=0.1, identity={"backend": "embedded"})
    for group, _ in groups.values():
        folder = copy / "results" / group
        detail = json.loads((folder / "series.json").read_text())
        for entry in detail["entries"]:
            entry.update(outcome="routed-set", cards=["MODEL_01", "MODEL_02"], calibrated=True, confidence=0.95)
        (folder / "series.json").write_text(json.dumps(detail))
        metadata = json.loads((folder / "metadata.json").read_text())
        metadata.update(outcome="routed-set", calibrated=True, calibration_id=calibration.calibration_id)
        (folder / "metadata.json").write_text(json.dumps(metadata))
    journal = Journal(copy / "journal.sqlite")
    for group, series in groups.values():
        journal.record_review(ReviewAnswer(group, series, "none-of-these", None, "AB"))
    journal.close()
    page = page_factory(copy, {})
    page.app.calibration = calibration
    status, _, body = page.request("GET", "/calibration")
    assert status == 200 and 'id="drift-warning"' in body and "BROKEN (drift)" in body
    assert "id=reliability><svg" in body and calibration.calibration_id in body
    assert f"{clopper_pearson_upper(0, 2, 0.1):.3f}" in body
    assert 'id="drift-warning"' in page.request("GET", "/")[2]
    # one of the two answered right: 1 of 2 is within chance of 0.9, the warning goes
    journal = Journal(copy / "journal.sqlite")
    group, series = groups["ct_head_routine_brain.dcm"]
    journal.record_review(ReviewAnswer(group, series, "card", "MODEL_02", "AB"))
    journal.close()
    body = page.request("GET", "/calibration")[2]
    assert 'id="drift-warning"' not in body and "kept (within tolerance)" in body


# --------------------------------------------------------------------------- the hybrid router's figures

DISAGREE = "ct_head_512_j2k.dcm"  # only Body Part backs brain CT; the image looks like a chest CT: review
HEADER_ONLY = "cr_extremity_j2k.dcm"  # the header certifies Other: stopped, no VLM call
PIXELS_ASKED = "mr_small_no_bodypart.dcm"  # no body part: the pixels asked (a flat answer), review, no disagreement
DISAGREEMENT_TEXT = ("stage 1: header says brain CT scan (Modality CT, BodyPartExamined HEAD); the image looks like "
                     "chest CT scan (p 0.95)")


def _records(spool: Path, group: str) -> list[dict]:
    import json

    lines = (spool / "results" / group / "decisions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def hybrid_spool(tmp_path_factory):
    """Three studies routed by the hybrid router with scripted pixels, as the service leaves them."""
    import pydicom
    from scripted_pixels import FixedPixels

    from onevlm.backends import create_backend
    from onevlm.cards.repository import CardRepository, default_cards_dir
    from onevlm.router.pipeline import Router

    cards = CardRepository.load(default_cards_dir())
    spooled = f"{pydicom.dcmread(SAMPLES / DISAGREE, stop_before_pixels=True).SOPInstanceUID}.dcm"  # the spool's name
    pixels = FixedPixels({spooled: {1: {"chest CT scan": 0.95, "brain CT scan": 0.01}}})
    root = tmp_path_factory.mktemp("dashboard-hybrid")
    groups = process_samples(root, (DISAGREE, HEADER_ONLY, PIXELS_ASKED),
                             Router(cards, create_backend("hybrid", cards, pixel_backend=pixels)))
    return root / "spool", groups, pixels


def _study_rows(body: str) -> dict[str, str]:
    return dict(re.findall(r'<tr class="study" data-group="([0-9.]+)" data-outcome="[^"]*" '
                           r'data-disagreement="([01])">', body))


def test_hybrid_records_behind_the_fixture(hybrid_spool):
    """The premises of the page tests, read from the decision records themselves."""
    spool, groups, pixels = hybrid_spool
    (disagree,), (header_only,), (asked,) = (_records(spool, groups[name][0])
                                             for name in (DISAGREE, HEADER_ONLY, PIXELS_ASKED))
    assert disagree["disagreement"] == DISAGREEMENT_TEXT and disagree["route"]["outcome"] == "review"
    assert (header_only["vlm_calls"], header_only["disagreement"], header_only["route"]["outcome"]) == (0, None,
                                                                                                        "stopped")
    assert asked["vlm_calls"] >= 1 and asked["disagreement"] is None and asked["route"]["outcome"] == "review"
    assert disagree["vlm_calls"] + asked["vlm_calls"] == len(pixels.calls)


def test_disagreement_filter_lists_exactly_the_disagreeing_studies(hybrid_spool, page_factory):
    spool, groups, _ = hybrid_spool
    page = page_factory(spool, {})
    status, _, body = page.request("GET", "/studies")
    assert status == 200 and _study_rows(body) == {groups[DISAGREE][0]: "1", groups[HEADER_ONLY][0]: "0",
                                                   groups[PIXELS_ASKED][0]: "0"}
    assert 'id=disagreement-filter>' in body  # offered, not checked
    status, _, body = page.request("GET", "/studies?disagreement=1")
    assert status == 200 and _study_rows(body) == {groups[DISAGREE][0]: "1"}
    assert "id=disagreement-filter checked" in body
    assert _study_rows(page.request("GET", "/studies?outcome=review&disagreement=1")[2]) == {groups[DISAGREE][0]: "1"}
    assert _study_rows(page.request("GET", "/studies?outcome=stopped&disagreement=1")[2]) == {}
    got, _, body = page.request("GET", "/studies?disagreement=yes")
    assert got == 400 and "disagreement must be 1" in body


def test_decision_page_shows_sources_reasons_vlm_calls_and_the_disagreement(hybrid_spool, page_factory):
    from markupsafe import escape  # what the templates escape with

    spool, groups, _ = hybrid_spool
    page = page_factory(spool, {})
    body = page.request("GET", f"/studies/{groups[DISAGREE][0]}")[2]
    (record,) = _records(spool, groups[DISAGREE][0])
    note = re.search(r'<p class=disagreement data-series="([0-9.]+)"><strong>Header and image disagree</strong>: '
                     r'(.*?)\. A wrong header', body)
    assert note and note.groups() == (groups[DISAGREE][1], escape(DISAGREEMENT_TEXT))
    assert "VLM calls for this series: 1." in body
    stages = re.findall(r"<tr class=stage>.*?</tr>", body, re.S)
    assert len(stages) == len(record["stages"]) == 3
    for row, stage in zip(stages, record["stages"]):
        consultation = stage["consultation"]
        assert f"<b class=consulted>{' + '.join(stage['consulted']) or 'none (text only)'}</b>" in row
        assert f"<span class=reason>{escape(consultation['reason'])}</span>" in row
        assert f"VLM calls {consultation['vlm_calls']}" in row
    assert "header + pixels" in stages[0] and "header: brain CT scan 0.911" in stages[0]
    assert "pixels: chest CT scan 0.950" in stages[0] and "margin 0.94 &gt; 0.5, action review" in stages[0]
    assert "none (text only)" in stages[2]
    body = page.request("GET", f"/studies/{groups[HEADER_ONLY][0]}")[2]
    assert "VLM calls for this series: 0 (the header alone decided)." in body
    assert "<b class=consulted>header</b>; VLM calls 0" in body and "the header certifies Other" in body
    assert "class=disagreement" not in body


def test_review_queue_marks_disagreement_cases(hybrid_spool, page_factory):
    spool, groups, _ = hybrid_spool
    page = page_factory(spool, {})
    body = page.request("GET", "/review")[2]
    marks = dict(re.findall(r'<tr class="case[^"]*" data-series="([0-9.]+)" data-disagreement="([01])">', body))
    assert marks == {groups[DISAGREE][1]: "1", groups[PIXELS_ASKED][1]: "0"}  # the stopped study waits for no one
    assert '<tr class="case disagreement-case"' in body and "fix at the source" in body
    assert re.search(r"id=queue-disagreements>.*?: 1 of the cases", body, re.S)


def test_status_and_overview_count_vlm_calls_header_only_series_and_disagreements(hybrid_spool, page_factory):
    import json

    spool, groups, pixels = hybrid_spool
    page = page_factory(spool, {})
    status, headers, body = page.request("GET", "/status")
    counts = json.loads(body)
    records = [r for group, _ in groups.values() for r in _records(spool, group)]
    expected = {"vlm_calls": sum(r["vlm_calls"] for r in records), "series_decided": 3,
                "series_without_vlm": sum(r["vlm_calls"] == 0 for r in records),
                "disagreements": sum(bool(r["disagreement"]) for r in records)}
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert {k: counts[k] for k in expected} == expected == {"vlm_calls": len(pixels.calls), "series_decided": 3,
                                                            "series_without_vlm": 1, "disagreements": 1}
    assert counts["processed"] == 3  # the journal's counts are still there
    overview = page.request("GET", "/")[2]
    for key, value in expected.items():
        assert f'id="count-{key}">{value}</td>' in overview
    assert 'href="/studies?disagreement=1"' in overview


def test_disagreement_words_are_escaped_and_old_records_tolerated(hybrid_spool, tmp_path, page_factory):
    """A hostile disagreement text is shown as text; records from before the hybrid router (no consultation,
    no VLM count) render as 'not recorded' and count as unknown."""
    import json
    import shutil

    spool, groups, _ = hybrid_spool
    copy = tmp_path / "spool"
    shutil.copytree(spool, copy)
    hostile = '<script>alert("x")</script> & header'
    for name, group_series in groups.items():
        log = copy / "results" / group_series[0] / "decisions.jsonl"
        records = _records(copy, group_series[0])
        for record in records:
            if name == DISAGREE:
                record["disagreement"] = record["route"]["disagreement"] = hostile
            else:
                record.pop("vlm_calls")
                record.pop("disagreement")
                for stage in record["stages"]:
                    stage.pop("consultation")
                    stage["consulted"] = None
                for stage in record["route"]["stages"]:
                    for key in ("consulted", "consult_reason", "vlm_calls"):
                        stage.pop(key, None)
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
        detail = copy / "results" / group_series[0] / "series.json"
        entries = json.loads(detail.read_text())
        for entry in entries["entries"]:  # the same figures as series.json keys, where the service writes them
            for key in ("vlm_calls", "consulted", "disagreement"):
                entry.pop(key, None)
        detail.write_text(json.dumps(entries))
    # records from before the counts existed come with a journal from before it kept them: migrated, the
    # service fills the journal's series figures from these folders once on start
    from onevlm.dashboard.study_index import BACKFILL_CURSOR, backfill_series_figures
    from onevlm.net.journal import Journal

    journal = Journal(copy / "journal.sqlite")
    try:
        with journal._tx() as db:
            db.execute("DELETE FROM series_figures")
        journal.set_cursor(BACKFILL_CURSOR, 0)
        assert backfill_series_figures(journal, copy) == len(groups)
    finally:
        journal.close()
    page = page_factory(copy, {})
    for path in ("/studies", "/review", f"/studies/{groups[DISAGREE][0]}", "/studies?disagreement=1"):
        body = page.request("GET", path)[2]
        assert "<script>" not in body and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; header" in body
    old = page.request("GET", f"/studies/{groups[HEADER_ONLY][0]}")[2]
    assert "not recorded" in old and 'VLM calls for this series: <span class="muted">—</span>' in old
    counts = json.loads(page.request("GET", "/status")[2])
    assert (counts["vlm_calls"], counts["series_without_vlm"], counts["disagreements"]) == (1, 0, 1)


def test_the_study_index_keeps_a_bounded_number_of_groups_and_drops_forgotten_ones(processed_spool, tmp_path):
    """A year of results must not live in memory: the index caches the most recently read groups only, and a
    group retention forgot (its folder gone) leaves the cache."""
    import shutil

    from onevlm.dashboard.study_index import StudyIndex

    spool, groups = processed_spool
    copy = tmp_path / "spool"
    shutil.copytree(spool, copy)
    keys = [group for group, _ in groups.values()]
    for n in range(3):  # more groups than the cache holds: copies of one result under new keys
        shutil.copytree(copy / "results" / keys[0], copy / "results" / f"1.2.999.{n}")
    index = StudyIndex(copy, cache_groups=2)
    all_keys = index.group_keys()
    assert len(all_keys) == 5
    for key in all_keys:
        assert index.group(key) is not None
        assert len(index) <= 2
    assert len(index) == 2
    newest = all_keys[-1]
    shutil.rmtree(copy / "results" / newest)
    assert index.group(newest) is None and len(index) == 1
    with pytest.raises(ValueError, match="at least 1"):
        StudyIndex(copy, cache_groups=0)
