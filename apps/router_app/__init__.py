"""The onevlm model-card router as a MONAI Deploy application. Research use only."""

from apps.router_app.app import RouterApp

__all__ = ["RouterApp"]
