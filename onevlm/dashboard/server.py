"""The operator's page: what each route answers, the access-token rule, review answers; JSON ``/status`` too.

The HTTP layer (Starlette routes on uvicorn, TLS, timeouts, bounded bodies) is
:mod:`onevlm.dashboard.web` and :mod:`onevlm.dashboard.page_server`; the HTML is Jinja2 templates
(:mod:`onevlm.dashboard.pages`). This module is the logic between them.

Served by ``onevlm serve`` on ``status_port`` (the service's own journal and calibration) or by
``onevlm dashboard --config FILE`` against the service's spool, running or stopped. The journal's
connection is shared under its lock, so request threads and the pipeline never race.

Access: bound to loopback, pages are open; any other address needs the token from
``dashboard.token_env`` on every request (``Authorization: Bearer`` or the cookie ``/login``
sets). With a token configured, review answers need it on loopback too. Every form carries a
key drawn at start-up, so another web site cannot post answers through an operator's browser.
Each answer is logged with who and when (UIDs only, never the comment). Research use only.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Callable, Mapping
from urllib.parse import parse_qs

from onevlm.calibration.site import SiteCalibration
from onevlm.cards.repository import CardRepository
from onevlm.dashboard import charts, pages
from onevlm.dashboard.calibration_health import ReviewedCase, calibration_health
from onevlm.dashboard.study_index import REVIEW_OUTCOMES, StudyIndex
from onevlm.net.config import ServiceConfig
from onevlm.net.journal import Journal
from onevlm.net.review_answers import CARD, ReviewAnswer
from onevlm.router.outcome import OUTCOMES

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9.]{1,64}$")
COOKIE = "onevlm_token"
#: Groups the pages look at (newest first): the study list, the review queue and the health check.
RECENT_GROUPS = 1000
STUDY_LIST_DEFAULT = 200
REVIEW_PAGE_SIZE = 50
MAX_FORM_BYTES = 16_384
FILTERS = (*OUTCOMES, "pending")


class HttpError(Exception):
    """A request the page refuses: its status and a message for the person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _html(text: str, status: int = 200) -> Response:
    return Response(status, text.encode("utf-8"))


