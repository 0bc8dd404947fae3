"""Routing decisions, jobs, findings, result objects and the outbox: the durable side of the loop.

Every state change is a conditional ``UPDATE`` whose row count says who won, so any number of
receivers, dispatchers and workers may share one database:

* an event is routed once (:func:`take_event`);
* a job is claimed by one worker at a time (:func:`claim_job`, a lease that expires when its
  worker dies), waits without using an attempt when a resource is exhausted (:func:`wait_job`),
  and is completed at most once (:func:`complete_job` checks the lease is still ours
  and writes findings, results and outbox rows in the same transaction, keyed on the job id);
* an outbox row is sent by one sender at a time (:func:`storage.outbox.claim_outbox`), and
  stays pending with a growing delay until the destination accepts it: nothing is dropped.

The readers of this aggregate (jobs, routing decisions, findings, result objects) are here too,
one per question; the outbox rows' are in :mod:`storage.outbox`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, and_, case, func, or_, select, update
from sqlalchemy.orm import Session as Session  # re-exported for callers' type hints

from storage.models import (
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    WAITING,
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
from storage.paging import MAX_LIMIT, Order, grouped, keyset


# -- routing ----------------------------------------------------------------------------------
def take_event(session: Session, event_id: int, now: datetime) -> bool:
    """Consume an event if nobody has; True if this caller did (and must route it)."""
    result = session.execute(
        update(Event).where(Event.id == event_id, Event.consumed_at.is_(None))
        .values(consumed_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SeriesInfo:
    """What routing matches on: one series of a study, a representative file, its senders."""

    series_instance_uid: str
    modality: str
    body_part_examined: str
    instance_count: int
    first_path: str
    calling_ae_titles: tuple[str, ...]


def series_of_study(session: Session, study_instance_uid: str) -> list[SeriesInfo]:
    """Every series of a study with at least one instance, in series-number order.

    Series of our own results received back (``own_results``) are left out: the service never
    feeds on its own output (design convention 14).
    """
    rows = session.execute(
        select(Series.series_instance_uid, Series.modality, Series.body_part_examined,
               func.count(Instance.id), func.min(Instance.path))
        .join(Study, Series.study_pk == Study.id)
        .join(Instance, Instance.series_pk == Series.id)
        .where(Study.study_instance_uid == study_instance_uid, Series.own_results.is_(False))
        .group_by(Series.id)
        .order_by(Series.series_number, Series.id)
    ).all()
    found: list[SeriesInfo] = []
    for uid, modality, body_part, count, first_path in rows:
        aets = session.scalars(
            select(Instance.calling_ae_title).distinct()
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == uid)
        ).all()
        found.append(SeriesInfo(uid, modality, body_part, int(count), str(first_path),
                                tuple(sorted(a for a in aets if a))))
    return found


def instance_paths(session: Session, series_instance_uids: Sequence[str]) -> list[str]:
    """Store-relative paths of every instance of the given series, in instance-number order."""
    return list(session.scalars(
        select(Instance.path)
        .join(Series, Instance.series_pk == Series.id)
        .where(Series.series_instance_uid.in_(list(series_instance_uids)))
        .order_by(Series.series_number, Instance.instance_number, Instance.id)
    ).all())


def record_decision(session: Session, *, event_id: int | None, study_instance_uid: str,
                    series_instance_uid: str, route: str | None, job_id: int | None,
                    reason: str, now: datetime) -> None:
    """Record what routing decided for one series (a non-match too: nothing is silent)."""
    session.add(RoutingDecision(
        event_id=event_id, study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid, route=route, job_id=job_id, reason=reason,
        created_at=now,
    ))


# -- jobs -------------------------------------------------------------------------------------
def create_job(session: Session, *, study_instance_uid: str, series_instance_uids: Sequence[str],
               route: str, model_name: str, max_attempts: int, event_id: int | None,
               now: datetime) -> Job:
    """Create a pending job for a study and route.

    An earlier job of the same study and route that has not started yet is cancelled (this one
    covers everything it would have covered). Earlier results are superseded when this job
    completes (:func:`complete_job`), not before: until then they stay the current ones.
    """
    session.execute(
        update(Job).where(Job.study_instance_uid == study_instance_uid, Job.route == route,
                          Job.state.in_([PENDING, WAITING]), Job.attempts == 0)
        .values(state=FAILED, error="superseded before it ran (more images arrived)",
                finished_at=now)
    )
    job = Job(
        study_instance_uid=study_instance_uid,
        series_instance_uids=list(series_instance_uids),
        route=route, model_name=model_name, state=PENDING, attempts=0,
        max_attempts=max_attempts, not_before=now, event_id=event_id, created_at=now,
        timings={},
    )
    session.add(job)
    session.flush()
    return job


def latest_done_job(session: Session, study_instance_uid: str, route: str, *,
                    before: int | None = None, after: int | None = None) -> Job | None:
    """The newest completed job of a study and route, optionally older/newer than a job id."""
    query = select(Job).where(Job.study_instance_uid == study_instance_uid, Job.route == route,
                              Job.state == DONE)
    if before is not None:
        query = query.where(Job.id < before)
    if after is not None:
        query = query.where(Job.id > after)
    return session.scalars(query.order_by(Job.id.desc()).limit(1)).first()


def due_jobs(session: Session, *, now: datetime, redispatch_after: float,
             limit: int = 500) -> list[int]:
    """Jobs to hand to a dispatcher now, marked dispatched.

    Pending and waiting jobs that are due (a waiting job after ``resource_wait_seconds``) and
    were not dispatched within ``redispatch_after`` seconds (a lost broker message or a
    restarted service), and running jobs whose lease expired (a killed worker). Handing a job
    out twice is harmless: only one claim wins.
    """
    stale = now - timedelta(seconds=redispatch_after)
    ids = list(session.scalars(
        select(Job.id).where(or_(
            and_(Job.state.in_([PENDING, WAITING]), Job.not_before <= now,
                 or_(Job.dispatched_at.is_(None), Job.dispatched_at <= stale)),
            # Once per expiry: a job handed out after its lease expired is not handed out again
            # until a claim renews the lease (and it expires again).
            and_(Job.state == RUNNING, Job.lease_expires_at < now,
                 or_(Job.dispatched_at.is_(None), Job.dispatched_at < Job.lease_expires_at)),
        )).order_by(Job.id).limit(limit)
    ).all())
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(dispatched_at=now))
    return ids


def undispatch(session: Session, job_ids: Sequence[int]) -> None:
    """Forget that jobs were dispatched (the broker refused them): they are due again."""
    session.execute(update(Job).where(Job.id.in_(list(job_ids))).values(dispatched_at=None))


def claim_job(session: Session, job_id: int, *, owner: str, lease_seconds: float,
              now: datetime) -> Job | None:
    """Take a job for `owner` if it is due and nobody holds a live lease on it.

    A waiting job (:func:`wait_job`) is claimed like a pending one once it is due. A running
    job whose lease expired counts as a failed attempt of its dead worker: when that used up
    its attempts, the job becomes failed instead of running again (a poison job that kills
    workers stops).
    """
    lease = now + timedelta(seconds=lease_seconds)
    session.execute(
        update(Job).where(Job.id == job_id, Job.state == RUNNING, Job.lease_expires_at < now,
                          Job.attempts >= Job.max_attempts)
        .values(state=FAILED, finished_at=now, lease_owner=None,
                error=func.coalesce(Job.error, "") + "worker lost (lease expired) on the "
                "last attempt")
    )
    claimed = session.execute(
        update(Job).where(Job.id == job_id, or_(
            and_(Job.state.in_([PENDING, WAITING]), Job.not_before <= now),
            and_(Job.state == RUNNING, Job.lease_expires_at < now),
        )).values(state=RUNNING, lease_owner=owner, lease_expires_at=lease,
                  attempts=Job.attempts + 1, started_at=now)
    ).rowcount  # type: ignore[attr-defined]
    if not claimed:
        return None
    return session.get(Job, job_id, populate_existing=True)


def expire_leases(session: Session, owner: str, *, now: datetime) -> int:
    """End the leases of a worker known to be dead, so its jobs are handed out at once."""
    return int(session.execute(
        update(Job).where(Job.state == RUNNING, Job.lease_owner == owner)
        .values(lease_expires_at=now - timedelta(seconds=1), dispatched_at=None)
    ).rowcount)  # type: ignore[attr-defined]


def release_previous_incarnations(session: Session, *, node: str, current: str,
                                  now: datetime) -> int:
    """End the leases of this node's previous incarnations (a restarted ``serve``).

    Lease owners of a ``serve`` process's own workers start with ``<node>/<boot id>/``; every
    running job whose owner starts with ``<node>/`` but not with `current` (this start's
    prefix) was held by a process that died with the previous ``serve``, so it is handed out
    again at once instead of after its lease. Other nodes' jobs, and Celery workers' (whose
    owners have no ``<node>/`` prefix), keep their leases.
    """
    return int(session.execute(
        update(Job).where(Job.state == RUNNING,
                          Job.lease_owner.startswith(f"{node}/", autoescape=True),
                          ~Job.lease_owner.startswith(current, autoescape=True))
        .values(lease_expires_at=now - timedelta(seconds=1), dispatched_at=None)
    ).rowcount)  # type: ignore[attr-defined]


def redispatch_pending(session: Session) -> int:
    """Forget every pending (or waiting) job's dispatch, so the scheduler hands them out when due.

    Used at start: a local pool's queue died with the previous process, and waiting
    ``redispatch_seconds`` for it is pointless. A job queued elsewhere as well (a broker, another
    node) is harmless: only one claim wins.
    """
    return int(session.execute(
        update(Job).where(Job.state.in_([PENDING, WAITING]), Job.dispatched_at.is_not(None))
        .values(dispatched_at=None)
    ).rowcount)  # type: ignore[attr-defined]


def extend_lease(session: Session, job_id: int, *, owner: str, until: datetime) -> bool:
    """Push a running job's lease forward; False if the lease is no longer ours."""
    return bool(session.execute(
        update(Job).where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == owner)
        .values(lease_expires_at=until)
    ).rowcount)  # type: ignore[attr-defined]


