"""The operator's pages as server-rendered HTML (no script, no build step): every value is escaped.

No patient data by default: UIDs, modality, times and the router's own words. Header text the
router quoted as evidence (it may hold free text about the patient) and patient ID / accession
number appear only with ``dashboard.show_patient_ids``. Every probability says whether it is
calibrated and links to its definition. Research use only: not for clinical use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from html import escape
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlencode

from onevlm.dashboard.calibration_health import CalibrationHealth, PromiseCheck
from onevlm.dashboard.study_index import GroupResult, SeriesCase
from onevlm.net.journal import DestinationHealth, GroupRow
from onevlm.net.review_answers import CARD, NONE_OF_THESE, NOT_ROUTABLE, ReviewAnswer

NAV = (("/", "Overview"), ("/studies", "Studies"), ("/review", "Review queue"), ("/calibration", "Calibration health"))
#: Evidence fields shown by default: the router's own words, never quoted header text.
SAFE_EVIDENCE = ("method", "pixels_read", "anatomy", "reasons", "note", "informative", "query")
ROUTE_CONFIDENCE = ("Route confidence: the estimated probability that the right card is among the routed ones, "
                    "P1(modality) x the sum of P3(card) over the routed cards. Calibrated: temperature-scaled on "
                    "this site's reviewed labels (the calibration named on the overview). Uncalibrated: the "
                    "backend's own scores, which are not frequencies.")
STAGE_PROBABILITY = ("Stage probability: the backend's probability of an answer at this stage (calibrated: after the "
                     "site's temperature scaling). Not the probability that the case is routed right.")
CONSULTATION = ("Sources: the hybrid router reads the DICOM header first and asks the VLM about the pixels only "
                "when the header cannot decide a stage; stage 3 reads text only. VLM calls count the model's calls "
                "for a series over all stages (0: the header alone decided).")
DISAGREEMENT = ("Header and image disagree: the header says one answer and the image looks like another, by more "
                "than the calibration's margin; by default the case goes to review. A wrong header is what a "
                "reviewer wants to fix at the source (the modality or the PACS), so that it misleads no one else.")
#: Probabilities shown per consulted source: its top answer only.
SOURCE_ANSWERS = 1

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2733;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:8px 16px;display:flex;gap:18px;align-items:center}
header a{color:#dfe9f5;text-decoration:none}header a.active{color:#fff;font-weight:600;border-bottom:2px solid #fff}
main{padding:12px 16px;max-width:1400px}h1{font-size:20px;margin:6px 0 12px}h2{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;background:#fff;margin:4px 0 12px}th,td{border:1px solid #d5dbe3;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#eef2f7}td.num{text-align:right}code{font-size:12px}
.uid{font-family:monospace;font-size:12px}.flash{background:#e3f4e1;border:1px solid #8bc48a;padding:6px 10px}
.drift{background:#fde2e1;border:2px solid #c0392b;padding:8px 12px;font-weight:600}
.error{background:#fde2e1;border:1px solid #c0392b;padding:6px 10px}.muted{color:#6b7785}
.outcome-review,.outcome-failed{color:#b03a2e;font-weight:600}.outcome-routed-set{color:#9a6700;font-weight:600}
.outcome-routed{color:#1e7b34;font-weight:600}form.review{display:flex;gap:6px;flex-wrap:wrap;align-items:center}
footer{padding:12px 16px;color:#6b7785;font-size:12px}svg{max-width:100%;height:auto}
.disagreement{background:#fff1d6;border:2px solid #c26a00;padding:6px 10px}.disagree{color:#9a4300;font-weight:600}
"""


