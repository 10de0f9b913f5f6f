"""The operator's pages rendered from their Jinja2 templates, without an HTTP server: hostile text in every
free-text field comes out escaped, the templates are the package's own, probabilities keep their label and
definition link. Research use only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from markupsafe import escape

from onevlm.dashboard import pages
from onevlm.dashboard.calibration_health import CalibrationHealth, PromiseCheck, ReviewedCase, calibration_health
from onevlm.dashboard.study_index import GroupResult, SeriesCase
from onevlm.net.journal import DestinationHealth, GroupRow
from onevlm.net.review_answers import ReviewAnswer

HOSTILE = "<script>alert(1)</script>\"'&"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&#39;&amp;"
SVG = '<svg xmlns="http://www.w3.org/2000/svg" id=chart><rect width="1" height="1"/></svg>'
# the definitions as they appear in a title attribute
ROUTE = str(escape(pages.ROUTE_CONFIDENCE))  # autoescape is markupsafe
STAGE = str(escape(pages.STAGE_PROBABILITY))
TEMPLATES = {"layout.html", "macros.html", "error.html", "login.html", "overview.html", "studies.html",
             "decision.html", "review.html", "calibration.html"}


def unchecked(cls, **fields):
    """A frozen dataclass built past its validation: a page must escape what a stored record holds anyway."""
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


def hostile_answer(series: str, kind: str = "card") -> ReviewAnswer:
    return unchecked(ReviewAnswer, group_key="1.2.3", series_instance_uid=series, kind=kind,
                     card="CARD" + HOSTILE if kind == "card" else None, reviewer="R" + HOSTILE,
                     comment="comment" + HOSTILE, recorded_at=1.7e9)


def hostile_decision() -> dict:
    return {
        "stages": [
            {"stage": 1, "name": "modality" + HOSTILE, "chosen": "chosen" + HOSTILE, "confidence": 0.9,
             "candidates": [{"answer": "answer" + HOSTILE, "p": 0.9}],
             "evidence": {"method": "method" + HOSTILE, "PatientComments": "quoted" + HOSTILE, "logits": [1.0]},
             "justification": "justification" + HOSTILE,
             "consultation": {"consulted": ["header", "src" + HOSTILE], "reason": "reason" + HOSTILE,
                              "vlm_calls": 1, "sources": {"header" + HOSTILE: {"top" + HOSTILE: 0.911}},
                              "disagreement": {"header_answer": "ha" + HOSTILE, "pixels_answer": "pa" + HOSTILE,
                                               "margin": 0.94, "threshold": 0.5, "action": "act" + HOSTILE}}},
            {"stage": "stage" + HOSTILE, "name": "finding", "chosen": None, "confidence": None},
        ],
        "route": {"stages": [{"stage": 1, "p": 0.8, "calibrated": {"cal" + HOSTILE: 0.8}, "tie": True,
                              "set": "set" + HOSTILE, "consult_reason": "not shown", "vlm_calls": 1},
                             {"stage": "stage" + HOSTILE, "consulted": ["header"], "consult_reason": "why" + HOSTILE,
                              "vlm_calls": 0}]},
    }


def hostile_case(index: int = 1, disagreement: bool = True) -> SeriesCase:
    return SeriesCase(
        group_key=f"1.2.3.{index}", study_instance_uid=f"1.2.3.{index}", series_instance_uid="series" + HOSTILE,
        dicom_modality="mod" + HOSTILE, outcome="review", cards=("card" + HOSTILE,), confidence=0.5, calibrated=False,
        modality="modality" + HOSTILE, finding="finding" + HOSTILE, reasons=("reason" + HOSTILE,),
        candidates=("cand" + HOSTILE,),
        executions=({"card_id": "exec" + HOSTILE, "status": "done" + HOSTILE, "summary": "sum" + HOSTILE},),
        instance_path=None, decision=hostile_decision(), error="error" + HOSTILE, vlm_calls=1,
        disagreement="disagree" + HOSTILE if disagreement else None)


def hostile_group() -> GroupRow:
    return unchecked(GroupRow, group_key="group" + HOSTILE, status="status" + HOSTILE, received=2,
                     first_received=1.7e9, last_received=1.7e9, updated_at=1.7e9, error="gerror" + HOSTILE)


def hostile_result(cases) -> GroupResult:
    return GroupResult(group_key="group" + HOSTILE, outcome="outcome" + HOSTILE, cards=("card" + HOSTILE,),
                       confidence=0.4, calibrated=True, calibration_id="cal" + HOSTILE, series=tuple(cases),
                       written_at=1.7e9)


def hostile_health() -> CalibrationHealth:
    return unchecked(CalibrationHealth, calibration_id="cal" + HOSTILE, policy="policy" + HOSTILE, alpha=0.1,
                     delta=0.1, routed_set=PromiseCheck("sets" + HOSTILE, 4, 1, 0.9),
                     routed=PromiseCheck("routed" + HOSTILE, 0, 0, 0.9),
                     combined=PromiseCheck("all" + HOSTILE, 4, 1, 0.9), reviewed=(), other_calibration=2)


def every_page() -> dict[str, str]:
    """Every page, with hostile text wherever a free-text value enters it."""
    cases = [hostile_case(1), hostile_case(2, disagreement=False)]
    result = hostile_result(cases)
    calibration = pages.CalibrationInForce("cal" + HOSTILE, "fitted" + HOSTILE, 0.1, 0.1, "policy" + HOSTILE,
                                           "file" + HOSTILE)
    status = {"received": "received" + HOSTILE, "groups": {"queued": "queued" + HOSTILE},
              "disagreements": "dis" + HOSTILE}
    destinations = [DestinationHealth("dest" + HOSTILE, {"failed": 1}, "last" + HOSTILE, 1.7e9)]
    row = pages.StudyRow(hostile_group(), result, {"sent" + HOSTILE: 1}, ("pid" + HOSTILE, "acc" + HOSTILE))
    answers = {cases[0].series_instance_uid: hostile_answer(cases[0].series_instance_uid)}
    history = [hostile_answer("1.2.3.4"), hostile_answer("1.2.3.5", "none-of-these")]
    card_ids = ["MODEL_01", "other" + HOSTILE]
    return {
        "error": pages.error_page(404, "message" + HOSTILE),
        "login": pages.login_page("key" + HOSTILE, "/next" + HOSTILE, "wrong" + HOSTILE),
        "overview": pages.overview_page(status, destinations, ["idle" + HOSTILE], SVG, calibration, (1, 2), True),
        "studies": pages.studies_page([row], "outcome" + HOSTILE, ["outcome" + HOSTILE], True,
                                      "http://viewer/?s={study}&x=" + HOSTILE, True),
        "decision": pages.decision_page(hostile_group(), result, answers, history, card_ids, "key" + HOSTILE,
                                        "http://viewer/?s={study}" + HOSTILE, True, ("pid" + HOSTILE, "acc" + HOSTILE),
                                        "flash" + HOSTILE),
        "review": pages.review_page(cases, [(cases[0], answers[cases[0].series_instance_uid])], card_ids,
                                    "key" + HOSTILE, "flash" + HOSTILE, 10),
        "calibration": pages.calibration_page(hostile_health(), SVG),
    }


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return every_page()


# Per page, fields whose hostile value must appear escaped (each prefix is unique to one field).
EXPECTED = {
    "error": ["message"],
    "login": ["key", "/next", "wrong"],
    "overview": ["received", "queued", "dis", "dest", "last", "idle", "cal", "fitted", "policy", "file"],
    "studies": ["group", "outcome", "card", "exec", "sent", "pid", "acc", "disagree", "http://viewer/?s=1.2.3.1&amp;x="],
    "decision": ["status", "gerror", "pid", "acc", "flash", "series", "mod", "modality", "finding", "reason", "error",
                 "exec", "sum", "disagree", "card", "cand", "other", "key", "R", "comment", "CARD", "chosen",
                 "method", "quoted", "justification", "src", "header", "top", "ha", "pa", "act", "cal", "set", "why",
                 "stage", "http://viewer/?s=1.2.3.1"],
    "review": ["series", "mod", "card", "reason", "disagree", "cand", "other", "key", "flash", "R", "CARD"],
    "calibration": ["cal", "policy", "sets", "routed", "all"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_text_comes_out_escaped(rendered, name):
    body = rendered[name]
    assert type(body) is str
    assert "<script" not in body.lower()
    for field in EXPECTED[name]:
        assert field + ESCAPED in body, f"{name}: {field!r} is missing or not escaped"
    # nothing in the page was escaped twice
    assert "&amp;lt;" not in body and "&amp;quot;" not in body


def test_stage_name_is_escaped_and_the_stage_rows_keep_their_markup(rendered):
    body = rendered["decision"]
    assert "<td>stage" + ESCAPED + " finding</td>" in body
    rows = re.findall(r"<tr class=stage>.*?</tr>", body, re.S)
    assert len(rows) == 4  # two stages for each of the two series
    assert "table class=stages" in body
    assert "<b class=consulted>header + src" + ESCAPED + "</b>; VLM calls 1" in rows[0]
    assert "<span class=reason>reason" + ESCAPED + "</span>" in rows[0]
    assert "margin 0.94 &gt; 0.5, action act" + ESCAPED in rows[0]
    assert "header" + ESCAPED + ": top" + ESCAPED + " 0.911" in rows[0]
    # header text quoted as evidence shows only with show_all; the logits never do
    assert "<b>PatientComments</b>" in rows[0] and "logits" not in body
    safe = pages.stage_table(hostile_case(), False)
    assert "PatientComments" not in safe and "<b>method</b>: method" + ESCAPED in safe
    assert "stage" + ESCAPED in safe and "<script" not in safe


def test_templates_come_from_the_package_folder():
    env = pages.environment()
    assert env is pages.environment()  # one environment, made once
    assert env.autoescape is True
    assert TEMPLATES <= set(env.list_templates())
    folder = Path(pages.__file__).parent / "templates"
    for name in TEMPLATES:
        assert Path(env.get_template(name).filename).resolve() == (folder / name).resolve()
    from jinja2 import StrictUndefined, UndefinedError

    assert env.undefined is StrictUndefined
    with pytest.raises(UndefinedError):  # a value the template needs and nobody passed is an error, not blank
        env.get_template("error.html").render(title="404")


def test_importing_pages_does_not_import_jinja2():
    code = "import sys, onevlm.dashboard.pages; print('jinja2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_probabilities_keep_their_calibration_label_and_definition_link():
    calibrated = pages.probability(0.91234, True)
    assert calibrated == (f'<span class="p" title="{ROUTE}">0.912 <a href="/#definitions" '
                          'class="calibrated">(calibrated)</a></span>')
    uncalibrated = pages.probability(0.5, False, pages.STAGE_PROBABILITY)
    assert 'class="uncalibrated">(uncalibrated)</a>' in uncalibrated
    assert f'title="{STAGE}"' in uncalibrated and 'href="/#definitions"' in uncalibrated
    assert pages.probability(None, True) == '<span class="muted">—</span>'
    case = hostile_case()
    body = pages.review_page([case], [], ["MODEL_01"], "key", None, 10)
    assert '0.500 <a href="/#definitions" class="uncalibrated">(uncalibrated)</a>' in body
    decision = pages.decision_page(hostile_group(), hostile_result([case]), {}, [], [], "k", None, False, None, None)
    # the stage's calibrated probability, with the stage definition; route confidence with its own
    assert f'<span class="p" title="{STAGE}">0.800 <a href="/#definitions" ' \
           'class="calibrated">(calibrated)</a>' in decision
    assert f'title="{ROUTE}">0.500' in decision
    overview = pages.overview_page({}, [], [], SVG, pages.CalibrationInForce(None, None, None, None, None, None),
                                   (0, 0), False)
    assert "id=definitions" in overview and f"<p>{ROUTE}</p>" in overview


def test_charts_are_the_only_markup_passed_through(rendered):
    assert "<div id=hourly>" + SVG + "</div>" in rendered["overview"]
    assert "id=reliability>" + SVG + "</div>" in rendered["calibration"]
    assert f"<style>{pages.CSS}</style>" in rendered["error"]
    assert 'id="drift-warning"' in rendered["overview"] and 'id="drift-warning"' in rendered["calibration"]
    assert "Research use only: not for clinical use" in rendered["error"]


def test_the_markup_the_other_tests_and_the_browser_read():
    cases = [hostile_case(1), hostile_case(2, disagreement=False)]
    answer = ReviewAnswer("1.2.3", "1.2.3.9", "card", "MODEL_01", "AB", "", 1.7e9)
    review = pages.review_page(cases, [(cases[1], answer)], ["MODEL_01"], "key-1", "Answer recorded.", 10)
    assert re.findall(r'<tr class="case[^"]*" data-series="[^"]*" data-disagreement="([01])">', review) == ["1", "0"]
    assert '<tr class="case disagreement-case"' in review and review.count("<tr class=answered>") == 1
    assert re.search(r"id=queue-disagreements>.*?: 1 of the cases", review, re.S)
    assert 'name=form_key value="key-1"' in review and '<p class="flash" id="flash">Answer recorded.</p>' in review
    for field in ("group", "series", "next", "answer", "reviewer", "comment"):
        assert f"name={field} " in review or f"name={field}>" in review
    result = hostile_result(cases)
    rows = [pages.StudyRow(GroupRow("1.2.3.1", "done", 1, 1.7e9, 1.7e9, 1.7e9, None), result, {}),
            pages.StudyRow(GroupRow("1.2.3.2", "done", 1, 1.7e9, 1.7e9, 1.7e9, None), None, {})]
    studies = pages.studies_page(rows, None, ["review"], False, None)
    assert '<tr class="study" data-group="1.2.3.1" data-outcome="outcome' + ESCAPED + '" data-disagreement="1">' \
           in studies
    assert '<tr class="study" data-group="1.2.3.2" data-outcome="no result" data-disagreement="0">' in studies
    assert "id=disagreement-filter>" in studies
    assert "id=disagreement-filter checked" in pages.studies_page(rows, None, ["review"], False, None, True)
    reviewed = [ReviewedCase(cases[0], ReviewAnswer("1.2.3", "1.2.3.1", "card", "MODEL_01", "AB"), "cal-1")]
    health = calibration_health(reviewed, "cal-1", 0.1, 0.1, "sets")
    calibration = pages.calibration_page(health, None)
    assert "<tr class=check><td>routed sets: the right card is in the set</td>" in calibration
    assert "No reviewed routed case with a route confidence yet." in calibration
    overview = pages.overview_page({"vlm_calls": 3}, [], [], SVG,
                                   pages.CalibrationInForce(None, None, None, None, None, None), (0, 0), False)
    assert 'id="count-vlm_calls">3</td>' in overview and 'href="/studies?disagreement=1"' in overview
    assert 'id="drift-warning"' not in overview and "<strong>uncalibrated</strong>" in overview


def test_the_overview_says_why_intake_is_paused_and_when_the_spool_is_over_its_cap():
    calibration = pages.CalibrationInForce(None, None, None, None, None, None)
    paused = {"intake": {"accepting": False, "reason": "spool disk: 3 MB free < min_free_bytes" + HOSTILE,
                         "since": 1_700_000_000.0, "refused_since": 4},
              "retention": {"over_cap": True, "max_spool_bytes": 1000}}
    overview = pages.overview_page(paused, [], [], SVG, calibration, (0, 0), False)
    banner = re.search(r"<p class=drift id=intake-paused>(.*?)</p>", overview, re.S)
    assert banner and "spool disk: 3 MB free &lt; min_free_bytes" in banner.group(1)
    assert ESCAPED in banner.group(1) and "4 instance(s) refused" in banner.group(1)
    assert "id=retention-over-cap" in overview and "(1000 bytes)" in overview
    accepting = {"intake": {"accepting": True, "reason": None, "since": 1.0, "refused_since": 0},
                 "retention": {"over_cap": False, "max_spool_bytes": None}}
    quiet = pages.overview_page(accepting, [], [], SVG, calibration, (0, 0), False)
    assert "intake-paused" not in quiet and "retention-over-cap" not in quiet
    # the standalone page's status has neither part
    assert "intake-paused" not in pages.overview_page({}, [], [], SVG, calibration, (0, 0), False)