def fail_job(session: Session, job_id: int, *, owner: str, error: str, retryable: bool,
             backoff_seconds: float, now: datetime) -> str | None:
    """Record a failed attempt: back to pending after a delay, or failed for good.

    Returns
    -------
    str or None
        The new state, or None when the lease was no longer ours (nothing changed).
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.state != RUNNING or job.lease_owner != owner:
        return None
    final = not retryable or job.attempts >= job.max_attempts
    job.state = FAILED if final else PENDING
    job.error = error[:4000]
    job.lease_owner = None
    job.lease_expires_at = None
    job.dispatched_at = None
    if final:
        job.finished_at = now
    else:  # exponential backoff per attempt
        job.not_before = now + timedelta(seconds=backoff_seconds * 2 ** (job.attempts - 1))
    return job.state


def wait_job(session: Session, job_id: int, *, owner: str, reason: str,
             retry_seconds: float, now: datetime) -> str | None:
    """A resource is exhausted (full disk, index unavailable): the job waits, no attempt used.

    The attempt the claim counted is given back, the lease released, and the job is due again
    after `retry_seconds` (:func:`due_jobs`, :func:`claim_job` take waiting jobs like pending
    ones); however often it waits, it never becomes failed for it (design convention 15).

    Parameters
    ----------
    session : Session
        A write session.
    job_id : int
        The job.
    owner : str
        The lease owner that claimed it.
    reason : str
        Why it waits, for the job's ``error`` (``"waiting: ..."``); no patient value.
    retry_seconds : float
        ``workers.resource_wait_seconds``.
    now : datetime
        The current time.

    Returns
    -------
    str or None
        ``"waiting"``, or None when the lease was no longer ours (nothing changed).
    """
    changed = session.execute(
        update(Job).where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == owner)
        .values(state=WAITING, error=reason[:4000], lease_owner=None, lease_expires_at=None,
                dispatched_at=None, not_before=now + timedelta(seconds=retry_seconds),
                attempts=case((Job.attempts > 0, Job.attempts - 1), else_=0))
    ).rowcount  # type: ignore[attr-defined]
    return WAITING if changed else None


@dataclass
class ResultToStore:
    """A result file written by a worker, and where it must be delivered."""

    kind: str
    sr_kind: str | None
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    destinations: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FindingToStore:
    """One finding of a worker's run, as the columns of :class:`storage.models.FindingRecord`.

    A series or study decision names no one image (empty `sop_instance_uid`; a study one no
    series either); `location` is the geometry (``point``, ``bbox``, ``area_pixels``), or None.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    frame_number: int | None
    model_name: str
    model_version: str
    label: str
    code_value: str
    code_scheme: str
    code_meaning: str
    probability: float
    threshold: float
    present: bool
    location_kind: str | None
    location: dict[str, Any] | None
    segment_number: int | None
    heatmap_path: str | None
    tracking_uid: str
    ood_score: float | None
    out_of_distribution: bool


