"""Batches: the studies a query/retrieve batch found, retrieved and processed.

A batch is resumable because every step is a row: studies found (unique per batch), retrieved
(state, counts) or failed (error, attempts). Processing is not duplicated here: it is read from
the jobs, findings and outbox of the normal flow (:mod:`storage.jobs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from storage import outbox as outbox_rows
from storage.models import (
    COMPLETE,
    DONE,
    FAILED,
    UNFINISHED,
    Batch,
    BatchStudy,
    Event,
    FindingRecord,
    Instance,
    Job,
    OutboxItem,
    ResultObject,
    RoutingDecision,
    Series,
    Study,
)
from storage.paging import Order, keyset
from storage.repository import STUDY_COMPLETE

#: A batch an operator cancelled (API or CLI): runners stop, resume refuses it.
CANCELLED = "cancelled"

# Batch study states.
FOUND = "found"
RETRIEVED = "retrieved"
RETRIEVE_FAILED = "failed"


def create_batch(session: Session, *, kind: str, source: str, route: str | None,
                 query: dict[str, Any], now: datetime) -> Batch:
    """A new batch row (state ``created``)."""
    batch = Batch(kind=kind, source=source, route=route, query=dict(query),
                  state="created", created_at=now, updated_at=now)
    session.add(batch)
    session.flush()
    return batch


def get_batch(session: Session, batch_id: int) -> Batch | None:
    """One batch by id."""
    return session.get(Batch, batch_id)


def list_batches(session: Session, *, after: int | None = None, limit: int = 50,
                 order: Order = "desc", state: str | None = None) -> list[Batch]:
    """Batches, one keyset page (:mod:`storage.paging`); ``desc`` is newest first."""
    query = select(Batch)
    if state is not None:
        query = query.where(Batch.state == state)
    return list(session.scalars(keyset(query, Batch.id, after, limit, order)).all())


def batch_study_counts(session: Session, batch_id: int) -> dict[str, int]:
    """A batch's studies by retrieve state (``found``, ``retrieved``, ``failed``)."""
    rows = session.execute(
        select(BatchStudy.state, func.count(BatchStudy.id))
        .where(BatchStudy.batch_id == batch_id).group_by(BatchStudy.state)
    ).all()
    return {str(state): int(n) for state, n in rows}


def set_state(session: Session, batch_id: int, state: str, now: datetime, *,
              error: str | None = None, found: bool = False) -> None:
    """Move a batch to `state` (and record that finding is done, or an error).

    A cancelled batch is left as it is.
    """
    values: dict[str, Any] = {"state": state, "updated_at": now, "error": error}
    if found:
        values["found_at"] = now
    # A cancelled batch stays cancelled: a runner finishing late must not overwrite it.
    session.execute(update(Batch).where(Batch.id == batch_id, Batch.state != CANCELLED)
                    .values(**values))


@dataclass(frozen=True)
class FoundStudy:
    """A C-FIND match at study level."""

    study_instance_uid: str
    accession_number: str = ""
    study_date: str = ""
    expected_instances: int | None = None


def add_found(session: Session, batch_id: int, studies: Sequence[FoundStudy]) -> int:
    """Record found studies; a study already in the batch is kept as it is. Returns new rows."""
    if not studies:
        return 0
    rows = [{"batch_id": batch_id, "study_instance_uid": s.study_instance_uid,
             "accession_number": s.accession_number[:16], "study_date": s.study_date[:8],
             "state": FOUND, "expected_instances": s.expected_instances,
             "retrieved_instances": 0, "failed_suboperations": 0, "attempts": 0}
            for s in studies]
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    result = session.execute(
        insert(BatchStudy).values(rows).on_conflict_do_nothing(
            index_elements=["batch_id", "study_instance_uid"])
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def studies(session: Session, batch_id: int, *, state: str | None = None) -> list[BatchStudy]:
    """A batch's studies in the order they were found."""
    query = select(BatchStudy).where(BatchStudy.batch_id == batch_id).order_by(BatchStudy.id)
    if state is not None:
        query = query.where(BatchStudy.state == state)
    return list(session.scalars(query).all())


def local_instance_count(session: Session, study_instance_uid: str) -> int:
    """How many instances of a study the store already holds."""
    return int(session.scalar(
        select(func.count(Instance.id)).join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.study_instance_uid == study_instance_uid)
    ) or 0)


