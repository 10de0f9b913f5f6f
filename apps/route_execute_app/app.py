"""Route -> execute as a MONAI Deploy application: one VLM routes each series and runs the chosen card.

Research use only: not for clinical use. Nothing it writes is a diagnosis.

Run::

    python -m apps.route_execute_app -i INPUT_FOLDER -o OUTPUT_FOLDER -m MODELS_FOLDER [-l DEBUG]

``MODELS_FOLDER`` (``-m``, or ``HOLOSCAN_MODEL_PATH``) holds the base VLM and the specialty adapters::

    MODELS_FOLDER/base/                  the base model (config.json, weights, processor)
    MODELS_FOLDER/adapters/<specialty>/  one adapter per specialty (``onevlm finetune`` output)

Environment variables of this application (besides the router app's ``ONEVLM_CARDS``,
``ONEVLM_CUTOFFS`` and ``ONEVLM_BACKEND``):

``ONEVLM_SPECIALTY_BASE``
    The base model folder (default ``MODELS_FOLDER/base``).
``ONEVLM_ADAPTERS``
    Adapter folders, separated by ``:`` (default ``MODELS_FOLDER/adapters``); each is an adapter
    or a folder of adapters.
``ONEVLM_SPECIALTY_QUANTIZE``
    ``nf4`` or ``none`` (default: the adapters' training setting); ``ONEVLM_DEVICE``: ``auto``,
    ``cpu``, ``cuda``.

The router is the hybrid one by default: it reads each series' header and asks the specialty
model's own base, adapters switched off for its calls (the paper's one VLM in two roles, one copy in
memory), only when the header cannot decide a stage. ``ONEVLM_BACKEND=transformers`` routes on that
base's reading of the pixels alone (the paper's router); ``ONEVLM_BACKEND=embedded`` on the header
alone. The output folder is the router app's (``sr/``, ``seg/``,
``annotations/``, ``decisions.jsonl``, ``metadata.json``, ``series.json``); each
routing SR also holds the card's result (coded class, grade or findings; boxes as SCOORD
regions, also written as a SEG) or says the card is not executable here, and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from apps.router_app.app import BACKEND_ENV, RouterApp
from onevlm.backends import default_backend
from onevlm.specialty.execution import SpecialtyModel
from onevlm.specialty.shared_base import SharedBaseRouterBackend
from operators import RouterOperator, SpecialtyOperator

BASE_ENV = "ONEVLM_SPECIALTY_BASE"
ADAPTERS_ENV = "ONEVLM_ADAPTERS"
QUANTIZE_ENV = "ONEVLM_SPECIALTY_QUANTIZE"
DEVICE_ENV = "ONEVLM_DEVICE"


@dataclass(frozen=True)
class SpecialtySetup:
    """Where the base model and the adapters are, and how to load them."""

    base_model_dir: Path
    adapter_folders: tuple[Path, ...]
    device: str = "auto"
    quantize: str | None = None


def specialty_setup(model_path: str | Path | None) -> SpecialtySetup:
    """The base model and adapter folders from the environment or the ``-m`` models folder.

    Raises
    ------
    ValueError
        If neither names a base model folder (one with ``config.json``) or an adapter folder.
    """
    models = Path(model_path) if model_path else None
    base = os.environ.get(BASE_ENV) or (str(models / "base") if models else "")
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError(f"the specialty model needs its base model folder (with config.json): set {BASE_ENV} or "
                         f"pass -m MODELS with MODELS/base; got {base or 'nothing'}")
    adapters = os.environ.get(ADAPTERS_ENV) or (str(models / "adapters") if models else "")
    folders = tuple(Path(p) for p in adapters.split(os.pathsep) if p)
    if not folders:
        raise ValueError(f"the specialty model needs adapter folders: set {ADAPTERS_ENV} or pass -m MODELS with "
                         "MODELS/adapters/<specialty>/")
    quantize = os.environ.get(QUANTIZE_ENV, "").strip().lower() or None
    device = os.environ.get(DEVICE_ENV, "").strip().lower() or "auto"
    return SpecialtySetup(Path(base), folders, device, quantize)


class RouteExecuteApp(RouterApp):
    """Input folder → series → images → router → specialty model → routing SRs with results, SEGs, metadata.json.

    Research use only: not for clinical use.
    """

    name = "onevlm-route-execute"
    description = "Routes DICOM series to model cards and runs the executable ones (research use only)."
    version = "0.1.0"

    def router_backend(self, model_path: str | Path | None) -> tuple[object, dict]:
        """``hybrid`` (default): the header first, the specialty model's base (shared: one VLM, two roles)
        when the header cannot decide; ``transformers``: that base alone; ``embedded``: the header alone."""
        setup = specialty_setup(model_path)
        self._logger.info("specialty model: base %s, adapters %s", setup.base_model_dir.name,
                          ", ".join(p.name for p in setup.adapter_folders))
        self._specialty = SpecialtyModel.from_folders(setup.base_model_dir, setup.adapter_folders,
                                                      device=setup.device, quantize=setup.quantize)
        backend = os.environ.get(BACKEND_ENV, "").strip().lower() or default_backend(vlm_configured=True)
        if backend == "transformers":
            return SharedBaseRouterBackend(self._specialty), {}
        if backend == "hybrid":
            return backend, {"pixel_backend": SharedBaseRouterBackend(self._specialty)}
        return backend, {}

    def after_router(self, router: RouterOperator, app_context) -> tuple[object, str]:
        specialty = SpecialtyOperator(self, model=self._specialty, cards=router.cards, name="specialty")
        self.add_flow(router, specialty, {(router.OUTPUT_NAME, specialty.INPUT_NAME)})
        return specialty, specialty.OUTPUT_NAME


def main() -> None:
    """Entry point of ``python -m apps.route_execute_app`` and of the container."""
    RouteExecuteApp().run()


if __name__ == "__main__":
    main()
