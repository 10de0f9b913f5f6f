"""The router on the specialty model's own base: one VLM in memory, in both roles.

The specialty model holds the base VLM with its LoRA adapters injected. :class:`SharedBaseRouterBackend`
routes with that same model, every adapter switched off for the call (``PeftModel.disable_adapter``),
so the router sees exactly the base model while no second copy is loaded. Routing and specialty
requests take turns on the model's lock. Research use only: not for clinical use.
"""

from __future__ import annotations

from typing import Any, Sequence

from onevlm.inputs.routing_input import RoutingInput
from onevlm.router.backend import StageRequest, StageResponse
from onevlm.specialty.execution import SpecialtyModel


class SharedBaseRouterBackend:
    """A ``transformers`` router backend over a :class:`SpecialtyModel`'s base, adapters off.

    Parameters
    ----------
    specialty:
        The loaded specialty model whose base routes.
    settings:
        Engine settings (:class:`onevlm.vlm.backend.EngineSettings`); default fast, free answers.
    """

    name = "transformers"

    def __init__(self, specialty: SpecialtyModel, settings=None) -> None:
        from onevlm.vlm.backend import TransformersBackend
        from onevlm.vlm.loading import LoadedModel

        self.specialty = specialty
        identity = {**specialty.base_identity, "shared_with_specialty_adapters": list(specialty.specialties)}
        loaded = LoadedModel(model=specialty.model.get_base_model(), processor=specialty.processor, identity=identity)
        self.inner = TransformersBackend(loaded, settings)

    def __str__(self) -> str:
        return f"transformers (the specialty model's base, shared; adapters {', '.join(self.specialty.specialties)})"

    def warm_up(self) -> None:
        """The shared model is loaded already."""

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def answer(self, items: Sequence[RoutingInput], requests: Sequence[StageRequest]) -> list[StageResponse]:
        """The router's stage answers from the base model (every adapter disabled during the call)."""
        with self.specialty.base_model_only():
            return self.inner.answer(items, requests)
