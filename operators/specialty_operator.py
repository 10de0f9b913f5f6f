"""MONAI Deploy operator: run each routed series' model card on the specialty model (route -> execute).

Research use only: not for clinical use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from monai.deploy.core import Fragment, Operator, OperatorSpec

from onevlm.cards.repository import CardRepository
from onevlm.specialty.execution import SpecialtyModel
from onevlm.study.execution import ExecutedStudy, execute_study


class SpecialtyOperator(Operator):
    """One base VLM with every specialty adapter loaded; each routed card that an adapter can run runs.

    The base model and adapters load in ``__init__`` (a wrong path or an adapter trained on
    another base fails when the application starts), unless a loaded ``model`` is given (one the
    router shares).

    Named input:
        routing: :class:`onevlm.study.routing.StudyRouting`.
    Named output:
        executed: :class:`onevlm.study.execution.ExecutedStudy` — the routing plus, per routed
            series, the card's result (class, grade, findings, boxes) or why it did not run.
    """

    INPUT_NAME = "routing"
    OUTPUT_NAME = "executed"

    def __init__(self, fragment: Fragment, *args: Any, cards: CardRepository, base_model_dir: str | Path | None = None,
                 adapter_folders: Sequence[str | Path] = (), device: str = "auto", quantize: str | None = None,
                 model: SpecialtyModel | None = None, **kwargs: Any) -> None:
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        if model is None:
            if base_model_dir is None:
                raise ValueError("SpecialtyOperator needs a loaded model or base_model_dir and adapter_folders")
            model = SpecialtyModel.from_folders(base_model_dir, adapter_folders, device=device, quantize=quantize)
        self.model = model
        self.cards = cards
        executable = [c.id for c in cards if not isinstance(self.model.resolve(c), str)]
        self._logger.info("specialty model ready: adapters %s; %d card(s) executable here: %s",
                          ", ".join(self.model.specialties), len(executable), ", ".join(executable) or "none")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT_NAME)
        spec.output(self.OUTPUT_NAME)

    def compute(self, op_input, op_output, context) -> None:
        routing = op_input.receive(self.INPUT_NAME)
        execution = execute_study(self.model, routing, self.cards)
        op_output.emit(ExecutedStudy(routing, execution), self.OUTPUT_NAME)
