"""MONAI Deploy operator: a study's DICOM results — routing SRs, box SEGs / bulk annotations —
plus decisions.jsonl, metadata.json and series.json.

Research use only: not for clinical use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec

from onevlm.cards.repository import CardRepository
from onevlm.study.execution import ExecutedStudy
from onevlm.study.outputs import write_study_outputs


class DicomResultsWriterOperator(Operator):
    """Write one TID 1500 routing SR per routed series, box objects, and the study's summary files.

    Named input:
        routing: :class:`onevlm.study.routing.StudyRouting` (router app) or
            :class:`onevlm.study.execution.ExecutedStudy` (route -> execute app: each SR also
            carries its card's result or why it did not run; detected boxes join the SR as
            closed POLYLINE regions and become a DICOM SEG, or Microscopy Bulk Simple
            Annotations for whole slides).
    Named output:
        outputs: :class:`onevlm.study.outputs.StudyOutputs` (optional downstream, e.g. an exporter).

    Files in ``output_folder``: ``sr/``, ``seg/``, ``annotations/`` (``<SOP Instance UID>.dcm``;
    VerificationFlag UNVERIFIED, not for clinical use), ``decisions.jsonl``, ``metadata.json``
    (flat, scalars only: the study's outcome, ``needs_review``, counts, for a MONAI Deploy
    Workflow Manager to branch on) and ``series.json`` (per series: outcome — routed,
    routed-set, review, stopped — card(s), route confidence, whether calibrated, per-stage
    probabilities, where it stopped, files; and the unreadable files).
    """

    INPUT_NAME = "routing"
    OUTPUT_NAME = "outputs"

    def __init__(self, fragment: Fragment, *args: Any, output_folder: str | Path,
                 cards: CardRepository | None = None, **kwargs: Any) -> None:
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.output_folder = Path(output_folder)
        self.cards = cards
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT_NAME)
        spec.output(self.OUTPUT_NAME).condition(ConditionType.NONE)  # no downstream needed

    def compute(self, op_input, op_output, context) -> None:
        routing = op_input.receive(self.INPUT_NAME)
        execution = None
        if isinstance(routing, ExecutedStudy):
            routing, execution = routing.routing, routing.execution
        outputs = write_study_outputs(routing, self.output_folder, self.cards, execution=execution)
        meta = outputs.metadata
        self._logger.info("%d series: %d routed, %d routed to a set, %d for review, %d executed, %d skipped, "
                          "%d error(s); %d SR, %d box object(s) in %s",
                          meta["series"], meta["routed"], meta["routed_sets"], meta["reviews"], meta["executed"],
                          meta["skipped"], meta["errors"],
                          len(outputs.sr_files), len(outputs.box_files), self.output_folder)
        op_output.emit(outputs, self.OUTPUT_NAME)
