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
``ONEVLM_CALIBRATION``
    The site's ``calibration.json`` (``onevlm calibrate fit``): cutoffs, temperatures, prediction
    sets and the selective threshold. Default: ``calibration.json`` in the ``-m`` folder when
    there is one, else none (every output says ``calibrated: false``).
``ONEVLM_CUTOFFS``
    Per-stage cutoffs JSON as written by ``onevlm cutoffs fit`` (default: the calibration's,
    else no cutoffs, i.e. the router always keeps its first answer).
``ONEVLM_BACKEND``
    ``hybrid``, ``embedded`` or ``transformers``; by default ``hybrid`` (the header first, the VLM
    only when the header cannot decide) when ``-m`` (or ``HOLOSCAN_MODEL_PATH``) names a model
    folder, else ``embedded`` (the header alone).

The output folder receives ``sr/<SOP Instance UID>.dcm`` (one TID 1500 routing SR per routed
series), ``decisions.jsonl`` (one decision record per routed series), ``metadata.json`` (flat:
the study's outcome and counts, for a MONAI Deploy Workflow Manager to branch on) and
``series.json`` (one entry per series, and the unreadable files).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Holoscan's own log (set before it loads): at its default level a CPU-only run prints a CUDA-driver
# warning and a normal end reads "Scheduler stopped: ... deadlock"; neither is something to act on.
# HOLOSCAN_LOG_LEVEL set by the caller wins.
os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "ERROR")

from apps.monai_core_skip import register_monai_lazily  # noqa: E402

register_monai_lazily()  # the SDK without MONAI core's 4-second eager import

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402

from onevlm.backends import default_backend  # noqa: E402
from onevlm.runtime import configure_runtime  # noqa: E402
from operators import DicomSeriesLoaderOperator, RouterOperator, DicomResultsWriterOperator, SeriesImageOperator

CARDS_ENV = "ONEVLM_CARDS"
CUTOFFS_ENV = "ONEVLM_CUTOFFS"
CALIBRATION_ENV = "ONEVLM_CALIBRATION"
BACKEND_ENV = "ONEVLM_BACKEND"
CALIBRATION_FILE = "calibration.json"


def calibration_path(model_path: str | Path | None) -> str | None:
    """``ONEVLM_CALIBRATION``, else ``calibration.json`` in the ``-m`` folder, else none."""
    configured = os.environ.get(CALIBRATION_ENV, "").strip()
    if configured:
        return configured
    candidate = Path(model_path) / CALIBRATION_FILE if model_path else None
    return str(candidate) if candidate is not None and candidate.is_file() else None


def backend_choice(model_path: str | Path | None) -> tuple[str, dict]:
    """Backend by configuration: ``ONEVLM_BACKEND``, else ``hybrid`` (header first, the VLM when the
    header cannot decide) when ``-m`` names a model folder (one with a ``config.json``), else the
    embedded default."""
    name = os.environ.get(BACKEND_ENV, "").strip().lower()
    model = Path(model_path) if model_path else None
    has_model = model is not None and (model / "config.json").is_file()
    if not name:
        name = default_backend(has_model)
    if name in ("transformers", "hybrid"):
        if not has_model:
            raise ValueError(f"the {name} backend needs -m MODEL_FOLDER (a folder with config.json), got {model}")
        return name, {"model_dir": str(model)}
    return name, {}


class RouterApp(Application):
    """Input folder → series → representative images → router → routing SRs + metadata.json.

    Research use only: not for clinical use.
    """

    name = "onevlm-router"
    description = "Routes DICOM series to model cards (research use only, not for clinical use)."
    version = "0.1.0"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")

    def compose(self) -> None:
        # The SDK parses -i/-o/-m (or HOLOSCAN_INPUT_PATH/OUTPUT_PATH/MODEL_PATH) from the argv
        # left after Holoscan removed its own flags, and sets up logging from its logging.json.
        app_context = Application.init_app_context(self.argv)
        configure_runtime()
        input_path = Path(app_context.input_path)
        output_path = Path(app_context.output_path)
        backend, options = self.router_backend(app_context.model_path)
        self._logger.info("routing %s -> %s with the %s backend (research use only, not for clinical use)",
                          input_path, output_path, backend)

        loader = DicomSeriesLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="series_loader")
        router = RouterOperator(
            self,
            cards_dir=os.environ.get(CARDS_ENV) or None,
            cutoffs_path=os.environ.get(CUTOFFS_ENV) or None,
            calibration_path=calibration_path(app_context.model_path),
            backend=backend,
            backend_options=options,
            name="router",
        )
        images = SeriesImageOperator(self, decode_pixels=router.reads_pixels, name="series_images")
        writer = DicomResultsWriterOperator(self, output_folder=output_path, cards=router.cards, name="results_writer")

        self.add_flow(loader, images, {(loader.OUTPUT_NAME, images.INPUT_NAME)})
        self.add_flow(images, router, {(images.OUTPUT_NAME, router.INPUT_NAME)})
        last, port = self.after_router(router, app_context)
        self.add_flow(last, writer, {(port, writer.INPUT_NAME)})

    def router_backend(self, model_path: str | Path | None) -> tuple[str, dict]:
        """The router's backend and its options (see :func:`backend_choice`)."""
        return backend_choice(model_path)

    def after_router(self, router: RouterOperator, app_context) -> tuple[object, str]:
        """The operator and output port whose result the writer receives (here: the router's)."""
        return router, router.OUTPUT_NAME


def main() -> None:
    """Entry point of ``python -m apps.router_app`` and of the container."""
    RouterApp().run()


if __name__ == "__main__":
    main()
