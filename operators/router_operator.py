"""MONAI Deploy operator: route each prepared series to a model card with the onevlm router.

Research use only: not for clinical use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from monai.deploy.core import Fragment, Operator, OperatorSpec

from onevlm.backends import create_backend
from onevlm.calibration.cutoffs import Cutoffs
from onevlm.calibration.site import SiteCalibration
from onevlm.cards import CardRepository, default_cards_dir
from onevlm.router import Router
from onevlm.study.routing import StudyRouting, decodes_ahead, route_prepared


class RouterOperator(Operator):
    """Route the representative image of every series (three stages, top-2, cutoffs, calibrated outcome).

    The cards, the backend and its models, the cutoffs and the calibration load in ``__init__``,
    so a bad card folder, cutoffs or calibration file (or one fitted for another model) or model
    path fails when the application starts, not midway.

    Named input:
        prepared: :class:`onevlm.study.preparation.PreparedStudy`.
    Named output:
        routing: :class:`onevlm.study.routing.StudyRouting` — one decision per image series,
            skipped series with their reason, unreadable files.
    """

    INPUT_NAME = "prepared"
    OUTPUT_NAME = "routing"

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        cards_dir: str | Path | None = None,
        cutoffs_path: str | Path | None = None,
        calibration_path: str | Path | None = None,
        backend: Any = "embedded",
        backend_options: Mapping[str, Any] | None = None,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.cards = CardRepository.load(Path(cards_dir) if cards_dir else default_cards_dir())
        cutoffs = Cutoffs.load(cutoffs_path) if cutoffs_path else None
        calibration = SiteCalibration.load(calibration_path) if calibration_path else None
        # A backend object is used as given; a hybrid pools with the calibration's fusion.
        fusion = calibration.fusion if calibration is not None else None
        router_backend = create_backend(backend, self.cards, fusion=fusion, **dict(backend_options or {})) \
            if isinstance(backend, str) else backend
        router_backend.warm_up()  # models load now: a bad path fails at start-up
        self.router = Router(self.cards, router_backend, cutoffs, calibration=calibration)
        self.batch_size = batch_size
        self._logger.info("router ready: %d cards, backend %s, cutoffs %s, %s", len(self.cards), router_backend.name,
                          self.router.cutoffs.as_dict(),
                          f"calibration {calibration.calibration_id}" if calibration else "uncalibrated")
        super().__init__(fragment, *args, **kwargs)

    @property
    def reads_pixels(self) -> bool:
        """Whether the backend needs every image decoded ahead (the image operator then decodes them);
        the hybrid decodes only those it asks the VLM about."""
        return decodes_ahead(self.router.backend)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT_NAME)
        spec.output(self.OUTPUT_NAME)

    def compute(self, op_input, op_output, context) -> None:
        prepared = op_input.receive(self.INPUT_NAME)
        routed = route_prepared(self.router, prepared.series, self.batch_size)
        op_output.emit(StudyRouting(tuple(routed), prepared.problems), self.OUTPUT_NAME)
