"""The decision log: JSON Lines, one :class:`RoutingDecision` per input, flushed per line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from onevlm.router.backend import Consultation
from onevlm.router.decision import CandidateRecord, RoutingDecision, StageDecision
from onevlm.router.selector import Index


class DecisionLog:
    """Append routing decisions to a JSONL file; each line is fsync'd so a crash loses none.

    Use as a context manager::

        with DecisionLog("out/decisions.jsonl") as log:
            log.write(decision)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle: IO[str] | None = None

    def __enter__(self) -> "DecisionLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write(self, decision: RoutingDecision) -> None:
        """Append one decision."""
        if self._handle is None:
            raise RuntimeError("DecisionLog is not open; use it as a context manager")
        self._handle.write(json.dumps(decision.as_dict(), ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())


def read_log(path: str | Path) -> Iterator[dict]:
    """Yield the records of a decision log."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def decision_from_record(record: Mapping[str, Any]) -> RoutingDecision:
    """Rebuild a :class:`RoutingDecision` (without its outcome) from a decision-log record.

    Used to refit a calibration on a log instead of re-running the router. A record written
    before the log carried stage distributions falls back to the candidates' probabilities.
    """
    stages = []
    for stage in record.get("stages") or ():
        candidates = tuple(
            CandidateRecord(answer=c["answer"], p=float(c["p"]), raw=c.get("raw", c["answer"]),
                            in_allowed_set=bool(c.get("in_allowed_set", True)), match=c.get("match", "exact"),
                            sequence_logprob=c.get("sequence_logprob"), justification=c.get("justification"))
            for c in stage["candidates"]
        )
        stages.append(StageDecision(
            stage=int(stage["stage"]), prompt_id=stage.get("prompt_id", ""), candidates=candidates,
            tau=stage.get("tau"), chosen=stage["chosen"], index=Index(stage.get("index", "FIRST")),
            seconds=float(stage.get("seconds", 0.0)), evidence=stage.get("evidence") or {},
            distribution=stage.get("distribution"), informative=bool(stage.get("informative", True)),
            consultation=Consultation.from_dict(stage["consultation"]) if stage.get("consultation") else None,
        ))
    return RoutingDecision(
        input=record["input"], reference=record.get("reference") or {}, backend=record.get("backend") or {},
        cutoffs=record.get("cutoffs") or {}, stages=tuple(stages), stopped_early=bool(record.get("stopped_early")),
        stop_reason=record.get("stop_reason"),
        pipeline_card_id=record.get("pipeline_card_id", record.get("model_card_id")),
        seconds=float(record.get("seconds", 0.0)), error=record.get("error"),
    )
