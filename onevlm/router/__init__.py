"""The three-stage model-card router: prompts, answer selection, pipeline and decision log."""

from onevlm.router.backend import BackendError, Candidate, RouterBackend, StageRequest, StageResponse
from onevlm.router.decision import RoutingDecision, StageDecision
from onevlm.router.decision_log import DecisionLog, read_log
from onevlm.router.pipeline import Router
from onevlm.router.selector import Index, Selection, select_answer

__all__ = [
    "BackendError",
    "Candidate",
    "DecisionLog",
    "Index",
    "Router",
    "RouterBackend",
    "RoutingDecision",
    "Selection",
    "StageDecision",
    "StageRequest",
    "StageResponse",
    "read_log",
    "select_answer",
]