def esc(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def fmt_time(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "—"


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def probability(p: float | None, calibrated: bool, definition: str = ROUTE_CONFIDENCE) -> str:
    """A probability with its calibration state and its definition (tooltip and link)."""
    if p is None:
        return '<span class="muted">—</span>'
    state = "calibrated" if calibrated else "uncalibrated"
    return (f'<span class="p" title="{esc(definition)}">{p:.3f} <a href="/#definitions" '
            f'class="{state}">({state})</a></span>')


def outcome_cell(outcome: str) -> str:
    return f'<span class="outcome-{esc(outcome)}">{esc(outcome)}</span>'


def layout(title: str, body: str, active: str = "", flash: str | None = None, drift: bool = False) -> str:
    nav = "".join(f'<a href="{href}"{" class=active" if href == active else ""}>{esc(label)}</a>'
                  for href, label in NAV)
    banner = ('<p class="drift" id="drift-warning">Calibration drift: on reviewed cases the routed cards hold the '
              'right one less often than the calibration promised, beyond chance. See '
              '<a href="/calibration">Calibration health</a>; recalibrate on the reviewed labels.</p>') if drift else ""
    note = f'<p class="flash" id="flash">{esc(flash)}</p>' if flash else ""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)} · onevlm</title>"
            f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>"
            f"<header><strong>onevlm</strong>{nav}</header><main>{banner}{note}<h1>{esc(title)}</h1>{body}</main>"
            "<footer>Research use only: not for clinical use. No patient data is shown unless the service "
            "configuration says so (dashboard.show_patient_ids).</footer></body></html>")


def error_page(status: int, message: str) -> str:
    return layout(f"{status}", f'<p class="error" id="error">{esc(message)}</p>')


def login_page(form_key: str, next_url: str, message: str | None = None) -> str:
    error = f'<p class="error" id="error">{esc(message)}</p>' if message else ""
    return layout("Access token", f"""{error}
<p>This page needs the access token configured for it (the environment variable named by
<code>dashboard.token_env</code>).</p>
<form method=post action="/login"><input type=hidden name=form_key value="{esc(form_key)}">
<input type=hidden name=next value="{esc(next_url)}">
<label>Token <input type=password name=token id=token autocomplete=off required></label>
<button type=submit id=login>Open</button></form>""")


# --------------------------------------------------------------------------- overview


@dataclass(frozen=True)
class CalibrationInForce:
    """What the overview says of the calibration: identity, date, α, δ, policy (all ``None``: none)."""

    calibration_id: str | None
    fitted_at: str | None
    alpha: float | None
    delta: float | None
    policy: str | None
    source: str | None


def _destination_state(health: DestinationHealth) -> str:
    if health.by_status.get("failed"):
        return "failing"
    if health.by_status.get("pending") and health.last_error:
        return "retrying"
    return "ok"


