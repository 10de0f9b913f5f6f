"""Route -> execute: the router picks each series' model card and the specialty model runs it. Research use only."""

from apps.route_execute_app.app import RouteExecuteApp

__all__ = ["RouteExecuteApp"]
