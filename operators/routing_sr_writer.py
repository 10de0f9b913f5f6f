"""MONAI Deploy operator: the routing SRs, decisions.jsonl and metadata.json of a study.

Research use only: not for clinical use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec

from onevlm.cards.repository import CardRepository
from onevlm.study.outputs import write_study_outputs


class RoutingSRWriterOperator(Operator):
    """Write one TID 1500 routing SR per routed series plus the study's summary files.

    Named input:
        routing: :class:`onevlm.study.routing.StudyRouting`.
    Named output:
        outputs: :class:`onevlm.study.outputs.StudyOutputs` (optional downstream, e.g. an exporter).

    Files in ``output_folder``: ``sr/<SOP Instance UID>.dcm`` per routed series (VerificationFlag
    UNVERIFIED, not for clinical use), ``decisions.jsonl`` (one decision record per routed series)
    and ``metadata.json`` (per series: modality, finding, model_card_id, per-stage confidence,
    where it stopped, the SR file; for a MONAI Deploy Workflow Manager to branch on).
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
        outputs = write_study_outputs(op_input.receive(self.INPUT_NAME), self.output_folder, self.cards)
        meta = outputs.metadata
        self._logger.info("%d series: %d routed, %d skipped, %d error(s); %d SR file(s) in %s", meta["series"],
                          meta["routed"], meta["skipped"], meta["errors"], len(outputs.sr_files), self.output_folder)
        op_output.emit(outputs, self.OUTPUT_NAME)