def overview_page(status: Mapping[str, Any], destinations: Sequence[DestinationHealth], configured: Sequence[str],
                  hourly_svg: str, calibration: CalibrationInForce, calibrated_share: tuple[int, int],
                  drift: bool) -> str:
    counts = "".join(f'<tr><th>{esc(label)}</th><td class=num id="count-{key}">{esc(status.get(key, 0))}</td></tr>'
                     for key, label in (("received", "instances received"), ("processed", "studies processed"),
                                        ("exported", "results exported"), ("failed", "failed"),
                                        ("quarantine_files", "quarantined files"), ("duplicates", "duplicates"),
                                        ("refused", "refused")))
    groups = status.get("groups") or {}
    queues = "".join(f'<tr><th>{esc(label)}</th><td class=num id="queue-{key}">{esc(value)}</td></tr>'
                     for key, label, value in (
                         ("receiving", "studies receiving", groups.get("receiving", 0)),
                         ("queued", "studies queued", groups.get("queued", 0)),
                         ("processing", "studies processing", groups.get("processing", 0)),
                         ("export-pending", "exports pending", status.get("export_pending", 0))))
    routing = "".join(f'<tr><th>{label}</th><td class=num id="count-{key}">{esc(status.get(key, 0))}</td></tr>'
                      for key, label in (
                          ("vlm_calls", "VLM calls (all series, all stages)"),
                          ("series_decided", "series decided"),
                          ("series_without_vlm", "decided series that needed no VLM call (the header alone decided)"),
                          ("disagreements", '<a href="/studies?disagreement=1">series where header and image '
                                            'disagree</a>')))
    by_name = {d.name: d for d in destinations}
    names = list(configured) + [n for n in by_name if n not in configured]
    rows = []
    for name in names:
        health = by_name.get(name)
        if health is None:
            rows.append(f'<tr><td>{esc(name)}</td><td>idle</td><td class=num>0</td><td class=num>0</td>'
                        '<td class=num>0</td><td>—</td><td>—</td></tr>')
            continue
        rows.append(f'<tr class="destination"><td>{esc(name)}</td><td>{_destination_state(health)}</td>'
                    f'<td class=num>{health.by_status.get("sent", 0)}</td>'
                    f'<td class=num>{health.by_status.get("pending", 0)}</td>'
                    f'<td class=num>{health.by_status.get("failed", 0)}</td>'
                    f'<td>{fmt_time(health.last_sent_at)}</td><td>{esc(health.last_error or "—")}</td></tr>')
    destination_table = ("<table id=destinations><tr><th>destination</th><th>health</th><th>sent</th>"
                         "<th>pending</th><th>failed</th><th>last sent</th><th>last error</th></tr>"
                         + "".join(rows) + "</table>") if names else "<p class=muted>No destination configured.</p>"
    calibrated, decided = calibrated_share
    if calibration.calibration_id:
        cal = (f"<table id=calibration><tr><th>calibration</th><td class=uid>{esc(calibration.calibration_id)}</td></tr>"
               f"<tr><th>fitted</th><td>{esc(calibration.fitted_at or '—')}</td></tr>"
               f"<tr><th>α (risk)</th><td>{esc(calibration.alpha)}</td></tr>"
               f"<tr><th>δ</th><td>{esc(calibration.delta)}</td></tr>"
               f"<tr><th>policy</th><td>{esc(calibration.policy)}</td></tr>"
               f"<tr><th>file</th><td>{esc(calibration.source or '—')}</td></tr></table>")
    else:
        cal = ('<p id=calibration>No site calibration: outputs are <strong>uncalibrated</strong> (the backend\'s own '
               'scores; nothing is promised). Fit one with <code>onevlm labels export</code> then '
               '<code>onevlm calibrate fit</code>.</p>')
    return layout("Overview", f"""
<h2>Counts</h2><table id=counts>{counts}</table>
<h2>Header and pixels</h2><table id=routing>{routing}</table>
<h2>Queues</h2><table id=queues>{queues}</table>
<h2>Destinations</h2>{destination_table}
<h2>Studies per hour, last 24 hours</h2><div id=hourly>{hourly_svg}</div>
<h2>Calibration in force</h2>{cal}
<p id=calibrated-share>Outputs calibrated: {calibrated} of {decided} recent processed studies.</p>
<h2 id=definitions>Definitions</h2>
<p>{esc(ROUTE_CONFIDENCE)}</p>
<p>{esc(STAGE_PROBABILITY)}</p>
<p>{esc(CONSULTATION)}</p>
<p>{esc(DISAGREEMENT)}</p>
<p>Outcomes: routed: one card; routed-set: a few cards, one of which should be right; review: the
router abstained, a person decides; stopped: not a medical image, or no card covers it; failed: not readable.</p>
""", "/", drift=drift)


# --------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class StudyRow:
    """One line of the study list: the journal's view of the group, its result, its exports."""

    group: GroupRow
    result: GroupResult | None
    exports: Mapping[str, int]
    patient: tuple[str, str] | None = None

    @property
    def outcome(self) -> str:
        if self.result is not None:
            return self.result.outcome
        return {"done": "no result", "failed": "failed"}.get(self.group.status, "pending")


def _exports(exports: Mapping[str, int]) -> str:
    return ", ".join(f"{status} {count}" for status, count in sorted(exports.items())) or "—"


