"""The embedded (offline, no-VLM) router backend."""

from onevlm.backends.embedded.backend import EmbeddedBackend

__all__ = ["EmbeddedBackend"]
