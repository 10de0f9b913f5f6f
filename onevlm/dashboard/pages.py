"""The operator's pages as server-rendered HTML (no script, no build step): every value is escaped.

The markup lives in Jinja2 templates next to this module (``templates/``: ``layout.html``, one
template per page, the shared pieces as macros in ``macros.html``), rendered with autoescaping on
and ``StrictUndefined``; this module only prepares the values (sorting, number and time formats,
which flags apply). The two SVG charts (drawn by :mod:`onevlm.dashboard.charts`) and the style
sheet are the only markup passed in as trusted.

No patient data by default: UIDs, modality, times and the router's own words. Header text the
router quoted as evidence (it may hold free text about the patient) and patient ID / accession
number appear only with ``dashboard.show_patient_ids``. Every probability says whether it is
calibrated and links to its definition. Research use only: not for clinical use.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence
from urllib.parse import urlencode

from markupsafe import Markup

from onevlm.dashboard.calibration_health import CalibrationHealth, PromiseCheck
from onevlm.dashboard.study_index import GroupResult, SeriesCase
from onevlm.net.journal import DestinationHealth, GroupRow
from onevlm.net.review_answers import CARD, NONE_OF_THESE, NOT_ROUTABLE, ReviewAnswer

if TYPE_CHECKING:
    from jinja2 import Environment

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


# --------------------------------------------------------------------------- the template environment

#: The folder of the templates, inside the package (``onevlm.dashboard``).
TEMPLATES = "templates"
_ENVIRONMENT: Environment | None = None
_ENVIRONMENT_LOCK = threading.Lock()


def _finalize(value: Any) -> Any:
    """``None`` prints as nothing (as these pages always did), not as ``None``; escaping is autoescape's."""
    return "" if value is None else value


def environment() -> Environment:
    """The pages' Jinja2 environment (autoescape, strict undefined), created on the first render.

    Jinja2 is imported here rather than at module import, so that importing this module stays cheap.
    """
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        with _ENVIRONMENT_LOCK:  # the page answers on several threads
            if _ENVIRONMENT is None:
                from jinja2 import Environment, PackageLoader, StrictUndefined

                env = Environment(loader=PackageLoader("onevlm.dashboard", TEMPLATES), autoescape=True,
                                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                  finalize=_finalize, auto_reload=False)
                env.globals.update(
                    NAV=NAV, ROUTE_CONFIDENCE=ROUTE_CONFIDENCE, STAGE_PROBABILITY=STAGE_PROBABILITY,
                    CONSULTATION=CONSULTATION, DISAGREEMENT=DISAGREEMENT, NONE_OF_THESE=NONE_OF_THESE,
                    NOT_ROUTABLE=NOT_ROUTABLE, stage_rows=_stage_rows, executions=_executions,
                    # our own constant style sheet: the one piece of markup besides the charts taken as is
                    CSS=Markup(CSS))
                env.filters.update(fmt=format, fmt_time=fmt_time, fmt_rate=fmt_rate, describe=describe)
                _ENVIRONMENT = env
    return _ENVIRONMENT


def _render(template: str, **values: Any) -> str:
    return environment().get_template(template).render(**values)


def _macro(name: str, *args: Any) -> str:
    """One macro of ``macros.html`` rendered alone (the public helpers below)."""
    return str(getattr(environment().get_template("macros.html").module, name)(*args))


def _trusted_svg(svg: str | None) -> Markup | None:
    """A chart drawn by our own code (:mod:`onevlm.dashboard.charts`, matplotlib's SVG output, no
    user text in it): the one place where generated markup enters a page unescaped."""
    return None if svg is None else Markup(svg)


# --------------------------------------------------------------------------- formats and shared pieces


