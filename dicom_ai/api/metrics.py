"""Prometheus metrics: the index's state at scrape time, plus this process's DIMSE traffic.

Two sources:

* The database holds the state of the whole installation (instance rows, quarantine rows, jobs,
  outbox rows), written by every receiver and worker process on every host; it is read at
  scrape time, so every serve process answers the same. "Instances" is the number in the index
  (a duplicate kept as the first copy is not counted again), read with its byte total from
  running totals the index keeps in each write's transaction (a few rows, whatever the size of
  the store: :func:`storage.metrics.instance_totals`); "instances rejected" is the
  quarantine by DIMSE status. The inference-latency histogram is built from the stage timings
  of jobs that finish while this process runs, and the skip counters from their notes: jobs
  the model took no series of (not applicable) and series skipped by reason class
  (:data:`~dicom_ai.runner.analysis.SKIP_REASONS`: never a UID or an attribute value). The
  input-drift gauges count, per model, the images scored against its training distribution in
  the last hour and the share of them flagged outside it (:mod:`dicom_ai.inference.ood`), by an
  indexed query over that hour's findings.
* :class:`~dicom_ai.network.counters.ReceiverCounters` count what the index cannot tell, as it
  happens in this serve process's receivers: associations (accepted, rejected by reason,
  released, aborted), every C-STORE answer by status (including refusals that leave no file,
  such as a full disk), bytes received, requests per DIMSE service, TCP connections open now
  (associated or not: a connection that never sends its association request shows here, not
  among the associations), connections refused on accept and presentation contexts refused at
  negotiation (by result; the SOP class UID is in the log). With several hosts,
  each serve process reports its own and Prometheus sums them (``sum without (instance)``).

Counters start from zero when the process starts, as Prometheus expects.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dicom_ai.network.counters import ReceiverCounters
from dicom_ai.runner.analysis import SKIP_REASONS, skip_reasons
from storage import jobs
from storage import metrics as storage_metrics
from storage.db import Database, DatabaseError

LOGGER = logging.getLogger(__name__)

#: Upper bounds (seconds) of the inference-latency buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Jobs are looked for again this far back, in case one committed late (its finished_at is set
# before its transaction commits).
_OVERLAP = timedelta(seconds=120)
#: The input-drift gauges' window.
DRIFT_WINDOW = timedelta(hours=1)

METRIC_NAMES = (
    "dicom_ai_database_up",
    "dicom_ai_instances",
    "dicom_ai_instance_bytes",
    "dicom_ai_studies",
    "dicom_ai_instances_rejected",
    "dicom_ai_jobs",
    "dicom_ai_jobs_due",
    "dicom_ai_batches",
    "dicom_ai_results_sent_total",
    "dicom_ai_results_pending",
    "dicom_ai_results_failing",
    "dicom_ai_results_committed",
    "dicom_ai_results_awaiting_commitment",
    "dicom_ai_outbox_oldest_pending_age_seconds",
    "dicom_ai_store_free_bytes",
    "dicom_ai_results_writable",
    "dicom_ai_inference_seconds",
    "dicom_ai_ood_scored_last_hour",
    "dicom_ai_ood_flagged_ratio_last_hour",
    "dicom_ai_jobs_not_applicable_total",
    "dicom_ai_series_skipped_total",
    "dicom_ai_associations_total",
    "dicom_ai_association_rejections_total",
    "dicom_ai_associations_active",
    "dicom_ai_store_responses_total",
    "dicom_ai_received_bytes_total",
    "dicom_ai_dimse_requests_total",
    "dicom_ai_connections_open",
    "dicom_ai_connections_unassociated",
    "dicom_ai_connections_refused_total",
    "dicom_ai_presentation_contexts_refused_total",
)


class _Latency:
    """Cumulative inference-latency histograms and skip counts per model, fed from finished
    jobs (each job once, read by the index on ``finished_at`` over a bounded window)."""

    def __init__(self, started: datetime) -> None:
        self.watermark = started
        self.started = started
        self.seen: dict[int, datetime] = {}
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.models: set[str] = set()
        self.not_applicable: dict[str, int] = {}
        self.skipped: dict[tuple[str, str], int] = {}

    def feed(self, db: Database) -> None:
        since = max(self.started, self.watermark - _OVERLAP)
        with db.sessions() as session:
            finished = storage_metrics.finished_since(session, since)
        for job in finished:
            if job.id in self.seen:
                continue
            self.seen[job.id] = job.finished_at
            self.watermark = max(self.watermark, job.finished_at)
            self._count_skips(job)
            seconds = job.timings.get("inference")
            if seconds is None:
                continue
            counts = self.counts.setdefault(job.model_name, [0] * (len(BUCKETS) + 1))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1  # +Inf
            self.sums[job.model_name] = self.sums.get(job.model_name, 0.0) + seconds
        horizon = self.watermark - _OVERLAP
        self.seen = {k: v for k, v in self.seen.items() if v >= horizon}

    def _count_skips(self, job: storage_metrics.FinishedJob) -> None:
        model = job.model_name
        self.models.add(model)
        if job.note and job.note.startswith("not applicable: "):  # no series taken
            self.not_applicable[model] = self.not_applicable.get(model, 0) + 1
        for classes in skip_reasons(job.note):
            for reason in classes:
                self.skipped[model, reason] = self.skipped.get((model, reason), 0) + 1

    def skip_families(self) -> Iterable[Metric]:
        """The skip counters; every model seen starts at 0 in every reason class."""
        jobs = CounterMetricFamily(
            "dicom_ai_jobs_not_applicable",
            "Jobs done without a result because the model took none of their series (scope "
            "gate or preprocessing; the reasons are on the job), by model, for jobs finished "
            "since this process started", labels=["model"])
        series = CounterMetricFamily(
            "dicom_ai_series_skipped",
            "Series the model skipped (all or some of their images), by model and reason "
            "class: " + ", ".join(SKIP_REASONS) + "; for jobs finished since this process "
            "started", labels=["model", "reason"])
        for model in sorted(self.models):
            jobs.add_metric([model], self.not_applicable.get(model, 0))
            for reason in SKIP_REASONS:
                series.add_metric([model, reason], self.skipped.get((model, reason), 0))
        yield jobs
        yield series

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "dicom_ai_inference_seconds",
            "Model inference time per job (the inference stage only), by model, for jobs "
            "finished since this process started", labels=["model"])
        for model, counts in sorted(self.counts.items()):
            buckets = [(str(bound), float(n)) for bound, n in zip(BUCKETS, counts, strict=False)]
            buckets.append(("+Inf", float(counts[-1])))
            family.add_metric([model], buckets, self.sums[model])
        return family


class DatabaseCollector(Collector):
    """Collects every dicom-ai metric from the index and the store at scrape time.

    Parameters
    ----------
    db : Database
        The index.
    store_root : Path
        The store, for its free space.
    counters : ReceiverCounters, optional
        This process's DIMSE traffic counters (none: those metrics are left out).
    results_min_free_bytes : int
        ``storage.results_min_free_bytes``, for ``dicom_ai_results_writable``.
    """

    def __init__(self, db: Database, store_root: Path,
                 counters: ReceiverCounters | None = None, *,
                 results_min_free_bytes: int = 0) -> None:
        self.db = db
        self.store_root = store_root
        self.counters = counters
        self.results_min_free_bytes = results_min_free_bytes
        self._lock = threading.Lock()
        self._latency = _Latency(datetime.now(UTC))

    def collect(self) -> Iterable[Metric]:
        """Yield the metric families (called by the registry on each scrape)."""
        with self._lock:
            yield from self._collect()

    def _collect(self) -> Iterable[Metric]:
        yield from self._traffic()
        now = datetime.now(UTC)
        up = GaugeMetricFamily("dicom_ai_database_up",
                               "1 if the index database answered this scrape")
        try:
            with self.db.sessions() as session:
                snap = storage_metrics.metrics_snapshot(session, now=now)
                drift = jobs.ood_counts(session, since=now - DRIFT_WINDOW)
            self._latency.feed(self.db)
        except DatabaseError as exc:
            LOGGER.warning("metrics: the database did not answer: %s", exc.__class__.__name__)
            up.add_metric([], 0)
            yield up
            yield from self._disk()
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("dicom_ai_instances", "Instances in the index (received and "
                                "kept)", value=snap.instances)
        yield GaugeMetricFamily("dicom_ai_instance_bytes", "Bytes of the instances in the "
                                "index", value=snap.instance_bytes)
        yield _labelled(GaugeMetricFamily, "dicom_ai_studies", "Studies by state", "state",
                        snap.studies_by_state)
        yield _labelled(GaugeMetricFamily, "dicom_ai_instances_rejected",
                        "Refused instances kept in quarantine, by DIMSE status", "status",
                        {f"0x{status:04X}": n for status, n in snap.rejected_by_status.items()})
        yield _labelled(GaugeMetricFamily, "dicom_ai_jobs", "Jobs by state", "state",
                        snap.jobs_by_state)
        yield GaugeMetricFamily("dicom_ai_jobs_due", "Queue depth: pending jobs that are due "
                                "now", value=snap.jobs_due)
        yield _labelled(GaugeMetricFamily, "dicom_ai_batches", "Query/retrieve batches by "
                        "state", "state", snap.batches_by_state)
        for cls, name, doc, values in (
            (CounterMetricFamily, "dicom_ai_results_sent", "Result objects (SR, SEG, "
             "heat-map SC) delivered, by destination and kind", snap.sent),
            (GaugeMetricFamily, "dicom_ai_results_pending", "Result objects waiting for "
             "delivery, by destination and kind", snap.pending),
            (GaugeMetricFamily, "dicom_ai_results_failing", "Pending result objects whose "
             "last delivery attempt failed, by destination and kind", snap.failing),
            # Storage Commitment (PS3.4 annex J): rows in the index, so gauges (retention
            # deletes old rows); committed ones are also counted in results_sent.
            (GaugeMetricFamily, "dicom_ai_results_committed", "Result objects the "
             "destination reported committed (storage commitment), by destination and kind",
             snap.committed),
            (GaugeMetricFamily, "dicom_ai_results_awaiting_commitment", "Result objects sent "
             "whose storage commitment report is outstanding, by destination and kind",
             snap.awaiting),
        ):
            family = cls(name, doc, labels=["destination", "kind"])
            for (destination, kind), n in sorted(values.items()):
                family.add_metric([destination, kind], n)
            yield family
        age = GaugeMetricFamily("dicom_ai_outbox_oldest_pending_age_seconds",
                                "Age of the oldest undelivered result, by destination",
                                labels=["destination"])
        for destination, created in sorted(snap.oldest_pending.items()):
            age.add_metric([destination], max(0.0, (now - created).total_seconds()))
        yield age
        yield from self._disk()
        yield self._latency.family()
        yield from _drift(drift)
        yield from self._latency.skip_families()

    def _traffic(self) -> Iterable[Metric]:
        """The receivers' counters (process-local, so they answer when the database does not)."""
        if self.counters is None:
            return
        snap = self.counters.snapshot()
        # prometheus_client adds the _total suffix to counter families itself.
        for name, doc, label, values in (
            ("dicom_ai_associations", "DICOM associations by outcome (accepted, rejected, "
             "released, aborted)", "outcome", snap["association"]),
            ("dicom_ai_association_rejections", "Rejected associations by reason", "reason",
             snap["rejection"]),
            ("dicom_ai_store_responses", "C-STORE answers by DIMSE status (0x0000 stored; "
             "0xA700 out of resources; 0xA900/0xC000 refused and quarantined)", "status",
             snap["store"]),
            ("dicom_ai_dimse_requests", "DIMSE requests by service", "service",
             snap["request"]),
            ("dicom_ai_connections_refused", "TCP connections closed as soon as accepted, by "
             "reason (per-host limit: the host already held max_connections_per_host)",
             "reason", snap["refusal"]),
            ("dicom_ai_presentation_contexts_refused", "Presentation contexts refused at "
             "association negotiation, by reason (abstract syntax not supported: a SOP class we "
             "do not accept; transfer syntaxes not supported); the SOP class UID is logged",
             "reason", snap["context"]),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, n in values.items():
                family.add_metric([key], n)
            yield family
        yield CounterMetricFamily("dicom_ai_received_bytes", "Bytes of the instances stored "
                                  "(C-STORE answered 0x0000)", value=snap["bytes"][""])
        outcomes, connections = snap["association"], snap["connection"]
        active = max(0, outcomes["accepted"] - outcomes["released"] - outcomes["aborted"])
        open_now = max(0, connections["opened"] - connections["closed"])
        yield GaugeMetricFamily(
            "dicom_ai_associations_active", "Associations open now (accepted, not yet ended)",
            value=active)
        yield GaugeMetricFamily(
            "dicom_ai_connections_open", "TCP connections the receivers hold open now, "
            "associated or not", value=open_now)
        yield GaugeMetricFamily(
            "dicom_ai_connections_unassociated", "Open TCP connections without an association "
            "now: not yet requested (closed after association_request_timeout), rejected, or "
            "closing", value=max(0, open_now - active))

    def _disk(self) -> Iterable[Metric]:
        free = GaugeMetricFamily("dicom_ai_store_free_bytes",
                                 "Free bytes on the store's filesystem")
        try:
            free.add_metric([], shutil.disk_usage(self.store_root).free)
        except OSError:
            return
        yield free
        from dicom_ai.resources import results_space_problem

        # 0 while jobs wait for room for their results (the reason is on /ready and the jobs).
        yield GaugeMetricFamily(
            "dicom_ai_results_writable", "1 if results can be written now (store writable, "
            "free space at or above storage.results_min_free_bytes), else 0: jobs then wait",
            value=0 if results_space_problem(self.store_root,
                                             self.results_min_free_bytes) else 1)


def _drift(counts: dict[str, tuple[int, int]]) -> Iterable[Metric]:
    """The input-drift gauges: per model, images scored in the last hour and the share flagged
    outside its training distribution (absent for a model that scored none)."""
    scored = GaugeMetricFamily(
        "dicom_ai_ood_scored_last_hour", "Images scored against the model's training "
        "distribution in the last hour, by model", labels=["model"])
    ratio = GaugeMetricFamily(
        "dicom_ai_ood_flagged_ratio_last_hour", "Share of the last hour's scored images whose "
        "out-of-distribution score was above the model's threshold (about 0.01 on inputs like "
        "the training data; a rise is input drift), by model", labels=["model"])
    for model, (n, flagged) in sorted(counts.items()):
        scored.add_metric([model], n)
        if n:
            ratio.add_metric([model], flagged / n)
    yield scored
    yield ratio


def _labelled(cls: type[GaugeMetricFamily], name: str, doc: str, label: str,
              values: dict[str, int]) -> GaugeMetricFamily:
    family = cls(name, doc, labels=[label])
    for key, n in sorted(values.items()):
        family.add_metric([key], n)
    return family


def make_registry(db: Database, store_root: Path,
                  counters: ReceiverCounters | None = None, *,
                  results_min_free_bytes: int = 0) -> CollectorRegistry:
    """A registry of its own (one per app, so tests can run several) with our collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(db, store_root, counters,
                                        results_min_free_bytes=results_min_free_bytes))
    return registry
