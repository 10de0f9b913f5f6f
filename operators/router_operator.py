"""MONAI Deploy operator that routes every input file to a model card with the onevlm router.

Research use only: not for clinical use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec

from onevlm.backends import create_backend
from onevlm.calibration.cutoffs import Cutoffs
from onevlm.cards import CardRepository, default_cards_dir
from onevlm.router import Router
from onevlm.router.runner import route_files


class RouterOperator(Operator):
    """Route each DICOM instance (or image) under a folder to a model card.

    The cards, the backend (with its text model) and the cutoffs are loaded in ``__init__``,
    so a bad card folder or cutoffs file fails when the application is composed, not midway
    through a run. Research use only: not for clinical use.

    Named input:
        input_folder: ``Path`` or ``str`` of the folder (searched recursively) or single file to
            route. Optional (``ConditionType.NONE``): when no upstream operator emits it, the
            ``input_folder`` given to the constructor is used, as the SDK's
            ``DICOMDataLoaderOperator`` does.

    Named output:
        decisions: ``list[dict]``, one ``RoutingDecision.as_dict()`` per input file, in the
            order the files were found. A file that cannot be read gives a dict whose ``error``
            names the file; it never stops the other files.

    Give the operator a ``CountCondition(fragment, 1)`` when it is the first operator of an
    application, or it runs forever.
    """

    INPUT_NAME = "input_folder"
    OUTPUT_NAME = "decisions"

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        input_folder: str | Path | None = None,
        cards_dir: str | Path | None = None,
        cutoffs_path: str | Path | None = None,
        backend: str = "embedded",
        text_model_dir: str | Path | None = None,
        batch_size: int = 8,
        hint: str | None = None,
        backend_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Load the cards, backend and cutoffs.

        Args:
            fragment: The application (or fragment) this operator belongs to.
            input_folder: Folder or file routed when nothing arrives on ``input_folder``.
            cards_dir: Model-card folder (default: ``ONEVLM_CARDS`` or the shipped ``model_cards/``).
            cutoffs_path: Cutoffs JSON (default: none, i.e. always keep the first answer).
            backend: Backend name for :func:`onevlm.backends.create_backend` (``embedded``).
            text_model_dir: Sentence-model folder for the embedded backend (default: bundled).
            batch_size: Inputs per backend call.
            hint: Modality hint for ordinary images that carry no DICOM header.
            backend_options: Further backend options (e.g. ``model_dir`` for ``transformers``).
        """
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.input_folder = Path(input_folder) if input_folder else None
        self.batch_size = int(batch_size)
        self.hint = hint

        cards_path = Path(cards_dir) if cards_dir else default_cards_dir()
        cards = CardRepository.load(cards_path)
        cutoffs = Cutoffs.load(cutoffs_path) if cutoffs_path else Cutoffs()
        options = dict(backend_options or {})
        options["text_model_dir"] = str(text_model_dir) if text_model_dir else None
        router_backend = create_backend(backend, cards, **options)
        # MONAI Deploy convention: models load when the operator is built, so a missing model
        # fails at start-up, not on the first image.
        router_backend.warm_up()
        self.router = Router(cards, router_backend, cutoffs)
        self._logger.info(
            "router ready: %d cards (%d modalities) from %s, backend %s, cutoffs %s",
            len(cards), len(cards.modalities), cards_path, backend, cutoffs.as_dict(),
        )
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT_NAME).condition(ConditionType.NONE)  # optional: no upstream needed
        spec.output(self.OUTPUT_NAME)

    def compute(self, op_input, op_output, context) -> None:
        """Route every file under the input folder and emit the list of decision dicts."""
        received = None
        try:
            received = op_input.receive(self.INPUT_NAME)
        except Exception:  # nothing connected or nothing sent: use the constructor's folder
            received = None
        path = Path(received) if received else self.input_folder
        if path is None or not path.exists():
            raise ValueError(f"no input to route: {received or self.input_folder} does not exist")

        decisions: list[dict] = []
        for decision in route_files(self.router, [path], hint=self.hint, batch_size=self.batch_size, progress=False):
            if decision.error:
                self._logger.warning("could not route %s: %s", decision.input, decision.error)
            else:
                self._logger.info(
                    "%s -> %s (modality %s, confidence %s)%s",
                    decision.reference.get("file", decision.input), decision.final_label, decision.modality,
                    None if decision.confidence is None else round(decision.confidence, 4),
                    f" [{decision.stop_reason}]" if decision.stop_reason else "",
                )
            decisions.append(decision.as_dict())
        self._logger.info("routed %d input(s) from %s", len(decisions), path)
        op_output.emit(decisions, self.OUTPUT_NAME)
