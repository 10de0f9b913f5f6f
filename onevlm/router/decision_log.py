"""The decision log: JSON Lines, one :class:`RoutingDecision` per input, flushed per line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Iterator

from onevlm.router.decision import RoutingDecision


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