def fmt_time(timestamp: float | None) -> str:
    """Local time to the second, or a dash."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "—"


def fmt_rate(value: float | None) -> str:
    """A rate to three decimals, or a dash."""
    return "—" if value is None else f"{value:.3f}"


def probability(p: float | None, calibrated: bool, definition: str = ROUTE_CONFIDENCE) -> str:
    """A probability with its calibration state and its definition (tooltip and link)."""
    return _macro("probability", p, calibrated, definition)


def outcome_cell(outcome: str) -> str:
    """An outcome, coloured by its class."""
    return _macro("outcome_cell", outcome)


def error_page(status: int, message: str) -> str:
    """An error page: the status as its title, the message in words."""
    return _render("error.html", title=f"{status}", message=message)


def login_page(form_key: str, next_url: str, message: str | None = None) -> str:
    """The access-token form (``message``: why the last try failed)."""
    return _render("login.html", title="Access token", form_key=form_key, next_url=next_url, message=message)


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


@dataclass(frozen=True)
class _DestinationView:
    name: str
    health: DestinationHealth | None  # None: configured, nothing sent yet (idle)
    state: str = "idle"


def overview_page(status: Mapping[str, Any], destinations: Sequence[DestinationHealth], configured: Sequence[str],
                  hourly_svg: str, calibration: CalibrationInForce, calibrated_share: tuple[int, int],
                  drift: bool) -> str:
    """The overview: counts, queues, destinations, the hourly chart, the calibration in force, definitions.

    ``hourly_svg`` is the chart from :func:`onevlm.dashboard.charts.hourly_chart` (trusted markup).
    """
    groups = status.get("groups") or {}
    counts = [(key, label, status.get(key, 0)) for key, label in (
        ("received", "instances received"), ("processed", "studies processed"), ("exported", "results exported"),
        ("failed", "failed"), ("series_failed", "series without a result (unreadable image or an error)"),
        ("quarantine_files", "quarantined files"), ("duplicates", "duplicates"),
        ("refused", "refused"))]
    queues = [("receiving", "studies receiving", groups.get("receiving", 0)),
              ("queued", "studies queued", groups.get("queued", 0)),
              ("processing", "studies processing", groups.get("processing", 0)),
              ("export-pending", "exports pending", status.get("export_pending", 0))]
    # the last label is a link to the filtered study list: the template writes it
    routing = [(key, label, status.get(key, 0)) for key, label in (
        ("vlm_calls", "VLM calls (all series, all stages)"), ("series_decided", "series decided"),
        ("series_without_vlm", "decided series that needed no VLM call (the header alone decided)"),
        ("disagreements", None))]
    by_name = {d.name: d for d in destinations}
    names = list(configured) + [n for n in by_name if n not in configured]
    rows = [_DestinationView(name, by_name[name], _destination_state(by_name[name])) if name in by_name
            else _DestinationView(name, None) for name in names]
    calibrated, decided = calibrated_share
    # the running service says whether it writes anything new (the spool's disk) and what retention holds;
    # the standalone page reads the journal only and has neither
    intake = status.get("intake") if isinstance(status.get("intake"), Mapping) else None
    retention = status.get("retention") if isinstance(status.get("retention"), Mapping) else None
    return _render("overview.html", title="Overview", active="/", drift=drift, counts=counts, routing=routing,
                   queues=queues, destinations=rows, hourly_svg=_trusted_svg(hourly_svg), calibration=calibration,
                   calibrated=calibrated, decided=decided, intake=intake, retention=retention)


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
    """The specialty results of the series in words (empty: none ran)."""
    return "; ".join(f"{x.get('card_id')}: {x.get('status')}" + (f" ({x.get('summary')})" if x.get("summary") else "")
                     for case in cases for x in case.executions)


@dataclass(frozen=True)
class _StudyView:
    row: StudyRow
    study: str
    modalities: str
    executions: str
    exports: str
    disagreements: str
    viewer: str | None


def _study_view(row: StudyRow, viewer_url: str | None) -> _StudyView:
    result = row.result
    study = result.series[0].study_instance_uid if result and result.series else row.group.group_key
    return _StudyView(
        row=row, study=study,
        modalities=", ".join(sorted({s.dicom_modality for s in result.series})) if result else "",
        executions=_executions(result.series) if result else "", exports=_exports(row.exports),
        disagreements="; ".join(s.disagreement for s in result.series if s.disagreement) if result else "",
        viewer=viewer_url.format(study=study) if viewer_url else None)


def studies_page(rows: Sequence[StudyRow], outcome: str | None, outcomes: Sequence[str], show_patient: bool,
                 viewer_url: str | None, disagree: bool = False) -> str:
    """The study list, newest first, with its outcome and header/image-disagreement filters.

    ``viewer_url`` has a ``{study}`` placeholder (``None``: no viewer link).
    """
    return _render("studies.html", title="Studies", active="/studies", rows=[_study_view(r, viewer_url) for r in rows],
                   outcome=outcome, outcomes=outcomes, show_patient=show_patient, disagree=disagree)


# --------------------------------------------------------------------------- decision and review forms


def review_form(case: SeriesCase, card_ids: Sequence[str], form_key: str, next_url: str,
                current: ReviewAnswer | None) -> str:
    """The form that records a review answer for one series (``current``: its latest answer)."""
    return _macro("review_form", case, card_ids, form_key, next_url, current)


def describe(answer: ReviewAnswer) -> str:
    """A review answer in words: the card, or ``none of these`` / ``not routable``."""
    return answer.card if answer.kind == CARD else answer.kind.replace("-", " ")


def _ranked(probs: Mapping[str, float] | None) -> list[tuple[str, float]]:
    return sorted(probs.items(), key=lambda item: -item[1]) if probs else []


def _evidence(stage: Mapping[str, Any], show_all: bool) -> list[tuple[str, Any]]:
    """(field, value) of a stage's evidence: the safe fields only unless ``show_all``; never the logits."""
    evidence = dict(stage.get("evidence") or {})
    lines = [(k, evidence[k]) for k in evidence if (show_all or k in SAFE_EVIDENCE) and k != "logits"]
    if stage.get("justification"):
        lines.append(("justification", stage["justification"]))
    return lines


