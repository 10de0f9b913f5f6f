"""The page and the labels export against a service's spool, from outside the service.

``onevlm dashboard`` opens the journal beside the running (or stopped) service: SQLite in WAL
mode lets both read, and a review answer waits for the service's write lock like any writer.
Research use only.
"""

from __future__ import annotations

from pathlib import Path

from onevlm.calibration.site import SiteCalibration
from onevlm.cards.repository import CardRepository, default_cards_dir
from onevlm.dashboard.labels_export import LabelsExport, label_rows, write_labels
from onevlm.dashboard.study_index import StudyIndex
from onevlm.net.config import ServiceConfig
from onevlm.net.service import open_journal, spool_status
from onevlm.net.spool import Spool


def _cards(config: ServiceConfig) -> CardRepository:
    return CardRepository.load(config.pipeline.cards_dir or default_cards_dir())


def open_dashboard(config: ServiceConfig, port: int | None = None):
    """The page's server (:class:`~onevlm.dashboard.page_server.PageServer`, bound, not started) and the
    journal it reads (close it after the server).

    ``port`` None: the configuration's ``status_port`` (a running service holds it: pass another).

    Raises
    ------
    ValueError
        If no port is given or configured.
    FileNotFoundError
        If the spool has no journal.
    """
    from onevlm.dashboard.server import DashboardApp
    from onevlm.dashboard.web import make_page_server

    port = config.status_port if port is None else port
    if port is None:
        raise ValueError(f"{config.source}: no status_port: give --port")
    journal = open_journal(config)
    spool = Spool(config.spool_dir, config.group_by)
    try:
        calibration = SiteCalibration.load(config.pipeline.calibration) if config.pipeline.calibration else None
        app = DashboardApp(config, journal, _cards(config), calibration, lambda: spool_status(journal, spool))
        return make_page_server(app, config.dashboard.host, port), journal
    except BaseException:
        journal.close()
        raise


def export_labels(config: ServiceConfig, output: str | Path) -> LabelsExport:
    """Write the latest review answers of the service as LABELS.csv; returns what was written and left out."""
    journal = open_journal(config)
    try:
        answers = journal.latest_reviews()
    finally:
        journal.close()
    Spool(config.spool_dir, config.group_by)  # the layout StudyIndex reads (created if missing)
    export = label_rows(StudyIndex(config.spool_dir), answers, _cards(config))
    write_labels(export, output)
    return export
