"""Prometheus metrics of the service (``GET /metrics``), with ``prometheus-client``.

Most figures are read at scrape time from what the service keeps durably — the journal's counters,
outbox and series figures (written with each group's results), the spool's disk — so they survive restarts and
agree with ``/status`` and the operator's page. One figure is observed as work happens: how long
each study took to process (a histogram since the process started, as Prometheus expects of a
histogram).

Names (all prefixed ``onevlm_``):

- ``instances_total{state}`` received, duplicates, quarantined, refused (counters);
- ``groups{status}`` receiving, queued, processing, done, failed (now);
- ``series_outcomes{outcome}`` routed, routed-set, review, stopped, skipped, failed (current results);
- ``route_confidence`` the routed series' confidence over current results (a gauge histogram);
- ``group_processing_seconds`` study processing time (histogram);
- ``exports{destination,status}`` pending, sent, failed, superseded (now);
  ``export_failures_total`` failed attempts;
- ``vlm_calls`` the router's VLM calls over current results; ``disagreements`` series whose header
  and image disagree; ``series_failed`` series without a decision (unreadable image, an error);
- ``spool_bytes`` the spool's size (recounted at most every 30 s), ``spool_disk_free_bytes`` and
  ``spool_disk_total_bytes``;
- ``intake_accepting`` 1 while new instances are stored, 0 while the spool's disk is too full (C-STOREs
  are refused, the Orthanc intake and result writing wait: :mod:`onevlm.net.disk_space`);
- ``retention_removed_files_total`` and ``retention_freed_bytes_total`` what the clean-ups removed (counters),
  ``retention_over_cap_bytes`` how far over ``retention.max_spool_bytes`` the spool was at the last clean-up.

Research use only.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from onevlm.net.health import disk_space
from onevlm.net.journal import Journal
from onevlm.net.spool import folder_bytes
from onevlm.reports.series_figures import OUTCOMES

#: Upper bounds of the confidence buckets (the last, +Inf, is added by Prometheus).
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
#: Upper bounds of the processing-time buckets, seconds.
PROCESSING_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
#: How long a counted spool size is reused.
SPOOL_RECOUNT_SECONDS = 30.0
INSTANCE_STATES = ("received", "duplicates", "quarantined", "refused")
GROUP_STATES = ("receiving", "queued", "processing", "done", "failed")
EXPORT_STATES = ("pending", "sent", "failed", "superseded")


class ServiceMetrics:
    """The service's metrics registry.

    Parameters
    ----------
    journal:
        The service's journal.
    spool_dir:
        The spool (its size and its disk).
    destinations:
        The configured destination names (each gets its export figures, zero or not).
    accepting:
        Whether the service stores new instances now (the disk guard's answer); ``None``: no such figure.
    """

    def __init__(self, journal: Journal, spool_dir: Path, destinations: list[str],
                 accepting: Callable[[], bool] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.registry = CollectorRegistry(auto_describe=False)
        self.processing = Histogram("onevlm_group_processing_seconds", "Seconds to process one study (group)",
                                    buckets=PROCESSING_BUCKETS, registry=self.registry)
        self.registry.register(_DurableFigures(journal, spool_dir, destinations, accepting))

    def observe_processing(self, seconds: float) -> None:
        """Record one study's processing time."""
        self.processing.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _DurableFigures:
    """A collector reading the journal and the disk at each scrape (aggregates: the cost does not grow with the
    number of results kept)."""

    def __init__(self, journal: Journal, spool_dir: Path, destinations: list[str],
                 accepting: Callable[[], bool] | None = None) -> None:
        self.journal, self.spool_dir, self.destinations = journal, spool_dir, destinations
        self.accepting = accepting
        self._spool_bytes: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily

        status = self.journal.status()
        instances = CounterMetricFamily("onevlm_instances", "DICOM instances by what became of them", labels=["state"])
        for state in INSTANCE_STATES:
            instances.add_metric([state], status.get(state, 0))
        yield instances
        groups = GaugeMetricFamily("onevlm_groups", "Studies (groups) by status now", labels=["status"])
        for state in GROUP_STATES:
            groups.add_metric([state], status["groups"].get(state, 0))
        yield groups

        exports = GaugeMetricFamily("onevlm_exports", "Result objects in the outbox by destination and status",
                                    labels=["destination", "status"])
        by_destination = {d.name: d.by_status for d in self.journal.destination_health()}
        for name in sorted(set(self.destinations) | set(by_destination)):
            for state in EXPORT_STATES:
                exports.add_metric([name, state], by_destination.get(name, {}).get(state, 0))
        yield exports
        failures = CounterMetricFamily("onevlm_export_failures", "Failed export attempts")
        failures.add_metric([], status.get("export_failures", 0))
        yield failures

        by_outcome = self.journal.outcome_counts()
        outcomes = GaugeMetricFamily("onevlm_series_outcomes", "Series by routing outcome (current results)",
                                     labels=["outcome"])
        for outcome in OUTCOMES:
            outcomes.add_metric([outcome], by_outcome.get(outcome, 0))
        yield outcomes
        at_or_under, count, total = self.journal.routed_confidences(CONFIDENCE_BUCKETS)
        buckets = [(f"{bound:g}", n) for bound, n in zip(CONFIDENCE_BUCKETS, at_or_under)]
        buckets.append(("+Inf", count))
        histogram = GaugeHistogramMetricFamily("onevlm_route_confidence",
                                               "Confidence of the routed series (current results)",
                                               buckets=buckets, gsum_value=total)
        yield histogram
        routing = self.journal.routing_counts()
        calls = GaugeMetricFamily("onevlm_vlm_calls", "The router's VLM calls over the current results")
        calls.add_metric([], routing["vlm_calls"])
        yield calls
        disagreements = GaugeMetricFamily("onevlm_disagreements", "Series whose header and image disagree")
        disagreements.add_metric([], routing["disagreements"])
        yield disagreements
        yield GaugeMetricFamily("onevlm_series_failed", "Series of the current results without a decision: the "
                                "image could not be read, or routing or writing the result failed",
                                value=routing["series_failed"])

        space = disk_space(self.spool_dir)
        yield GaugeMetricFamily("onevlm_spool_bytes", "Bytes under the spool folder", value=self._spool_size())
        yield GaugeMetricFamily("onevlm_spool_disk_free_bytes", "Free bytes on the spool's disk", value=space.free)
        yield GaugeMetricFamily("onevlm_spool_disk_total_bytes", "Size of the spool's disk", value=space.total)
        removed = CounterMetricFamily("onevlm_retention_removed_files", "Spool files retention removed or reduced "
                                      "to a header-only copy")
        removed.add_metric([], self.journal.counter("retention_removed_files"))
        yield removed
        freed = CounterMetricFamily("onevlm_retention_freed_bytes", "Bytes retention freed in the spool")
        freed.add_metric([], self.journal.counter("retention_freed_bytes"))
        yield freed
        yield GaugeMetricFamily("onevlm_retention_over_cap_bytes", "Bytes the spool was over retention.max_spool_bytes "
                                "at the last clean-up (0: under, or no cap)",
                                value=self.journal.cursor("retention_over_cap_bytes"))
        if self.accepting is not None:
            yield GaugeMetricFamily("onevlm_intake_accepting", "1 while new instances are stored, 0 while the "
                                    "spool's disk is too full", value=int(bool(self.accepting())))

    def _spool_size(self) -> int:
        with self._lock:
            now = time.monotonic()
            if self._spool_bytes is None or now - self._spool_bytes[0] > SPOOL_RECOUNT_SECONDS:
                self._spool_bytes = (now, folder_bytes(self.spool_dir))
            return self._spool_bytes[1]