def complete_job(session: Session, job_id: int, *, owner: str, model_version: str,
                 findings: Sequence[FindingToStore | dict[str, Any]],
                 results: Sequence[ResultToStore],
                 timings: dict[str, float], now: datetime,
                 supersedes_job_id: int | None = None, note: str | None = None) -> bool:
    """Finish a job: findings, result objects and outbox rows, all or nothing.

    `note` (why series were skipped, or ``"not applicable: ..."``) becomes the job's ``error``
    text, which a completed job otherwise has cleared.

    The job's findings become the current ones of its study and route: every earlier job's
    findings are marked superseded by it. If a newer job of the same study and route
    completed first (this one ran on fewer images), this job's findings are stored already
    superseded and its results are kept but not sent, so a stale SR never follows a newer one.

    Returns False (and writes nothing; the caller rolls back) when the lease is no longer
    ours: another worker took the job over, and only one may complete it.
    """
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == owner)
        .values(state=DONE, finished_at=now, lease_owner=None, lease_expires_at=None,
                error=note[:4000] if note else None, model_version=model_version,
                timings=dict(timings), supersedes_job_id=supersedes_job_id)
    ).rowcount  # type: ignore[attr-defined]
    if not done:
        return False
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    newer = latest_done_job(session, job.study_instance_uid, job.route, after=job_id)
    superseded_by = newer.id if newer is not None else None
    for ordinal, stored in enumerate(findings):
        values = asdict(stored) if isinstance(stored, FindingToStore) else stored
        session.add(FindingRecord(job_id=job_id, ordinal=ordinal, created_at=now,
                                  superseded_by_job_id=superseded_by, **values))
    for item in results:
        row = ResultObject(
            job_id=job_id, kind=item.kind, sr_kind=item.sr_kind,
            study_instance_uid=item.study_instance_uid,
            series_instance_uid=item.series_instance_uid,
            sop_instance_uid=item.sop_instance_uid, sop_class_uid=item.sop_class_uid,
            path=item.path, created_at=now,
        )
        session.add(row)
        session.flush()
        for destination in item.destinations if newer is None else []:
            session.add(OutboxItem(result_id=row.id, job_id=job_id, destination=destination,
                                   state=PENDING, attempts=0, next_attempt_at=now,
                                   created_at=now))
    if newer is None:
        earlier = select(Job.id).where(Job.study_instance_uid == job.study_instance_uid,
                                       Job.route == job.route, Job.id < job_id)
        session.execute(
            update(FindingRecord)
            .where(FindingRecord.job_id.in_(earlier),
                   FindingRecord.superseded_by_job_id.is_(None))
            .values(superseded_by_job_id=job_id)
        )
    return True