def _executions(cases: Iterable[SeriesCase]) -> str:
    parts = [f"{x.get('card_id')}: {x.get('status')}" + (f" ({x.get('summary')})" if x.get("summary") else "")
             for case in cases for x in case.executions]
    return esc("; ".join(parts)) if parts else '<span class="muted">—</span>'


def _disagree_mark(text: str | None, label: str = "header and image disagree") -> str:
    """The marker of a header/image disagreement (its words in the tooltip), or a dash."""
    if not text:
        return '<span class="muted">—</span>'
    return f'<span class=disagree title="{esc(text)}">{esc(label)}</span>'


def _count(value: int | None) -> str:
    return '<span class="muted">—</span>' if value is None else esc(value)


def studies_page(rows: Sequence[StudyRow], outcome: str | None, outcomes: Sequence[str], show_patient: bool,
                 viewer_url: str | None, disagree: bool = False) -> str:
    options = "".join(f'<option value="{esc(o)}"{" selected" if o == outcome else ""}>{esc(o)}</option>'
                      for o in outcomes)
    head = ("<tr><th>first received</th><th>study</th>" + ("<th>patient ID</th><th>accession</th>" if show_patient else "")
            + "<th>modality</th><th>outcome</th><th>card(s)</th><th>route confidence</th><th>specialty result</th>"
              "<th>export</th><th>header vs image</th><th>VLM calls</th><th>viewer</th></tr>")
    body = []
    for row in rows:
        result = row.result
        study = result.series[0].study_instance_uid if result and result.series else row.group.group_key
        modalities = sorted({s.dicom_modality for s in result.series}) if result else []
        patient = "".join(f"<td>{esc(v)}</td>" for v in (row.patient or ("", ""))) if show_patient else ""
        viewer = (f'<a href="{esc(viewer_url.format(study=study))}" target=_blank rel=noopener>open</a>'
                  if viewer_url else "—")
        disagreements = "; ".join(s.disagreement for s in result.series if s.disagreement) if result else ""
        body.append(
            f'<tr class="study" data-group="{esc(row.group.group_key)}" data-outcome="{esc(row.outcome)}" '
            f'data-disagreement="{1 if disagreements else 0}">'
            f"<td>{fmt_time(row.group.first_received)}</td>"
            f'<td class=uid><a href="/studies/{esc(row.group.group_key)}">{esc(row.group.group_key)}</a></td>{patient}'
            f"<td>{esc(', '.join(modalities) or '—')}</td><td>{outcome_cell(row.outcome)}</td>"
            f"<td>{esc(', '.join(result.cards) if result and result.cards else '—')}</td>"
            f"<td>{probability(result.confidence, result.calibrated) if result else '—'}</td>"
            f"<td>{_executions(result.series) if result else '—'}</td><td>{esc(_exports(row.exports))}</td>"
            f"<td>{_disagree_mark(disagreements)}</td><td class=num>{_count(result.vlm_calls if result else None)}</td>"
            f"<td>{viewer}</td></tr>")
    table = f"<table id=studies>{head}{''.join(body)}</table>" if body else "<p id=studies class=muted>No study.</p>"
    return layout("Studies", f"""
<form method=get action="/studies" id=filter><label>Outcome <select name=outcome id=outcome-filter>
<option value="">all</option>{options}</select></label>
<label><input type=checkbox name=disagreement value=1 id=disagreement-filter{" checked" if disagree else ""}>
header and image disagree</label> <button type=submit>Filter</button></form>
<p class=muted>Newest first ({len(rows)} shown). A study's outcome is its most urgent series' outcome.
Route confidence is the lowest among its routed series. VLM calls: the study's series together, all stages
(0: the header alone decided). {esc(DISAGREEMENT)}</p>{table}""", "/studies")


# --------------------------------------------------------------------------- decision and review forms


