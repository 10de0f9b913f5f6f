"""``onevlm serve``: the listener, study assembly, the pipeline workers and the exporter together.

Threads: the pynetdicom server (one per association), an assembler that queues groups idle for
``idle_seconds``, ``workers`` pipeline workers, one exporter thread per destination, and an optional HTTP server on
``status_port``: ``GET /status`` (JSON counts) and the operator's page (:mod:`onevlm.dashboard`).
On start, partial writes are cleared and the journal is reconciled with the spool, so every
acknowledged instance is processed after a crash.
"""

from __future__ import annotations

import logging
import math
import queue
import threading

from onevlm.backends import create_backend
from onevlm.calibration.cutoffs import Cutoffs
from onevlm.calibration.site import SiteCalibration
from onevlm.cards.repository import CardRepository, default_cards_dir
from onevlm.net.config import ServiceConfig
from onevlm.net.exporter import Exporter
from onevlm.net.disk_space import DiskGuard
from onevlm.net.health import ServiceHealth
from onevlm.net.journal import Journal
from onevlm.net.listener import Listener
from onevlm.net.processor import GroupProcessor
from onevlm.net.retention import Retention
from onevlm.net.spool import Spool
from onevlm.net.spool_owner import SpoolOwner
from onevlm.router.pipeline import Router

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2


def build_specialty_model(config: ServiceConfig):
    """The specialty model (base + every adapter) when the pipeline names one, else ``None``."""
    specialty = config.pipeline.specialty
    if specialty is None:
        return None
    from onevlm.specialty.execution import SpecialtyModel

    return SpecialtyModel.from_folders(specialty.base_model_dir, specialty.adapters, device=specialty.device,
                                       quantize=specialty.quantize)


def build_router(config: ServiceConfig, specialty=None) -> tuple[Router, CardRepository]:
    """The router the workers share; models load now, so a bad path fails at start-up.

    A ``transformers`` or ``hybrid`` router without its own ``model_dir`` reads the pixels with the
    specialty model's base (adapters off for its calls): one VLM in memory for both roles.
    """
    pipeline = config.pipeline
    cards = CardRepository.load(pipeline.cards_dir or default_cards_dir())
    cutoffs = Cutoffs.load(pipeline.cutoffs) if pipeline.cutoffs else None
    calibration = SiteCalibration.load(pipeline.calibration) if pipeline.calibration else None
    shared = None
    if pipeline.backend in ("transformers", "hybrid") and pipeline.model_dir is None and specialty is not None:
        from onevlm.specialty.shared_base import SharedBaseRouterBackend

        shared = SharedBaseRouterBackend(specialty)
    if pipeline.backend == "transformers" and shared is not None:
        backend = shared
    else:
        options = {"model_dir": str(pipeline.model_dir)} if pipeline.model_dir else {}
        backend = create_backend(pipeline.backend, cards, fusion=calibration.fusion if calibration else None,
                                 pixel_backend=shared, **options)
    backend.warm_up()
    return Router(cards, backend, cutoffs, calibration=calibration), cards