def has_current_results(session: Session, study_instance_uid: str,
                        versions: dict[str, str]) -> bool:
    """Whether a study has results of the given model versions: a done job of one of the
    routes in `versions` (route name -> active model version) that ran that version."""
    if not versions:
        return False
    clauses = [and_(Job.route == route, Job.model_version == version)
               for route, version in versions.items()]
    return session.scalar(
        select(Job.id).where(Job.study_instance_uid == study_instance_uid, Job.state == DONE,
                             or_(*clauses)).limit(1)
    ) is not None


def has_stale_results(session: Session, study_instance_uid: str,
                      versions: dict[str, str]) -> bool:
    """Whether a study has results of one of the routes in `versions` made by another model
    version than the active one (and none of the active one)."""
    if not versions or has_current_results(session, study_instance_uid, versions):
        return False
    return session.scalar(
        select(Job.id).where(Job.study_instance_uid == study_instance_uid, Job.state == DONE,
                             Job.route.in_(list(versions))).limit(1)
    ) is not None


def request_routing(session: Session, study_instance_uid: str, now: datetime) -> bool:
    """Have the scheduler route a complete study again (its results are of an older model
    version, and a batch found every instance already held, so nothing re-opened it).

    Nothing is added while the study is receiving (its completion routes it), has a job
    pending or running, or an unrouted completion event. Returns True if an event was added.
    """
    state = session.scalar(select(Study.state).where(
        Study.study_instance_uid == study_instance_uid))
    if state != COMPLETE:
        return False
    busy = session.scalar(select(Job.id).where(
        Job.study_instance_uid == study_instance_uid,
        Job.state.in_(UNFINISHED)).limit(1))
    waiting = session.scalar(select(Event.id).where(
        Event.study_instance_uid == study_instance_uid, Event.kind == STUDY_COMPLETE,
        Event.consumed_at.is_(None)).limit(1))
    if busy is not None or waiting is not None:
        return False
    session.add(Event(kind=STUDY_COMPLETE, study_instance_uid=study_instance_uid,
                      series_instance_uid=None, reason="batch", created_at=now))
    return True


def mark_retrieved(session: Session, row_id: int, *, instances: int, failed: int,
                   now: datetime) -> None:
    """The study is in our store (``failed`` sub-operations, if any, are recorded)."""
    session.execute(update(BatchStudy).where(BatchStudy.id == row_id).values(
        state=RETRIEVED, retrieved_instances=instances, failed_suboperations=failed,
        retrieved_at=now, error=None, attempts=BatchStudy.attempts + 1))


def mark_failed(session: Session, row_id: int, *, error: str, failed: int = 0) -> None:
    """Retrieval failed (this attempt); a resumed batch tries again."""
    session.execute(update(BatchStudy).where(BatchStudy.id == row_id).values(
        state=RETRIEVE_FAILED, error=error[:2000], failed_suboperations=failed,
        attempts=BatchStudy.attempts + 1))


def batch_route(session: Session, study_instance_uid: str) -> str | None:
    """The route a batch restricts this study to (the newest batch with a route), if any."""
    return session.scalars(
        select(Batch.route).join(BatchStudy, BatchStudy.batch_id == Batch.id)
        .where(BatchStudy.study_instance_uid == study_instance_uid, Batch.route.is_not(None),
               Batch.kind == "run")
        .order_by(Batch.id.desc()).limit(1)
    ).first()


def export_only(session: Session, study_instance_uid: str) -> bool:
    """The study came only through export batches (so it must not be routed to models)."""
    kinds = set(session.scalars(
        select(Batch.kind).join(BatchStudy, BatchStudy.batch_id == Batch.id)
        .where(BatchStudy.study_instance_uid == study_instance_uid)
    ).all())
    return kinds == {"export"}


@dataclass
class StudyProgress:
    """Where one study of a batch stands, for the progress bar and the report."""

    study_instance_uid: str
    accession_number: str
    study_date: str
    retrieve_state: str
    expected_instances: int | None
    retrieved_instances: int
    failed_suboperations: int
    error: str | None
    job_state: str | None = None
    #: The latest job ran another model version than its route's active one.
    stale: bool = False
    routed: bool | None = None
    findings: int = 0
    present: int = 0
    sr_sent: int = 0
    sr_pending: int = 0

    @property
    def processed(self) -> bool:
        """Retrieved, and either unrouted or its job done with every SR delivered."""
        if self.retrieve_state != RETRIEVED:
            return False
        if self.routed is False:
            return True
        return self.job_state == DONE and not self.stale and self.sr_pending == 0

    @property
    def failed(self) -> bool:
        """Retrieval failed, or the study's job failed for good."""
        return self.retrieve_state == RETRIEVE_FAILED or self.job_state == FAILED


