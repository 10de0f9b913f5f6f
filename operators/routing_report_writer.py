"""MONAI Deploy operator that writes the router's decisions to the application output folder.

Research use only: not for clinical use.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from onevlm.reports.routing_metadata import DECISIONS_FILE, METADATA_FILE, build_metadata


class RoutingReportWriterOperator(Operator):
    """Write the routing decisions to the output folder. Research use only: not for clinical use.

    Named input:
        decisions: ``list[dict]`` of ``RoutingDecision.as_dict()`` records (``RoutingDecision``
            objects are accepted too), as emitted by ``RouterOperator``.

    Named output:
        None. Files written to ``output_folder`` (created if missing; both replaced on each run):

        - ``decisions.jsonl``: one line per input, the full decision dict.
        - ``metadata.json``: ``{"not_for_clinical_use": true, "count", "routed", "errors",
          "inputs": [...]}`` with one entry per input: ``input``, ``sop_instance_uid``,
          ``series_instance_uid``, ``study_instance_uid``, ``modality``, ``finding``,
          ``model_card_id``, ``confidence``, ``stage_confidence`` (``{"1", "2", "3"}``, ``null``
          for a stage that did not run), ``stopped_early``, ``stop_reason``, ``error`` and
          ``not_for_clinical_use``.
    """

    INPUT_NAME = "decisions"

    def __init__(self, fragment: Fragment, *args: Any, output_folder: str | Path, **kwargs: Any) -> None:
        """Args:
        fragment: The application (or fragment) this operator belongs to.
        output_folder: The application's output folder (``app_context.output_path``).
        """
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT_NAME)

    def compute(self, op_input, op_output, context) -> None:
        received = op_input.receive(self.INPUT_NAME) or []
        decisions = [d.as_dict() if hasattr(d, "as_dict") else dict(d) for d in received]
        self.output_folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in decisions)
        _write_atomic(self.output_folder / DECISIONS_FILE, lines)
        metadata = build_metadata(decisions)
        _write_atomic(self.output_folder / METADATA_FILE, json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
        self._logger.info(
            "wrote %d decision(s) (%d routed to a card, %d error(s)) to %s",
            metadata["count"], metadata["routed"], metadata["errors"], self.output_folder,
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