class Service:
    """The whole service; :meth:`start` returns once it listens, :meth:`stop` shuts it down."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.spool = Spool(config.spool_dir, config.group_by)
        self.owner = SpoolOwner(config.spool_dir)
        self.journal = Journal(config.journal_path)
        self.specialty = build_specialty_model(config)
        self.router, self.cards = build_router(config, self.specialty)
        # A full disk loses nothing: below disk.min_free_* intake and result writing pause (onevlm.net.disk_space).
        self.disk_guard = DiskGuard(config.spool_dir, config.disk)
        # Orthanc as the intake receives the C-STOREs itself: no listener of ours then (the intake starts with us).
        self.orthanc_intake = None
        self.listener = None if config.intake is not None else Listener(
            config.listener, self.spool, self.journal, reuse_port=config.listener.processes > 1,
            disk_guard=self.disk_guard)
        self._listener_processes: list = []
        self._listener_stop = None
        self.processor = GroupProcessor(self.router, self.cards, self.spool, self.journal, config.destinations,
                                        specialty=self.specialty, disk_guard=self.disk_guard)
        self.exporter = Exporter(self.journal, config.destinations, config.listener.ae_title,
                                 config.retry_base_seconds, config.retry_max_seconds, config.max_export_attempts)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._status_server = None  # onevlm.dashboard.page_server.PageServer, with status_port
        self._pipeline_lock = threading.Lock()  # one model in memory: pipeline runs take turns
        # clean-ups take the pipeline's turn too: no group is rewritten or re-read while its files go
        # clean-ups give way while the pipeline has work: studies first, the spool at a quarter of the pace
        self.retention = Retention(config.retention, self.spool, self.journal, lock=self._pipeline_lock,
                                   busy=lambda: self._queue.qsize() > 0 or self._pipeline_lock.locked())
        self._started = threading.Event()
        self.health = ServiceHealth(self._service_threads, lambda: self.journal.heartbeat(), config.spool_dir, config.disk,
                                    self._started, disk_guard=self.disk_guard)

    def start(self) -> None:
        self.owner.acquire("a second service")  # before anything is cleared or recovered: one service per spool
        cleared = self.spool.clear_partial_writes()
        recovered = self.journal.recover(self.spool.scan())
        if cleared or recovered:
            logger.info("event=recovered partial_writes_cleared=%d instances_recorded=%d", cleared, recovered)
        self.retention.finish_pending()  # clean-ups a crash interrupted end before anything is received again
        from onevlm.dashboard.study_index import backfill_series_figures

        backfill_series_figures(self.journal, self.config.spool_dir)  # a journal from before it kept them: once
        if self.listener is not None:
            self.listener.start()
        else:
            from onevlm.net.orthanc_intake import OrthancIntake

            intake = self.orthanc_intake = OrthancIntake(self.config.intake, self.spool, self.journal,
                                                         disk_guard=self.disk_guard)
            self._spawn("intake", lambda: intake.run(self._stop))
        if self.listener is not None and self.config.listener.processes > 1:
            from onevlm.net.listener_process import start_listener_processes

            self._listener_processes, self._listener_stop = start_listener_processes(
                self.config, self.config.listener.processes - 1)
        self._spawn("assembler", self._assemble)
        if self.config.retention.enabled:
            self._spawn("retention", lambda: self.retention.run_forever(self._stop))
        for n in range(self.config.workers):
            self._spawn(f"worker-{n}", self._work)
        self.exporter.fail_unconfigured()
        for destination in self.config.destinations:  # one each: a dead destination holds back only its own
            self._spawn(f"exporter-{destination.name}", lambda name=destination.name: self._export(name))
        if self.config.status_port is not None:
            self._start_status()
        self._started.set()

    def _service_threads(self) -> list[threading.Thread]:
        """The threads that must stay alive (the listener's, the assembler, workers, exporters, intake)."""
        threads = list(self._threads)
        if self.listener is not None and self.listener.thread is not None:
            threads.append(self.listener.thread)
        return threads

    def _spawn(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=f"onevlm-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _assemble(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                # No room for results: nothing is due (an endless idle time), complete groups wait, pending.
                idle = self.config.idle_seconds if self.disk_guard.accepting() else math.inf
                for key in self.journal.due_groups(idle):
                    logger.info("event=group_complete group=%s", key)
                    self._queue.put(key)
            except Exception:
                logger.exception("event=assembler_error")

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            with self._pipeline_lock:
                self.processor.process(key)

    def _export(self, destination: str) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.exporter.run_once(destination=destination)
            except Exception:
                logger.exception("event=exporter_error destination=%s", destination)

    def status(self) -> dict:
        return {**spool_status(self.journal, self.spool),
                "listening": (f"{self.config.listener.ae_title}@{self.config.listener.host}:{self.listener.port}"
                              if self.listener is not None else f"Orthanc changes at {self.config.intake.url}"),
                # whether new instances (and results) are written now, and if not why: the spool's disk
                "intake": self.disk_guard.state().as_dict(),
                "retention": self.retention.status(),
                **({"orthanc_intake": self.orthanc_intake.status()} if self.orthanc_intake is not None else {})}

    def _start_status(self) -> None:
        """``GET /status`` (JSON) and the operator's page, on ``dashboard.host`` (loopback by default)."""
        from onevlm.dashboard.server import DashboardApp
        from onevlm.dashboard.web import make_page_server

        from onevlm.net.metrics import ServiceMetrics

        app = DashboardApp(self.config, self.journal, self.cards, self.router.calibration, self.status,
                           health=self.health)
        app.metrics = ServiceMetrics(self.journal, self.config.spool_dir, [d.name for d in self.config.destinations],
                                     accepting=self.disk_guard.accepting)
        self.processor.on_processed = app.metrics.observe_processing
        self._status_server = make_page_server(app, self.config.dashboard.host, self.config.status_port)
        self._spawn("status", self._status_server.serve_forever)
        logger.info("event=dashboard_listening url=%s", self.dashboard_url)

    @property
    def dashboard_url(self) -> str | None:
        """Where the operator's page answers (``None`` without ``status_port``)."""
        return None if self._status_server is None else self._status_server.url

    def stop(self) -> None:
        self._stop.set()
        if self.listener is not None:
            self.listener.stop()
        if self._listener_stop is not None:
            self._listener_stop.set()
            for process in self._listener_processes:
                process.join(timeout=10)
        for _ in range(self.config.workers):
            self._queue.put(None)
        if self._status_server is not None:
            self._status_server.shutdown()
        for thread in self._threads:
            thread.join(timeout=30)
        self.journal.close()
        self.owner.release()


def spool_status(journal: Journal, spool: Spool) -> dict:
    """The status counts: the journal's, and the quarantined files in the spool."""
    return {**journal.status(), "quarantine_files": spool.quarantined()}


def open_journal(config: ServiceConfig) -> Journal:
    """The journal of an existing spool (the service running or not).

    Raises
    ------
    FileNotFoundError
        If the service never ran with this spool.
    onevlm.net.journal_schema.JournalSchemaError
        If the journal's schema is not this release's (the service migrates an older one on start).
    """
    if not config.journal_path.exists():
        raise FileNotFoundError(f"no journal at {config.journal_path}: the service has not run with this spool")
    return Journal(config.journal_path, migrate=False)  # a reader: the service migrates, not `onevlm status`


def read_status(config: ServiceConfig) -> dict:
    """Status counts read from the journal (works whether or not the service runs).

    Besides the counts: the routing counts over every current result, what retention did and holds
    (``retention``: its totals, open clean-ups, how far over the cap the spool was at the last pass) and
    whether the spool's disk has room for new instances now (``intake``: what the service would answer).
    """
    from onevlm.net.disk_space import DiskGuard
    from onevlm.net.retention import retention_status

    journal = open_journal(config)
    try:
        problem = DiskGuard(config.spool_dir, config.disk).problem()
        return {**spool_status(journal, Spool(config.spool_dir, config.group_by)), **journal.routing_counts(),
                "intake": {"accepting": problem is None, "reason": problem},
                "retention": {"enabled": config.retention.enabled, **retention_status(journal),
                              "max_spool_bytes": config.retention.max_spool_bytes}}
    finally:
        journal.close()
