"""What the router routes: files found on disk, read into :class:`RoutingInput` objects."""

from onevlm.inputs.discovery import discover_files
from onevlm.inputs.routing_input import InputError, RoutingInput, load_input

__all__ = ["InputError", "RoutingInput", "discover_files", "load_input"]