def review_form(case: SeriesCase, card_ids: Sequence[str], form_key: str, next_url: str,
                current: ReviewAnswer | None) -> str:
    offered = "".join(f'<option value="card:{esc(c)}">{esc(c)}</option>' for c in case.candidates)
    others = "".join(f'<option value="card:{esc(c)}">{esc(c)}</option>' for c in card_ids if c not in case.candidates)
    answered = (f'<span class="muted answer">answered: {esc(describe(current))} by {esc(current.reviewer)} '
                f'at {fmt_time(current.recorded_at)}</span>') if current else ""
    return f"""<form method=post action="/review" class=review data-series="{esc(case.series_instance_uid)}">
<input type=hidden name=form_key value="{esc(form_key)}"><input type=hidden name=next value="{esc(next_url)}">
<input type=hidden name=group value="{esc(case.group_key)}"><input type=hidden name=series value="{esc(case.series_instance_uid)}">
<select name=answer required><option value="">— the right card —</option>
<optgroup label="offered by the router">{offered}</optgroup>
<option value="{NONE_OF_THESE}">none of these</option><option value="{NOT_ROUTABLE}">not routable</option>
<optgroup label="any other card">{others}</optgroup></select>
<input name=reviewer placeholder="your initials" required maxlength=64 size=10>
<input name=comment placeholder="comment (optional)" maxlength=2000 size=30>
<button type=submit>Record</button>{answered}</form>"""


def describe(answer: ReviewAnswer) -> str:
    return answer.card if answer.kind == CARD else answer.kind.replace("-", " ")


def _ranked(probs: Mapping[str, float] | None) -> str:
    if not probs:
        return "—"
    return "<br>".join(f"{esc(a)}: {p:.4f}" for a, p in sorted(probs.items(), key=lambda item: -item[1]))


def _evidence(stage: Mapping[str, Any], show_all: bool) -> str:
    evidence = dict(stage.get("evidence") or {})
    keys = [k for k in evidence if show_all or k in SAFE_EVIDENCE]
    lines = [f"<b>{esc(k)}</b>: {esc(evidence[k])}" for k in keys if k != "logits"]
    if stage.get("justification"):
        lines.append(f"<b>justification</b>: {esc(stage['justification'])}")
    return "<br>".join(lines) or "—"


def _sources(sources: Mapping[str, Any] | None) -> str:
    """Each consulted source's top answer on its own (``header: brain CT scan 0.911``)."""
    parts = []
    for source, probs in (sources or {}).items():
        if isinstance(probs, Mapping) and probs:
            top = sorted(probs.items(), key=lambda item: -item[1])[:SOURCE_ANSWERS]
            parts.append(f"{esc(source)}: " + ", ".join(f"{esc(a)} {p:.3f}" for a, p in top))
    return "<br>".join(parts)


def _consultation(stage: Mapping[str, Any], assessed: Mapping[str, Any]) -> str:
    """Which sources a stage consulted and why, its VLM calls, each source's answer and any disagreement."""
    record = stage.get("consultation") or {}
    consulted = stage.get("consulted", record.get("consulted", assessed.get("consulted")))
    if consulted is None:
        return '<span class="muted">not recorded</span>'
    reason = record.get("reason") or assessed.get("consult_reason")
    calls = record.get("vlm_calls", assessed.get("vlm_calls"))
    lines = [f"<b class=consulted>{esc(' + '.join(consulted) or 'none (text only)')}</b>"
             + (f"; VLM calls {esc(calls)}" if calls is not None else "")]
    if reason:
        lines.append(f"<span class=reason>{esc(reason)}</span>")
    sources = _sources(record.get("sources"))
    if sources:
        lines.append(sources)
    clash = record.get("disagreement")
    if isinstance(clash, Mapping):
        lines.append(f"<span class=disagree>header {esc(clash.get('header_answer'))}, image "
                     f"{esc(clash.get('pixels_answer'))}: margin {esc(clash.get('margin'))} &gt; "
                     f"{esc(clash.get('threshold'))}, action {esc(clash.get('action'))}</span>")
    return "<br>".join(lines)