def _sources(sources: Mapping[str, Any] | None) -> list[tuple[str, list[tuple[str, float]]]]:
    """Each consulted source's top answer on its own (``header: brain CT scan 0.911``)."""
    return [(source, sorted(probs.items(), key=lambda item: -item[1])[:SOURCE_ANSWERS])
            for source, probs in (sources or {}).items() if isinstance(probs, Mapping) and probs]


@dataclass(frozen=True)
class _Consultation:
    consulted: str
    vlm_calls: Any
    reason: Any
    sources: list
    disagreement: Mapping[str, Any] | None


def _consultation(stage: Mapping[str, Any], assessed: Mapping[str, Any]) -> _Consultation | None:
    """Which sources a stage consulted and why, its VLM calls, each source's answer and any disagreement
    (``None``: a record from before consultations were recorded)."""
    record = stage.get("consultation") or {}
    consulted = stage.get("consulted", record.get("consulted", assessed.get("consulted")))
    if consulted is None:
        return None
    clash = record.get("disagreement")
    return _Consultation(consulted=" + ".join(consulted) or "none (text only)",
                         vlm_calls=record.get("vlm_calls", assessed.get("vlm_calls")),
                         reason=record.get("reason") or assessed.get("consult_reason"),
                         sources=_sources(record.get("sources")),
                         disagreement=clash if isinstance(clash, Mapping) else None)


@dataclass(frozen=True)
class _StageView:
    stage: Any
    name: Any
    chosen: Any
    p: float | None
    calibrated: bool
    ranked: list
    flags: str
    consultation: _Consultation | None
    evidence: list


