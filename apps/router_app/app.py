"""The onevlm model-card router packaged as a MONAI Deploy application.

Research use only: not for clinical use. The decisions say which model card an input would be
routed to; they are not diagnoses.

Run::

    python -m apps.router_app -i INPUT_FOLDER -o OUTPUT_FOLDER [-l DEBUG]

Arguments are the MONAI Deploy App SDK's own (``-i/--input``, ``-o/--output``, ``-m/--model``,
``-w/--workdir``, ``-l/--log-level``); without them the SDK reads ``HOLOSCAN_INPUT_PATH`` and
``HOLOSCAN_OUTPUT_PATH`` (defaults ``input`` and ``output`` in the current folder).

Environment variables of this application:

``ONEVLM_CARDS``
    Model-card folder (default: the project's ``model_cards/``).
``ONEVLM_CUTOFFS``
    Per-stage cutoffs JSON as written by ``onevlm cutoffs fit`` (default: no cutoffs, i.e. the
    router always keeps its first answer).

The output folder receives ``decisions.jsonl`` (one full decision record per input) and
``metadata.json`` (one summary entry per input, for a workflow manager to branch on).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from onevlm.runtime import configure_runtime
from operators import RouterOperator, RoutingReportWriterOperator

CARDS_ENV = "ONEVLM_CARDS"
CUTOFFS_ENV = "ONEVLM_CUTOFFS"


class RouterApp(Application):
    """Input folder → :class:`RouterOperator` → :class:`RoutingReportWriterOperator`.

    Research use only: not for clinical use.
    """

    name = "onevlm-router"
    description = "Routes DICOM instances to model cards (research use only, not for clinical use)."
    version = "0.1.0"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")

    def compose(self) -> None:
        # The SDK parses -i/-o (or HOLOSCAN_INPUT_PATH/HOLOSCAN_OUTPUT_PATH) from the argv left
        # after Holoscan removed its own flags, and sets up logging from its logging.json.
        app_context = Application.init_app_context(self.argv)
        configure_runtime()
        input_path = Path(app_context.input_path)
        output_path = Path(app_context.output_path)
        self._logger.info("routing %s -> %s (research use only, not for clinical use)", input_path, output_path)

        router_op = RouterOperator(
            self,
            CountCondition(self, 1),
            input_folder=input_path,
            cards_dir=os.environ.get(CARDS_ENV) or None,
            cutoffs_path=os.environ.get(CUTOFFS_ENV) or None,
            name="router_op",
        )
        report_op = RoutingReportWriterOperator(self, output_folder=output_path, name="report_writer_op")

        self.add_flow(router_op, report_op, {(RouterOperator.OUTPUT_NAME, RoutingReportWriterOperator.INPUT_NAME)})


def main() -> None:
    """Entry point of ``python -m apps.router_app`` and of the container."""
    RouterApp().run()


if __name__ == "__main__":
    main()