# -- readers: jobs and routing decisions -----------------------------------------------------
def job(session: Session, job_id: int) -> Job | None:
    """One job by id."""
    return session.get(Job, job_id)


def list_jobs(session: Session, *, after: int | None = None, limit: int = 50,
              order: Order = "desc", state: str | None = None, model_name: str | None = None,
              route: str | None = None,
              study_instance_uid: str | None = None) -> list[Job]:
    """Jobs, one keyset page (:mod:`storage.paging`), filtered by state, model, route or study.

    Parameters
    ----------
    session : Session
        An open session.
    after, limit, order
        The page (:func:`storage.paging.keyset`); ``desc`` (the default) is newest first.
    state, model_name, route, study_instance_uid : str, optional
        Equality filters.

    Returns
    -------
    list of Job
    """
    query = select(Job)
    if state is not None:
        query = query.where(Job.state == state)
    if model_name is not None:
        query = query.where(Job.model_name == model_name)
    if route is not None:
        query = query.where(Job.route == route)
    if study_instance_uid is not None:
        query = query.where(Job.study_instance_uid == study_instance_uid)
    return list(session.scalars(keyset(query, Job.id, after, limit, order)).all())


def job_counts(session: Session) -> dict[str, int]:
    """Jobs by state."""
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {str(state): int(count) for state, count in rows}


def decisions_of_studies(session: Session, study_instance_uids: Sequence[str]
                         ) -> dict[str, list[RoutingDecision]]:
    """The routing decisions of some studies (e.g. one page of them), oldest first per study.

    Parameters
    ----------
    session : Session
        An open session.
    study_instance_uids : sequence of str
        The studies (indexed column ``routing_decisions.study_instance_uid``).

    Returns
    -------
    dict of str to list of RoutingDecision
        Every given UID, with an empty list when it has no decision yet.
    """
    return grouped(session, RoutingDecision, RoutingDecision.study_instance_uid,
                   study_instance_uids)