def _redirect(location: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(303, b"", "text/plain", {"Location": location, **(headers or {})})


def _safe_next(value: str | None, default: str) -> str:
    """A local path to go back to (never another site)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def _patient_ids(path) -> tuple[str, str]:
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "AccessionNumber"])
    return str(header.get("PatientID", "")), str(header.get("AccessionNumber", ""))


class DashboardApp:
    """The pages, independent of the HTTP server.

    Parameters
    ----------
    config:
        The service configuration (spool, destinations, ``dashboard`` settings).
    journal:
        The service's journal (shared with the pipeline when served by ``onevlm serve``).
    cards:
        The card repository (reviewers pick cards from it).
    calibration:
        The calibration in force, or ``None`` (uncalibrated).
    status:
        Returns the status counts (``GET /status``).
    metrics, health:
        The running service's :class:`~onevlm.net.metrics.ServiceMetrics` (``GET /metrics``, under
        the page's token rule) and :class:`~onevlm.net.health.ServiceHealth` (``GET /healthz`` and
        ``/readyz``, open: they reveal nothing); ``None`` (the standalone page): those paths are 404.
    """

    def __init__(self, config: ServiceConfig, journal: Journal, cards: CardRepository,
                 calibration: SiteCalibration | None, status: Callable[[], dict], metrics=None, health=None) -> None:
        self.config = config
        self.metrics = metrics  # onevlm.net.metrics.ServiceMetrics, when served by the service
        self.health = health  # onevlm.net.health.ServiceHealth, likewise
        self.settings = config.dashboard
        self.journal = journal
        self.cards = cards
        self.card_ids = [c.id for c in cards]
        self.calibration = calibration if calibration is not None and calibration.calibrated else None
        self.status = status
        self.index = StudyIndex(config.spool_dir)
        self.form_key = secrets.token_urlsafe(24)
        self._token = self.settings.token()
        self._patients: dict[str, tuple[str, str]] = {}

    # -- access ---------------------------------------------------------------------------------

    def _presented_token(self, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 (a malformed cookie header is no token)
            return None
        return cookie[COOKIE].value if COOKIE in cookie else None

    def _authorised(self, headers: Mapping[str, str]) -> bool:
        presented = self._presented_token(headers)
        return bool(self._token and presented and hmac.compare_digest(presented.encode(), self._token.encode()))

    def _check_form(self, form: Mapping[str, str]) -> None:
        if not hmac.compare_digest(form.get("form_key", "").encode(), self.form_key.encode()):
            raise HttpError(403, "this form is stale or came from another site: reload the page and submit again")

    # -- the routes' entry points (onevlm.dashboard.web maps URLs to them) -------------------------

    def access(self, method: str, path: str, target: str, headers: Mapping[str, str]) -> Response | None:
        """The token rule: ``None`` when the request may go on, else the answer (a redirect to ``/login``).

        Raises
        ------
        HttpError
            401 for ``/status``, ``/metrics`` and any form posted without the token.
        """
        if self.settings.loopback or self._authorised(headers):
            return None
        if path in ("/status", "/metrics") or method != "GET":
            raise HttpError(401, "an access token is required (Authorization: Bearer TOKEN)")
        return _redirect("/login?" + pages.query_string(next=target))

    def error(self, path: str, exc: HttpError) -> Response:
        """A refused request's answer: JSON for ``/status``, else the error page."""
        if path == "/status":
            return Response(exc.status, json.dumps({"error": exc.message}).encode(), "application/json")
        return _html(pages.error_page(exc.status, exc.message), exc.status)

    def probe(self, which: str) -> Response:
        """``/healthz`` (``which="alive"``) or ``/readyz`` (``"ready"``): open, they reveal nothing."""
        if self.health is None:
            raise HttpError(404, "no health probes on the standalone page (they belong to the service)")
        verdict = self.health.alive() if which == "alive" else self.health.ready()
        return Response(200 if verdict.ok else 503, json.dumps(verdict.as_dict()).encode(), "application/json")

    def status_response(self) -> Response:
        return Response(200, json.dumps(self._status()).encode(), "application/json")

    def metrics_response(self) -> Response:
        if self.metrics is None:
            raise HttpError(404, "no metrics on the standalone page (they belong to the service)")
        body, content_type = self.metrics.exposition()
        return Response(200, body, content_type)

    def overview(self) -> Response:
        return _html(self._overview())

    def studies(self, query: Mapping[str, str]) -> Response:
        return _html(self._studies(query))

    def decision(self, key: str, query: Mapping[str, str]) -> Response:
        return _html(self._decision(key, query))

    def review_queue(self, query: Mapping[str, str]) -> Response:
        return _html(self._review(query))

    def calibration_health(self) -> Response:
        return _html(self._calibration_page())

    def login(self, method: str, query: Mapping[str, str], body: bytes) -> Response:
        return self._login(method, query, body)

    def record(self, body: bytes, headers: Mapping[str, str], client: str) -> Response:
        return self._record(body, headers, client)

    # -- pages ----------------------------------------------------------------------------------

    def _calibration_in_force(self) -> pages.CalibrationInForce:
        c = self.calibration
        if c is None:
            return pages.CalibrationInForce(None, None, None, None, None, None)
        return pages.CalibrationInForce(c.calibration_id, c.fitted.get("date"), c.risk, c.delta, c.settings.policy,
                                        c.path)

    def _status(self) -> dict:
        """The service's status counts and the routing counts over every current result (the journal's)."""
        return {**self.status(), **self.journal.routing_counts()}

    def _overview(self) -> str:
        now = time.time()
        start = (now // 3600 - 23) * 3600  # the current hour and the 23 before it
        counts = self.journal.studies_per_hour(start, 24)
        results = [self.index.group(g.group_key) for g in self.journal.recent_groups(RECENT_GROUPS)]
        decided = [r for r in results if r is not None]
        return pages.overview_page(self._status(), self.journal.destination_health(),
                                   [d.name for d in self.config.destinations], charts.hourly_chart(counts, start),
                                   self._calibration_in_force(), (sum(r.calibrated for r in decided), len(decided)),
                                   self._health().drift)

    def _patient(self, result) -> tuple[str, str] | None:
        if not self.settings.show_patient_ids or result is None or not result.series:
            return None
        path = result.series[0].instance_path
        if path is None or not path.is_file():
            return None
        key = str(path)
        if key not in self._patients:
            self._patients[key] = _patient_ids(path)
        return self._patients[key]

    def _studies(self, query: Mapping[str, str]) -> str:
        outcome = query.get("outcome") or None
        if outcome is not None and outcome not in FILTERS:
            raise HttpError(400, f"unknown outcome {outcome!r}: use one of {', '.join(FILTERS)}")
        disagree = query.get("disagreement", "")
        if disagree not in ("", "1"):
            raise HttpError(400, "disagreement must be 1 (header and image disagree) or left out")
        limit = query.get("limit", str(STUDY_LIST_DEFAULT))
        if not limit.isdigit() or not 1 <= int(limit) <= RECENT_GROUPS:
            raise HttpError(400, f"limit must be a whole number from 1 to {RECENT_GROUPS}")
        exports = self.journal.export_states()
        rows = []
        for group in self.journal.recent_groups(RECENT_GROUPS):
            result = self.index.group(group.group_key)
            row = pages.StudyRow(group, result, exports.get(group.group_key, {}), self._patient(result))
            if (outcome is None or row.outcome == outcome) and (not disagree or (result and result.disagreements)):
                rows.append(row)
            if len(rows) >= int(limit):
                break
        return pages.studies_page(rows, outcome, FILTERS, self.settings.show_patient_ids, self.settings.viewer_url,
                                  bool(disagree))

    def _group_key(self, text: str) -> str:
        if not _UID.match(text):
            raise HttpError(400, f"{text[:80]!r} is not a study or series UID")
        return text

    def _decision(self, key: str, query: Mapping[str, str]) -> str:
        key = self._group_key(key)
        group = self.journal.group_row(key)
        if group is None:
            raise HttpError(404, f"no study or series {key} in this service's journal")
        result = self.index.group(key)
        answers = {s: a for (g, s), a in self.journal.latest_reviews().items() if g == key}
        return pages.decision_page(group, result, answers, self.journal.review_history(key), self.card_ids,
                                   self.form_key, self.settings.viewer_url, self.settings.show_patient_ids,
                                   self._patient(result), "Answer recorded." if query.get("recorded") else None)

    def _recent_cases(self):
        """(group result, its series) of the recent processed groups, newest first."""
        for group in self.journal.recent_groups(RECENT_GROUPS):
            result = self.index.group(group.group_key)
            if result is not None:
                yield result, result.series

    def _review(self, query: Mapping[str, str]) -> str:
        answers = self.journal.latest_reviews()
        pending, answered = [], []
        for _, cases in self._recent_cases():
            for case in cases:
                answer = answers.get((case.group_key, case.series_instance_uid))
                if answer is not None:
                    answered.append((case, answer))
                elif case.outcome in REVIEW_OUTCOMES:
                    pending.append(case)
        pending.reverse()  # oldest first: a queue
        answered.sort(key=lambda item: -item[1].recorded_at)
        return pages.review_page(pending, answered, self.card_ids, self.form_key,
                                 "Answer recorded." if query.get("recorded") else None, REVIEW_PAGE_SIZE)

    def _health(self):
        answers = self.journal.latest_reviews()
        reviewed = []
        for result, cases in self._recent_cases():
            for case in cases:
                answer = answers.get((case.group_key, case.series_instance_uid))
                if answer is not None:
                    reviewed.append(ReviewedCase(case, answer, result.calibration_id if case.calibrated else None))
        c = self.calibration
        return calibration_health(reviewed, c.calibration_id if c else None, c.risk if c else None,
                                  c.delta if c else None, c.settings.policy if c else None)

    def _calibration_page(self) -> str:
        health = self._health()
        confidences, hits = health.reliability_pairs()
        svg = charts.reliability_chart(confidences, hits, self.calibration is not None) if confidences else None
        return pages.calibration_page(health, svg)

    # -- forms ----------------------------------------------------------------------------------

    def _form(self, body: bytes) -> dict[str, str]:
        if len(body) > MAX_FORM_BYTES:
            raise HttpError(413, "the form is too large")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HttpError(400, "the form is not UTF-8") from exc
        return {k: v[-1].strip() for k, v in parse_qs(text, keep_blank_values=True).items()}

    def _login(self, method: str, query: Mapping[str, str], body: bytes) -> Response:
        if method == "GET":
            return _html(pages.login_page(self.form_key, _safe_next(query.get("next"), "/")))
        if method != "POST":
            raise HttpError(405, f"{method} is not allowed here")
        form = self._form(body)
        self._check_form(form)
        next_url = _safe_next(form.get("next"), "/")
        if not self._token:
            raise HttpError(400, "no access token is configured for this page (dashboard.token_env)")
        if not hmac.compare_digest(form.get("token", "").encode(), self._token.encode()):
            logger.warning("event=dashboard_login_refused")
            return _html(pages.login_page(self.form_key, next_url, "That is not the access token."), 401)
        # Secure under TLS: the browser then never sends the token over plain HTTP
        secure = "; Secure" if self.settings.tls is not None else ""
        cookie = f"{COOKIE}={self._token}; HttpOnly; SameSite=Strict; Path=/{secure}"
        return _redirect(next_url, {"Set-Cookie": cookie})

    def _record(self, body: bytes, headers: Mapping[str, str], client: str) -> Response:
        form = self._form(body)
        self._check_form(form)
        if self._token and not self._authorised(headers):
            raise HttpError(401, "recording an answer needs the access token: open /login first")
        group_key = self._group_key(form.get("group", ""))
        series = form.get("series", "")
        result = self.index.group(group_key)
        case = next((s for s in result.series if s.series_instance_uid == series), None) if result else None
        if case is None:
            raise HttpError(404, f"no routed series {series[:80]!r} in study {group_key}")
        choice = form.get("answer", "")
        kind, _, card = choice.partition(":") if choice.startswith(f"{CARD}:") else (choice, "", "")
        if kind == CARD and card not in self.card_ids:
            raise HttpError(400, f"{card[:80]!r} is not a card of this service's repository")
        try:
            answer = ReviewAnswer(group_key, series, kind, card or None, form.get("reviewer", ""),
                                  form.get("comment", ""), time.time())
        except ValueError as exc:
            raise HttpError(400, str(exc)) from exc
        self.journal.record_review(answer)
        logger.info("event=review_recorded group=%s series=%s answer=%s card=%s reviewer=%s client=%s at=%s",
                    group_key, series, kind, card or "-", answer.reviewer, client,
                    time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(answer.recorded_at)))
        next_url = _safe_next(form.get("next"), "/review")
        return _redirect(next_url + ("&" if "?" in next_url else "?") + "recorded=1")