def stage_table(case: SeriesCase, show_all: bool) -> str:
    decision = case.decision or {}
    assessed = {s["stage"]: s for s in (decision.get("route") or {}).get("stages") or []}
    rows = []
    for stage in decision.get("stages") or []:
        a = assessed.get(stage["stage"], {})
        calibrated = a.get("calibrated") is not None
        probs = a.get("calibrated") or a.get("raw") or {c["answer"]: c["p"] for c in stage.get("candidates") or []}
        flags = ", ".join(f for f in (("tie" if a.get("tie") else ""),
                                      (f"set {a['set']}" if a.get("set") is not None else ""),
                                      ("" if stage.get("informative", True) else "no evidence")) if f)
        rows.append(f'<tr class=stage><td>{stage["stage"]} {esc(stage.get("name"))}</td><td>{esc(stage.get("chosen"))}</td>'
                    f'<td>{probability(a.get("p", stage.get("confidence")), calibrated, STAGE_PROBABILITY)}</td>'
                    f'<td>{_ranked(probs)}</td><td>{esc(flags) or "—"}</td><td>{_consultation(stage, a)}</td>'
                    f'<td>{_evidence(stage, show_all)}</td></tr>')
    if not rows:
        return '<p class=muted>No stage ran.</p>'
    return ("<table class=stages><tr><th>stage</th><th>chosen</th><th>probability</th>"
            f'<th>candidates (top answers)</th><th>flags</th><th title="{esc(CONSULTATION)}">consulted (why)</th>'
            "<th>evidence</th></tr>" + "".join(rows) + "</table>")


def disagreement_note(case: SeriesCase) -> str:
    """A series' header/image disagreement in words, prominently, with what a reviewer can do about it."""
    if not case.disagreement:
        return ""
    return (f'<p class=disagreement data-series="{esc(case.series_instance_uid)}"><strong>Header and image '
            f"disagree</strong>: {esc(case.disagreement)}. A wrong header is what a reviewer wants to fix at the "
            "source (the modality or the PACS), so that it misleads no one else.</p>")


def decision_page(group: GroupRow, result: GroupResult | None, answers: Mapping[str, ReviewAnswer],
                  history: Sequence[ReviewAnswer], card_ids: Sequence[str], form_key: str, viewer_url: str | None,
                  show_all: bool, patient: tuple[str, str] | None, flash: str | None) -> str:
    sections = [f"<p>Status <b id=group-status>{esc(group.status)}</b>; {group.received} instance(s); first received "
                f"{fmt_time(group.first_received)}; last change {fmt_time(group.updated_at)}.</p>"]
    if group.error:
        sections.append(f'<p class=error>{esc(group.error)}</p>')
    if patient:
        sections.append(f"<p>Patient ID {esc(patient[0])}; accession {esc(patient[1])}</p>")
    if result is None:
        sections.append("<p class=muted>No result yet.</p>")
    else:
        study = result.series[0].study_instance_uid if result.series else group.group_key
        if viewer_url:
            sections.append(f'<p><a id=viewer-link href="{esc(viewer_url.format(study=study))}" target=_blank '
                            f'rel=noopener>Open the study in the viewer</a></p>')
        sections.append(f"<p>Study outcome {outcome_cell(result.outcome)}; calibration "
                        f"{esc(result.calibration_id or 'none (uncalibrated)')}.</p>")
        for case in result.series:
            sections.append(
                f'<h2 class=series>Series <span class=uid>{esc(case.series_instance_uid)}</span> '
                f'({esc(case.dicom_modality)})</h2>'
                f"<p>Outcome {outcome_cell(case.outcome)}; card(s) {esc(', '.join(case.cards) or '—')}; route confidence "
                f"{probability(case.confidence, case.calibrated)}; modality {esc(case.modality or '—')}; finding "
                f"{esc(case.finding or 'not assessed')}.</p>"
                + disagreement_note(case)
                + f'<p class=vlm-calls title="{esc(CONSULTATION)}">VLM calls for this series: '
                  f"{_count(case.vlm_calls)}{' (the header alone decided)' if case.vlm_calls == 0 else ''}.</p>"
                + (f"<p>Reasons: {esc('; '.join(case.reasons))}</p>" if case.reasons else "")
                + (f'<p class=error>{esc(case.error)}</p>' if case.error else "")
                + f"<p>Specialty result: {_executions([case])}</p>" + stage_table(case, show_all)
                + "<h3>Review</h3>"
                + review_form(case, card_ids, form_key, f"/studies/{group.group_key}",
                              answers.get(case.series_instance_uid)))
    if history:
        items = "".join(f"<tr><td>{fmt_time(a.recorded_at)}</td><td class=uid>{esc(a.series_instance_uid)}</td>"
                        f"<td>{esc(describe(a))}</td><td>{esc(a.reviewer)}</td><td>{esc(a.comment)}</td></tr>"
                        for a in history)
        sections.append("<h2>Review history</h2><table id=history><tr><th>when</th><th>series</th><th>answer</th>"
                        f"<th>reviewer</th><th>comment</th></tr>{items}</table>")
    return layout(f"Study {group.group_key}", "".join(sections), "/studies", flash)


