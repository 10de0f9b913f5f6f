"""A backend wrapper that answers each identical stage request once (evaluation and calibration re-route)."""

from __future__ import annotations

from typing import Any, Sequence

from onevlm.inputs.routing_input import RoutingInput
from onevlm.router.backend import RouterBackend, StageRequest, StageResponse


class CachingBackend:
    """Wrap a backend so repeated identical stage requests are answered once."""

    def __init__(self, backend: RouterBackend) -> None:
        self.backend = backend
        self._cache: dict[tuple, StageResponse] = {}

    def identity(self) -> dict[str, Any]:
        return self.backend.identity()

    def warm_up(self) -> None:
        self.backend.warm_up()

    @staticmethod
    def _key(item: RoutingInput, request: StageRequest) -> tuple:
        weighed = tuple(sorted(request.finding_probs.items())) if request.finding_probs else None
        return (str(item.path), request.stage, request.modality, request.finding, request.settled, weighed)

    def answer(self, items: Sequence[RoutingInput], requests: Sequence[StageRequest]) -> list[StageResponse]:
        todo: dict[tuple, tuple[RoutingInput, StageRequest]] = {}
        for item, request in zip(items, requests):  # the same input twice in one batch is asked once
            key = self._key(item, request)
            if key not in self._cache:
                todo.setdefault(key, (item, request))
        if todo:
            fresh = self.backend.answer([i for i, _ in todo.values()], [r for _, r in todo.values()])
            for key, response in zip(todo, fresh):
                self._cache[key] = response
        return [self._cache[self._key(i, r)] for i, r in zip(items, requests)]