#: Studies looked up per query by :func:`progress` (well under SQLite's bound-parameter limit).
_CHUNK = 500


def progress(session: Session, batch_id: int, route: str | None = None,
             versions: dict[str, str] | None = None) -> list[StudyProgress]:
    """Every study of a batch with its retrieval, job, findings and SR delivery state.

    A fixed number of queries per 500 retrieved studies, whatever the batch size: the runner
    asks for this every few seconds while a batch of thousands of studies is processed.
    With `versions` (route name -> active model version), a study whose latest job of such a
    route ran another version is not processed yet (it is routed again).
    """
    found = [StudyProgress(row.study_instance_uid, row.accession_number, row.study_date,
                           row.state, row.expected_instances, row.retrieved_instances,
                           row.failed_suboperations, row.error)
             for row in studies(session, batch_id)]
    retrieved = [item for item in found if item.retrieve_state == RETRIEVED]
    for start in range(0, len(retrieved), _CHUNK):
        _fill_processing(session, retrieved[start:start + _CHUNK], route, versions or {})
    return found


def _fill_processing(session: Session, items: Sequence[StudyProgress],
                     route: str | None, versions: dict[str, str]) -> None:
    """Routing, latest job, findings and SR delivery of `items` (retrieved studies)."""
    by_uid: dict[str, list[StudyProgress]] = {}
    for item in items:
        by_uid.setdefault(item.study_instance_uid, []).append(item)
    uids = list(by_uid)
    routed = session.execute(
        select(RoutingDecision.study_instance_uid,
               func.max(case((RoutingDecision.route.is_not(None), 1), else_=0)))
        .where(RoutingDecision.study_instance_uid.in_(uids))
        .group_by(RoutingDecision.study_instance_uid)
    ).all()
    for uid, any_route in routed:
        for item in by_uid[uid]:
            item.routed = bool(any_route)
    latest = select(Job.study_instance_uid, func.max(Job.id).label("job_id")).where(
        Job.study_instance_uid.in_(uids))
    if route is not None:
        latest = latest.where(Job.route == route)
    latest_ids = dict(session.execute(latest.group_by(Job.study_instance_uid)).all())
    if not latest_ids:
        return
    job_ids = list(latest_ids.values())
    states: dict[int, str] = {}
    stale: set[int] = set()
    for job_id, state, job_route, version in session.execute(
        select(Job.id, Job.state, Job.route, Job.model_version).where(Job.id.in_(job_ids))
    ).all():
        states[job_id] = state
        if job_route in versions and version is not None and version != versions[job_route]:
            stale.add(job_id)
    counts = {job_id: (int(total), int(present or 0)) for job_id, total, present in
              session.execute(
                  select(FindingRecord.job_id, func.count(FindingRecord.id),
                         func.sum(case((FindingRecord.present.is_(True), 1), else_=0)))
                  .where(FindingRecord.job_id.in_(job_ids)).group_by(FindingRecord.job_id)
              ).all()}
    deliveries: dict[int, tuple[int, int]] = {}
    # Grouped by the label: two renderings of the predicate carry different bind parameters,
    # which PostgreSQL does not take for the same expression.
    is_delivered_ = outbox_rows.delivered().label("delivered")
    for job_id, is_delivered, count in session.execute(
        select(ResultObject.job_id, is_delivered_, func.count(OutboxItem.id))
        .join(ResultObject, OutboxItem.result_id == ResultObject.id)
        .where(ResultObject.job_id.in_(job_ids), ResultObject.kind == "sr")
        .group_by(ResultObject.job_id, is_delivered_)
    ).all():
        # Delivered: committed, or sent to a destination without storage commitment.
        sent, pending = deliveries.get(job_id, (0, 0))
        deliveries[job_id] = ((sent + int(count), pending) if is_delivered
                              else (sent, pending + int(count)))
    for uid, job_id in latest_ids.items():
        for item in by_uid[uid]:
            item.job_state = states.get(job_id)
            item.stale = job_id in stale
            item.findings, item.present = counts.get(job_id, (0, 0))
            item.sr_sent, item.sr_pending = deliveries.get(job_id, (0, 0))
