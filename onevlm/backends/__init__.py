"""Router backends and the factory that builds one by name."""

from __future__ import annotations

from typing import Any

from onevlm.cards.repository import CardRepository

BACKENDS = ("embedded", "transformers", "hybrid")


def default_backend(vlm_configured: bool) -> str:
    """The backend a site gets without naming one: ``hybrid`` when a VLM is configured, else ``embedded``."""
    return "hybrid" if vlm_configured else "embedded"


def create_backend(name: str, cards: CardRepository, fusion: Any = None, pixel_backend: Any = None, **options: Any):
    """Build the backend called ``name``.

    Parameters
    ----------
    name:
        ``embedded`` (DICOM header + MiniLM, no pixels: the default without a VLM),
        ``transformers`` (a local VLM folder, pixels only: the paper's router) or ``hybrid``
        (the header first, the VLM when the header cannot decide: the default with a VLM).
    cards:
        The card repository the router uses.
    fusion:
        ``hybrid`` only: the calibration's :class:`~onevlm.calibration.fusion.Fusion` (``None``:
        uncalibrated defaults).
    pixel_backend:
        ``hybrid`` only: an already built pixel source (e.g. the specialty model's shared base);
        default: a ``transformers`` backend from ``options``.
    options:
        Backend options: ``text_model_dir`` (embedded, hybrid); ``model_dir`` and engine settings
        (transformers, hybrid).
    """
    if name == "embedded":
        from onevlm.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(cards, text_model_dir=options.get("text_model_dir"))
    if name == "transformers":
        from onevlm.vlm.backend import TransformersBackend

        return TransformersBackend.from_options(**options)
    if name == "hybrid":
        from onevlm.backends.embedded import EmbeddedBackend
        from onevlm.backends.hybrid import HybridBackend

        if pixel_backend is None:
            from onevlm.vlm.backend import TransformersBackend

            pixel_backend = TransformersBackend.from_options(**options)
        return HybridBackend(EmbeddedBackend(cards, text_model_dir=options.get("text_model_dir")), pixel_backend,
                             fusion)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