def review_page(pending: Sequence[SeriesCase], answered: Sequence[tuple[SeriesCase, ReviewAnswer]],
                card_ids: Sequence[str], form_key: str, flash: str | None, limit: int) -> str:
    rows = []
    for case in pending[:limit]:
        reasons = "; ".join(case.reasons)
        why = esc(reasons) or "—"
        if case.disagreement:  # the marker first; its words unless the reasons say them already
            words = "" if case.disagreement in reasons else f": {esc(case.disagreement)}"
            why = f"{_disagree_mark(case.disagreement)}{words}<br>{why}"
        flag = 1 if case.disagreement else 0
        rows.append(f'<tr class="case{" disagreement-case" if flag else ""}" '
                    f'data-series="{esc(case.series_instance_uid)}" data-disagreement="{flag}">'
                    f'<td class=uid><a href="/studies/{esc(case.group_key)}">{esc(case.group_key)}</a><br>'
                    f'{esc(case.series_instance_uid)}</td><td>{esc(case.dicom_modality)}</td>'
                    f"<td>{outcome_cell(case.outcome)}</td><td>{esc(', '.join(case.cards) or '—')}</td>"
                    f"<td>{probability(case.confidence, case.calibrated)}</td><td>{why}</td>"
                    f"<td>{review_form(case, card_ids, form_key, '/review', None)}</td></tr>")
    table = ("<table id=queue><tr><th>study / series</th><th>modality</th><th>outcome</th><th>card(s)</th>"
             "<th>route confidence</th><th>why</th><th>answer</th></tr>" + "".join(rows) + "</table>"
             ) if rows else "<p id=queue class=muted>Nothing waits for review.</p>"
    disagreeing = sum(1 for case in pending if case.disagreement)
    done = "".join(f"<tr class=answered><td class=uid>{esc(c.group_key)}<br>{esc(c.series_instance_uid)}</td>"
                   f"<td>{outcome_cell(c.outcome)}</td><td>{esc(', '.join(c.cards) or '—')}</td>"
                   f"<td>{esc(describe(a))}</td><td>{esc(a.reviewer)}</td><td>{fmt_time(a.recorded_at)}</td></tr>"
                   for c, a in answered[:limit])
    done_table = ("<table id=answered><tr><th>study / series</th><th>outcome</th><th>card(s)</th><th>answer</th>"
                  f"<th>reviewer</th><th>when</th></tr>{done}</table>") if done else "<p class=muted>None yet.</p>"
    return layout("Review queue", f"""
<p>The <b>review</b> and <b>routed-set</b> cases waiting for an answer ({len(pending)}; the oldest {limit} shown).
Record the right card, or <i>none of these</i> (the right card is not among those offered), or <i>not routable</i>
(no card should run). Answers are labels for the site's calibration (<code>onevlm labels export</code>); they are
never written into the DICOM results.</p>
<p id=queue-disagreements>Marked <span class=disagree>header and image disagree</span>: {disagreeing} of the cases
waiting. A wrong header is what a reviewer wants to fix at the source (the modality or the PACS), so that it misleads
no one else; the answer here labels the case, it does not correct the header.</p>{table}
<h2>Answered</h2>{done_table}""", "/review", flash)