def decisions_of_study(session: Session, study_instance_uid: str) -> list[RoutingDecision]:
    """Every routing decision recorded for a study, oldest first (:func:`decisions_of_studies`)."""
    return decisions_of_studies(session, [study_instance_uid])[study_instance_uid]


def job_notes(session: Session, job_ids: Sequence[int]) -> dict[int, str]:
    """The notes of those of some jobs that are done with one: the series the model skipped
    and why (``not applicable: ...`` when it took none, so the job has no result).

    Parameters
    ----------
    session : Session
        An open session.
    job_ids : sequence of int
        The jobs (primary key), e.g. those of one page's routing decisions.

    Returns
    -------
    dict of int to str
        Job id to ``jobs.error`` for done jobs with a note; other jobs are left out.
    """
    if not job_ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.error)
        .where(Job.id.in_(sorted(set(job_ids))), Job.state == DONE, Job.error.is_not(None))
    ).all()
    return {int(job_id): str(note) for job_id, note in rows if note}


# -- readers: findings and result objects ----------------------------------------------------
def list_findings(session: Session, *, after: int | None = None, limit: int = 50,
                  order: Order = "desc", model_name: str | None = None,
                  present: bool | None = None, since: datetime | None = None,
                  until: datetime | None = None, study_instance_uid: str | None = None,
                  job_id: int | None = None, current_only: bool = False) -> list[FindingRecord]:
    """Findings, one keyset page, filtered by model, decision, creation time, study or job.

    ``since`` is inclusive and ``until`` exclusive (both timezone-aware); ``current_only``
    leaves out findings superseded by a later job of their study and route.
    """
    query = select(FindingRecord)
    if model_name is not None:
        query = query.where(FindingRecord.model_name == model_name)
    if present is not None:
        query = query.where(FindingRecord.present.is_(present))
    if since is not None:
        query = query.where(FindingRecord.created_at >= since)
    if until is not None:
        query = query.where(FindingRecord.created_at < until)
    if study_instance_uid is not None:
        query = query.where(FindingRecord.study_instance_uid == study_instance_uid)
    if job_id is not None:
        query = query.where(FindingRecord.job_id == job_id)
    if current_only:
        query = query.where(FindingRecord.superseded_by_job_id.is_(None))
    return list(session.scalars(keyset(query, FindingRecord.id, after, limit, order)).all())


def finding(session: Session, finding_id: int) -> FindingRecord | None:
    """One finding by id, or None."""
    return session.get(FindingRecord, finding_id)


def findings_of_study(session: Session, study_instance_uid: str, *,
                      current_only: bool = True) -> list[FindingRecord]:
    """Findings of a study in creation order (at most ``MAX_LIMIT``); by default only those not
    superseded. The reader is :func:`list_findings`."""
    return list_findings(session, study_instance_uid=study_instance_uid, current_only=current_only,
                         order="asc", limit=MAX_LIMIT)


def ood_counts(session: Session, *, since: datetime) -> dict[str, tuple[int, int]]:
    """Per model, the images scored for out-of-distribution since `since` and how many were
    flagged: the input-drift monitor's counts (dicom_ai.inference.ood).

    One row per image and output of an image-level finding (series and study decisions name
    no image and are not counted again). The ``ix_findings_created`` index (migration 0004)
    bounds the scan to the window's rows, whatever the table's size.

    Returns
    -------
    dict
        ``model name -> (scored, flagged)``.
    """
    flagged = func.sum(func.cast(FindingRecord.out_of_distribution, Integer))
    rows = session.execute(
        select(FindingRecord.model_name, func.count(), flagged)
        .where(FindingRecord.created_at >= since, FindingRecord.ood_score.is_not(None),
               FindingRecord.sop_instance_uid != "")
        .group_by(FindingRecord.model_name)
    ).all()
    return {str(name): (int(n), int(k or 0)) for name, n, k in rows}


def results_of_job(session: Session, job_id: int) -> list[ResultObject]:
    """The result objects a job produced."""
    return list(session.scalars(
        select(ResultObject).where(ResultObject.job_id == job_id).order_by(ResultObject.id)
    ).all())


def get_result(session: Session, result_id: int) -> ResultObject | None:
    """One result object by id, or None."""
    return session.get(ResultObject, result_id)
