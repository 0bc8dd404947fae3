"""From completed studies to dispatched jobs: routing events, re-dispatching what is due.

:class:`Scheduler` runs in every ``serve`` process (and in ``dicom-ai worker``). Each tick it

1. takes pending ``study.complete`` events (each is taken by one process only), matches every
   series of the study against ``[[routes]]``, records each decision (a series that matches no
   route is recorded as unrouted: visible, never silently dropped) and creates one job per
   matching route covering the matching series;
2. hands due jobs to the dispatcher: new ones, retries whose delay has passed, waiting ones
   (a full disk or an unavailable index) every ``workers.resource_wait_seconds``, pending ones
   not picked up in time, and running ones whose worker's lease expired.

The two steps fail independently (an event that cannot be routed does not hold up dispatch),
and an index outage is logged once, not at every poll: the loop keeps polling until it is back.

The dispatcher only carries job ids; the job rows are the truth.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from dicom_ai.config import Settings
from dicom_ai.exceptions import DicomReadError, safe_message
from dicom_ai.periodic import PeriodicWorker
from dicom_ai.routing import evaluate_file
from storage import batches, jobs
from storage.db import Database
from storage.repository import STUDY_COMPLETE, pending_events

LOGGER = logging.getLogger(__name__)

__all__ = ["Dispatcher", "Scheduler"]


class Dispatcher(Protocol):
    """Carries job ids to workers (the local pool or a Celery broker)."""

    def submit(self, job_ids: list[int]) -> None:
        """Hand jobs to workers; the same id twice is harmless (one claim wins)."""


class Scheduler(PeriodicWorker):
    """Routes completion events into jobs and dispatches due jobs, on a polling thread.

    Parameters
    ----------
    settings : Settings
        Routes, worker policy.
    db : Database
        The shared database.
    dispatcher : Dispatcher, optional
        Where due jobs go; None routes only (jobs then wait for a worker's own scheduler).
    """

    def __init__(self, settings: Settings, db: Database,
                 dispatcher: Dispatcher | None) -> None:
        self.settings = settings
        self.db = db
        self.store = settings.storage.file_store()
        self.dispatcher = dispatcher
        self.on_routed: Callable[[int], None] | None = None
        # Each step on its own: a full or unavailable index (or one event that cannot be
        # routed) must not stop the other; the next poll retries. wake() (e.g. right after a
        # completion event) runs a tick now rather than at the next poll.
        super().__init__("scheduler", LOGGER,
                         [("routing completed studies", self.route_pending),
                          ("dispatching due jobs", self.dispatch_due)],
                         interval=settings.workers.poll_seconds)

    def tick(self, now: datetime | None = None) -> list[int]:
        """Route pending events and dispatch due jobs once; returns the job ids dispatched."""
        self.route_pending(now)
        return self.dispatch_due(now)

    def route_pending(self, now: datetime | None = None) -> list[int]:
        """Turn pending ``study.complete`` events into jobs; returns the new job ids."""
        created: list[int] = []
        with self.db.sessions() as session:
            events = pending_events(session, kinds=[STUDY_COMPLETE])
            session.expunge_all()
        for event in events:
            now = now or datetime.now(UTC)
            with self.db.write_session() as session:
                if not jobs.take_event(session, event.id, now):
                    continue  # another process routes it
                created += self._route_study(session, event.id, event.study_instance_uid, now)
        return created

    def _route_study(self, session: jobs.Session, event_id: int, study_uid: str,
                     now: datetime) -> list[int]:
        routes = [(r.name, dict(r.match)) for r in self.settings.routes]
        by_name = {r.name: r for r in self.settings.routes}
        only = batches.batch_route(session, study_uid)
        if only is not None:  # a batch run with --route: that route alone applies
            routes = [(name, match) for name, match in routes if name == only]
        elif batches.export_only(session, study_uid):
            for series in jobs.series_of_study(session, study_uid):
                jobs.record_decision(session, event_id=event_id, study_instance_uid=study_uid,
                                     series_instance_uid=series.series_instance_uid,
                                     route=None, job_id=None,
                                     reason="retrieved for a training-set export: not routed",
                                     now=now)
            return []
        matched: dict[str, list[str]] = defaultdict(list)
        reasons: dict[str, list[tuple[str, str | None, str]]] = defaultdict(list)
        for series in jobs.series_of_study(session, study_uid):
            try:
                results = evaluate_file(routes, self.store.absolute(series.first_path),
                                        series.calling_ae_titles)
            except DicomReadError as exc:
                jobs.record_decision(session, event_id=event_id, study_instance_uid=study_uid,
                                     series_instance_uid=series.series_instance_uid,
                                     route=None, job_id=None, reason=safe_message(exc),
                                     now=now)
                continue
            hits = [r for r in results if r.matched]
            if not hits:
                why = "; ".join(f"{r.route}: {r.reason}" for r in results) or "no routes"
                jobs.record_decision(session, event_id=event_id, study_instance_uid=study_uid,
                                     series_instance_uid=series.series_instance_uid,
                                     route=None, job_id=None, reason=f"unrouted ({why})",
                                     now=now)
                LOGGER.info("study %s series %s matches no route", study_uid,
                            series.series_instance_uid)
                continue
            for hit in hits:
                matched[hit.route].append(series.series_instance_uid)
                reasons[hit.route].append((series.series_instance_uid, hit.route, hit.reason))
        created: list[int] = []
        for route_name, series_uids in matched.items():
            route = by_name[route_name]
            job = jobs.create_job(
                session, study_instance_uid=study_uid, series_instance_uids=series_uids,
                route=route_name, model_name=route.model,
                max_attempts=self.settings.workers.max_attempts, event_id=event_id, now=now)
            for series_uid, name, reason in reasons[route_name]:
                jobs.record_decision(session, event_id=event_id, study_instance_uid=study_uid,
                                     series_instance_uid=series_uid, route=name, job_id=job.id,
                                     reason=reason, now=now)
            created.append(job.id)
            LOGGER.info("study %s -> route %s: job %d (%d series, model %s)", study_uid,
                        route_name, job.id, len(series_uids), route.model)
        return created

    def dispatch_due(self, now: datetime | None = None) -> list[int]:
        """Hand every due job to the dispatcher (see :func:`storage.jobs.due_jobs`)."""
        if self.dispatcher is None:
            return []
        with self.db.write_session() as session:
            due = jobs.due_jobs(session, now=now or datetime.now(UTC),
                                redispatch_after=self.settings.workers.redispatch_seconds)
        if due:
            try:
                self.dispatcher.submit(due)
            except Exception:  # the broker is down: the rows stay due and go out later
                LOGGER.exception("dispatching jobs %s failed; will retry", due)
                with self.db.write_session() as session:
                    jobs.undispatch(session, due)
                return []
        return due