# --------------------------------------------------------------------------- calibration health


def _check_row(check: PromiseCheck) -> str:
    if check.promised is None:
        verdict = "no promise (uncalibrated)"
    elif check.n == 0:
        verdict = "no reviewed case"
    else:
        verdict = "BROKEN (drift)" if check.broken else "kept (within tolerance)"
    promised = "—" if check.promised is None else f"≥ {check.promised:.3f}"
    upper = f"{check.upper_bound:.3f}" if check.n else "—"
    return (f'<tr class=check><td>{esc(check.name)}</td><td class=num>{check.n}</td><td class=num>{check.hits}</td>'
            f"<td class=num>{fmt_rate(check.rate)}</td><td class=num>{promised}</td><td class=num>{upper}</td>"
            f"<td class=num>{fmt_rate(check.lowest_consistent_rate)}</td><td>{verdict}</td></tr>")


def calibration_page(health: CalibrationHealth, reliability_svg: str | None) -> str:
    if health.calibration_id:
        intro = (f"<p>Calibration <span class=uid>{esc(health.calibration_id)}</span>, policy {esc(health.policy)}: "
                 f"the right card is among the routed ones with probability at least 1 − α = {1 - health.alpha:.3f}"
                 f" (α = {health.alpha}). Checked on reviewed cases routed under it; the promise counts as broken "
                 f"when the one-sided {1 - health.delta:.0%} Clopper–Pearson upper bound of the observed rate is "
                 "below it (δ = " f"{health.delta}).</p>")
    else:
        intro = ("<p>No site calibration is in force: outputs are uncalibrated and nothing is promised. The reviewed "
                 "figures below are shown for information.</p>")
    status = ('<p class=drift id=drift-verdict>Drift: the promise is broken beyond the binomial tolerance.</p>'
              if health.drift else '<p id=drift-verdict>No drift detected.</p>')
    table = ("<table id=checks><tr><th>check</th><th>reviewed</th><th>right</th><th>observed</th><th>promised</th>"
             f"<th>upper bound (1 − δ)</th><th>lowest consistent rate</th><th>verdict</th></tr>"
             f"{_check_row(health.routed_set)}{_check_row(health.routed)}{_check_row(health.combined)}</table>")
    others = (f"<p class=muted>{health.other_calibration} reviewed case(s) were routed under another calibration "
              "(or none) and are not counted.</p>") if health.other_calibration else ""
    diagram = (f"<h2>Reliability of route confidence (reviewed cases)</h2><div id=reliability>{reliability_svg}</div>"
               if reliability_svg else "<p class=muted>No reviewed routed case with a route confidence yet.</p>")
    return layout("Calibration health", f"""{intro}{status}{table}{others}
<p class=muted>Reviewed cases are those people chose to review: the check speaks for every routed case only when
routed cases are reviewed at random. Review cases count as covered under the sets policy (a person decides) and are
not part of the check; <i>none of these</i> and <i>not routable</i> answers count as misses of a routed case.</p>
{diagram}""", "/calibration", drift=health.drift)


def query_string(**params: Any) -> str:
    return urlencode({k: v for k, v in params.items() if v})