def _stage_rows(case: SeriesCase, show_all: bool) -> list[_StageView]:
    """One row per stage that ran: its answer, probability, ranked candidates, flags, sources, evidence."""
    decision = case.decision or {}
    assessed = {s["stage"]: s for s in (decision.get("route") or {}).get("stages") or []}
    rows = []
    for stage in decision.get("stages") or []:
        a = assessed.get(stage["stage"], {})
        probs = a.get("calibrated") or a.get("raw") or {c["answer"]: c["p"] for c in stage.get("candidates") or []}
        flags = ", ".join(f for f in (("tie" if a.get("tie") else ""),
                                      (f"set {a['set']}" if a.get("set") is not None else ""),
                                      ("" if stage.get("informative", True) else "no evidence")) if f)
        rows.append(_StageView(stage=stage["stage"], name=stage.get("name"), chosen=stage.get("chosen"),
                               p=a.get("p", stage.get("confidence")), calibrated=a.get("calibrated") is not None,
                               ranked=_ranked(probs), flags=flags, consultation=_consultation(stage, a),
                               evidence=_evidence(stage, show_all)))
    return rows


def stage_table(case: SeriesCase, show_all: bool) -> str:
    """The router's stages of one series as a table (``show_all``: every evidence field)."""
    return _macro("stage_table", case, show_all)


def disagreement_note(case: SeriesCase) -> str:
    """A series' header/image disagreement in words, prominently, with what a reviewer can do about it."""
    return _macro("disagreement_note", case)


def decision_page(group: GroupRow, result: GroupResult | None, answers: Mapping[str, ReviewAnswer],
                  history: Sequence[ReviewAnswer], card_ids: Sequence[str], form_key: str, viewer_url: str | None,
                  show_all: bool, patient: tuple[str, str] | None, flash: str | None) -> str:
    """One study: status, outcome, and per series the stages, the disagreement, the review form; the history."""
    viewer = None
    if result is not None and viewer_url:
        viewer = viewer_url.format(study=result.series[0].study_instance_uid if result.series else group.group_key)
    return _render("decision.html", title=f"Study {group.group_key}", active="/studies", flash=flash, group=group,
                   result=result, answers=answers, history=history, card_ids=card_ids, form_key=form_key,
                   viewer=viewer, show_all=show_all, patient=patient)


def review_page(pending: Sequence[SeriesCase], answered: Sequence[tuple[SeriesCase, ReviewAnswer]],
                card_ids: Sequence[str], form_key: str, flash: str | None, limit: int) -> str:
    """The review queue (oldest first, ``limit`` shown) and the latest answers."""
    return _render("review.html", title="Review queue", active="/review", flash=flash, pending=pending[:limit],
                   waiting=len(pending), answered=answered[:limit], card_ids=card_ids, form_key=form_key, limit=limit,
                   disagreeing=sum(1 for case in pending if case.disagreement))


# --------------------------------------------------------------------------- calibration health


@dataclass(frozen=True)
class _CheckView:
    check: PromiseCheck
    verdict: str
    promised: str
    upper: str


def _check_view(check: PromiseCheck) -> _CheckView:
    if check.promised is None:
        verdict = "no promise (uncalibrated)"
    elif check.n == 0:
        verdict = "no reviewed case"
    else:
        verdict = "BROKEN (drift)" if check.broken else "kept (within tolerance)"
    return _CheckView(check, verdict, "—" if check.promised is None else f"≥ {check.promised:.3f}",
                      f"{check.upper_bound:.3f}" if check.n else "—")


def calibration_page(health: CalibrationHealth, reliability_svg: str | None) -> str:
    """The drift check of the calibration in force on the reviewed cases, and their reliability diagram.

    ``reliability_svg`` is the chart from :func:`onevlm.dashboard.charts.reliability_chart` (trusted
    markup; ``None``: no reviewed routed case with a route confidence).
    """
    return _render("calibration.html", title="Calibration health", active="/calibration", drift=health.drift,
                   health=health, reliability_svg=_trusted_svg(reliability_svg),
                   checks=[_check_view(c) for c in (health.routed_set, health.routed, health.combined)])


def query_string(**params: Any) -> str:
    """A URL query of the parameters that have a value."""
    return urlencode({k: v for k, v in params.items() if v})
