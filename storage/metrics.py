"""What ``/metrics`` reads from the database: one snapshot of counts per scrape, and the jobs
finished since the previous scrape (for the stage-time histograms)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, func, select, text
from sqlalchemy.orm import Session

from storage.models import (
    COMMITTED,
    PENDING,
    SENT,
    Batch,
    InstanceTotal,
    Job,
    OutboxItem,
    QuarantineRecord,
    ResultObject,
    Study,
)


@dataclass
class MetricsSnapshot:
    """What ``/metrics`` reports from the database (one read per scrape)."""

    instances: int = 0
    instance_bytes: int = 0
    studies_by_state: dict[str, int] = field(default_factory=dict)
    rejected_by_status: dict[int, int] = field(default_factory=dict)
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    jobs_due: int = 0
    batches_by_state: dict[str, int] = field(default_factory=dict)
    # (destination, kind) -> rows
    sent: dict[tuple[str, str], int] = field(default_factory=dict)
    pending: dict[tuple[str, str], int] = field(default_factory=dict)
    failing: dict[tuple[str, str], int] = field(default_factory=dict)
    # Storage Commitment: committed rows, and sent rows whose report is outstanding (in
    # neither `sent` nor `pending`); `sent` counts every delivered row (committed included).
    committed: dict[tuple[str, str], int] = field(default_factory=dict)
    awaiting: dict[tuple[str, str], int] = field(default_factory=dict)
    # destination -> creation time of its oldest pending row
    oldest_pending: dict[str, datetime] = field(default_factory=dict)


#: Above this many rows of ``instance_totals``, a read folds the rows of closed connections.
FOLD_ABOVE = 32
# The rows of PostgreSQL server processes that are gone (no open connection has their id), not
# locked by a writer now (SKIP LOCKED: the fold never waits), are moved into the reader's own
# row in one statement, so the sum never changes. A process id reused meanwhile by a new
# connection only means that connection's next write starts a new row.
_FOLD_PG = text(
    "WITH gone AS (DELETE FROM instance_totals WHERE shard IN ("
    " SELECT shard FROM instance_totals WHERE shard <> pg_backend_pid() AND shard NOT IN"
    " (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)"
    " FOR UPDATE SKIP LOCKED) RETURNING instances, size_bytes)"
    " INSERT INTO instance_totals AS t (shard, instances, size_bytes)"
    " SELECT pg_backend_pid(), coalesce(sum(instances), 0), coalesce(sum(size_bytes), 0)"
    " FROM gone HAVING count(*) > 0"
    " ON CONFLICT (shard) DO UPDATE SET instances = t.instances + excluded.instances,"
    " size_bytes = t.size_bytes + excluded.size_bytes"
)


def instance_totals(session: Session, *, fold: bool = True) -> tuple[int, int]:
    """The number of indexed instances and the sum of their sizes, in constant time.

    Reads the running totals the triggers of migration 0012 keep in ``instance_totals`` (a row
    per writing connection), equal to ``COUNT(*)`` and ``SUM(size_bytes)`` of ``instances`` in
    any snapshot. On PostgreSQL, once there are more than :data:`FOLD_ABOVE` rows (one per
    server process that ever wrote), the rows of closed connections are folded into one and
    committed: the session's transaction is committed then.

    Parameters
    ----------
    session : Session
        An open session.
    fold : bool
        Whether this read may fold rows (and commit); False reads only.

    Returns
    -------
    tuple of int
        Instances, bytes.
    """
    shards, count, total = session.execute(
        select(func.count(), func.coalesce(func.sum(InstanceTotal.instances), 0),
               func.coalesce(func.sum(InstanceTotal.size_bytes), 0))
    ).one()
    if fold and int(shards) > FOLD_ABOVE and session.get_bind().dialect.name == "postgresql":
        session.execute(_FOLD_PG)
        session.commit()
    return int(count), int(total)


def metrics_snapshot(session: Session, *, now: datetime) -> MetricsSnapshot:
    """Counts for the metrics endpoint.

    The instance count and byte total are :func:`instance_totals` (a handful of rows, whatever
    the size of the store); everything else is grouped over tables or indexed states that
    hold no more than a row per study, job, batch, quarantined file or result object.
    """
    snap = MetricsSnapshot()
    snap.instances, snap.instance_bytes = instance_totals(session)
    snap.studies_by_state = {str(s): int(n) for s, n in session.execute(
        select(Study.state, func.count(Study.id)).group_by(Study.state)).all()}
    snap.rejected_by_status = {int(s): int(n) for s, n in session.execute(
        select(QuarantineRecord.status, func.count(QuarantineRecord.id))
        .group_by(QuarantineRecord.status)).all()}
    snap.jobs_by_state = {str(s): int(n) for s, n in session.execute(
        select(Job.state, func.count(Job.id)).group_by(Job.state)).all()}
    snap.jobs_due = int(session.scalar(
        select(func.count(Job.id)).where(Job.state == PENDING, Job.not_before <= now)) or 0)
    snap.batches_by_state = {str(s): int(n) for s, n in session.execute(
        select(Batch.state, func.count(Batch.id)).group_by(Batch.state)).all()}
    for destination, kind, state, failing, requested, n in session.execute(
        select(OutboxItem.destination, ResultObject.kind, OutboxItem.state,
               OutboxItem.last_error.is_not(None), OutboxItem.commit_requested_at.is_not(None),
               func.count(OutboxItem.id))
        .join(ResultObject, OutboxItem.result_id == ResultObject.id)
        .group_by(OutboxItem.destination, ResultObject.kind, OutboxItem.state,
                  OutboxItem.last_error.is_not(None),
                  OutboxItem.commit_requested_at.is_not(None))
    ).all():
        key = (str(destination), str(kind))
        if state == SENT and requested:
            snap.awaiting[key] = snap.awaiting.get(key, 0) + int(n)
        elif state in (SENT, COMMITTED):
            snap.sent[key] = snap.sent.get(key, 0) + int(n)
            if state == COMMITTED:
                snap.committed[key] = snap.committed.get(key, 0) + int(n)
        else:
            snap.pending[key] = snap.pending.get(key, 0) + int(n)
            if failing:
                snap.failing[key] = snap.failing.get(key, 0) + int(n)
    snap.oldest_pending = {str(d): t for d, t in session.execute(
        select(OutboxItem.destination, func.min(OutboxItem.created_at))
        .where(OutboxItem.state == PENDING).group_by(OutboxItem.destination)).all()}
    return snap


@dataclass(frozen=True)
class FinishedJob:
    """A job that finished, with the model, its stage timings (seconds) and its note (the
    series the model skipped and why; ``jobs.error`` of a done job)."""

    id: int
    model_name: str
    finished_at: datetime
    timings: dict[str, float]
    note: str | None = None


def finished_since(session: Session, since: datetime, *, limit: int = 10_000) -> list[FinishedJob]:
    """Jobs done at or after `since` (index on ``finished_at``), oldest first."""
    rows = session.execute(
        select(Job.id, Job.model_name, Job.finished_at, Job.timings, Job.error)
        .where(and_(Job.state == "done", Job.finished_at >= since))
        .order_by(Job.finished_at, Job.id).limit(limit)
    ).all()
    found: list[FinishedJob] = []
    for job_id, model, finished_at, timings, note in rows:
        try:
            parsed = {str(k): float(v) for k, v in (timings or {}).items()}
        except (ValueError, TypeError, AttributeError):
            parsed = {}
        if finished_at is not None:
            found.append(FinishedJob(int(job_id), str(model), finished_at, parsed, note))
    return found
