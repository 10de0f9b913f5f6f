"""Router backends and the factory that builds one by name."""

from __future__ import annotations

from typing import Any

from onevlm.cards.repository import CardRepository

BACKENDS = ("embedded", "transformers")


def create_backend(name: str, cards: CardRepository, **options: Any):
    """Build the backend called ``name``.

    Parameters
    ----------
    name:
        ``embedded`` (default; DICOM header + MiniLM) or ``transformers`` (a local VLM folder).
    cards:
        The card repository the router uses.
    options:
        Backend options: ``text_model_dir`` (embedded); ``model_dir`` and engine settings
        (transformers).
    """
    if name == "embedded":
        from onevlm.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(cards, text_model_dir=options.get("text_model_dir"))
    if name == "transformers":
        from onevlm.vlm.backend import TransformersBackend

        return TransformersBackend.from_options(**options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
