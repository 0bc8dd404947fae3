"""Retention queries: what is processed and delivered, which results expired, and the deletes.

A study is *delivered* (its received instances may go) when every piece of work it caused is
finished:

* it is ``complete`` and its last completion was routed (no unconsumed ``study.complete``
  event) with at least one routing decision (an "unrouted" decision counts: nothing to do);
* none of its jobs is ``pending`` or ``running`` (done, or failed for good);
* every outbox row of its jobs is delivered (``sent``; ``committed`` for a destination with
  storage commitment: see :mod:`storage.outbox`).

It was delivered at the newest of its routing decisions, its jobs' finish times and its outbox
rows' send times. Results of a job (result objects, their outbox rows, findings) expire by the
job's age, and only when the job is finished, every outbox row of it is sent, and its study has
no job pending or running (which may still read them as predecessors).

Deletes only touch rows; the caller removes files *before* the rows (see
:mod:`dicom_ai.retention` for why). Every selection here is re-run right before a delete, so
what a plan listed is checked again when it is applied.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, aliased

from storage import outbox as outbox_rows
from storage.metrics import instance_totals
from storage.models import (
    COMPLETE,
    DONE,
    FAILED,
    UNFINISHED,
    Event,
    FindingRecord,
    Instance,
    Job,
    OutboxItem,
    Patient,
    ResultObject,
    RoutingDecision,
    Series,
    Study,
)
from storage.repository import STUDY_COMPLETE

_CHUNK = 500  # stay under bind-parameter limits
_T = TypeVar("_T")


def _chunks(values: Sequence[_T]) -> Iterator[list[_T]]:
    for start in range(0, len(values), _CHUNK):
        yield list(values[start : start + _CHUNK])


@dataclass(frozen=True)
class DeliveredStudy:
    """A study whose received instances may be deleted, and how much they hold."""

    study_instance_uid: str
    delivered_at: datetime
    instances: int
    size_bytes: int


@dataclass(frozen=True)
class ExpiredResults:
    """The results of one finished, fully delivered job older than the cut-off.

    Also what a retention plan lists per job, and (with the counts found when deleting) what
    :func:`dicom_ai.retention.apply` reports removed.
    """

    job_id: int
    study_instance_uid: str
    finished_at: datetime
    results: int
    findings: int
    outbox: int
    # Store-relative paths of its result files (SR, SEG, heat-map SC).
    paths: tuple[str, ...]


@dataclass(frozen=True)
class RowsRemoved:
    """How many index rows a delete removed, by table."""

    instances: int = 0
    series: int = 0
    studies: int = 0
    patients: int = 0
    results: int = 0
    outbox: int = 0
    findings: int = 0


def store_bytes(session: Session) -> int:
    """The size of the instance store: the sum of every indexed instance's file size (the
    running total of migration 0012, in constant time)."""
    return instance_totals(session, fold=False)[1]


def delivered_studies(session: Session, *,
                      study_instance_uids: Sequence[str] | None = None) -> list[DeliveredStudy]:
    """Every processed and delivered study that still has instances, oldest delivered first.

    Parameters
    ----------
    session : Session
        An open session.
    study_instance_uids : sequence of str, optional
        Only consider these studies (re-checking a plan before applying it).

    Returns
    -------
    list of DeliveredStudy
        Ordered by delivery time, then Study Instance UID.
    """
    uid = Study.study_instance_uid
    decided = select(RoutingDecision.id).where(RoutingDecision.study_instance_uid == uid)
    busy = select(Job.id).where(Job.study_instance_uid == uid, Job.state.in_(UNFINISHED))
    unsent = (select(OutboxItem.id).join(Job, OutboxItem.job_id == Job.id)
              .where(Job.study_instance_uid == uid, ~outbox_rows.delivered()))
    unrouted = select(Event.id).where(Event.study_instance_uid == uid,
                                      Event.kind == STUDY_COMPLETE, Event.consumed_at.is_(None))
    query = (
        select(uid, func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
        .join(Series, Series.study_pk == Study.id)
        .join(Instance, Instance.series_pk == Series.id)
        .where(Study.state == COMPLETE, decided.exists(), ~busy.exists(), ~unsent.exists(),
               ~unrouted.exists())
        .group_by(Study.id, uid)
    )
    if study_instance_uids is not None:
        rows: list[Any] = []
        for chunk in _chunks(list(study_instance_uids)):
            rows += session.execute(query.where(uid.in_(chunk))).all()
    else:
        rows = list(session.execute(query).all())
    counts = {str(r[0]): (int(r[1]), int(r[2])) for r in rows}
    delivered_at = _delivered_at(session, sorted(counts))
    found = [DeliveredStudy(u, delivered_at[u], n, size) for u, (n, size) in counts.items()
             if u in delivered_at]
    return sorted(found, key=lambda s: (s.delivered_at, s.study_instance_uid))


def _delivered_at(session: Session, uids: Sequence[str]) -> dict[str, datetime]:
    """The newest decision, job finish or send time of each study."""
    newest: dict[str, datetime] = {}

    def keep(rows: Sequence[Any]) -> None:
        for study, moment in rows:
            if moment is not None and (study not in newest or moment > newest[study]):
                newest[study] = moment

    for chunk in _chunks(uids):
        keep(session.execute(
            select(RoutingDecision.study_instance_uid, func.max(RoutingDecision.created_at))
            .where(RoutingDecision.study_instance_uid.in_(chunk))
            .group_by(RoutingDecision.study_instance_uid)
        ).all())
        keep(session.execute(
            select(Job.study_instance_uid, func.max(Job.finished_at))
            .where(Job.study_instance_uid.in_(chunk), Job.state.in_((DONE, FAILED)))
            .group_by(Job.study_instance_uid)
        ).all())
        keep(session.execute(
            select(Job.study_instance_uid,
                   func.max(func.coalesce(OutboxItem.committed_at, OutboxItem.sent_at)))
            .join(Job, OutboxItem.job_id == Job.id)
            .where(Job.study_instance_uid.in_(chunk))
            .group_by(Job.study_instance_uid)
        ).all())
    return newest


def instances_of_study(session: Session, study_instance_uid: str) -> list[tuple[int, str]]:
    """(row id, store-relative path) of every indexed instance of a study."""
    rows = session.execute(
        select(Instance.id, Instance.path)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.study_instance_uid == study_instance_uid)
        .order_by(Instance.id)
    ).all()
    return [(int(i), str(p)) for i, p in rows]


def delete_instances(session: Session, instance_ids: Sequence[int]) -> RowsRemoved:
    """Delete instance rows, then the series, studies and patients this leaves empty.

    A study row stays while result objects of it remain (our Q/R SCP finds results through
    their study); :func:`delete_results` removes it once they are gone. The caller commits.
    """
    ids = sorted(set(instance_ids))
    series_pks: set[int] = set()
    removed = 0
    for chunk in _chunks(ids):
        series_pks.update(session.scalars(
            select(Instance.series_pk).where(Instance.id.in_(chunk)).distinct()).all())
        removed += _rowcount(session.execute(delete(Instance).where(Instance.id.in_(chunk))))
    study_pks: set[int] = set()
    series_removed = 0
    for chunk in _chunks(sorted(series_pks)):
        study_pks.update(session.scalars(
            select(Series.study_pk).where(Series.id.in_(chunk)).distinct()).all())
        has_instances = select(Instance.id).where(Instance.series_pk == Series.id).exists()
        series_removed += _rowcount(session.execute(
            delete(Series).where(Series.id.in_(chunk), ~has_instances)))
    studies, patients = _prune_studies(session, sorted(study_pks))
    return RowsRemoved(instances=removed, series=series_removed, studies=studies,
                       patients=patients)


def _prune_studies(session: Session, study_pks: Sequence[int]) -> tuple[int, int]:
    """Delete the given studies that have neither series nor results, then empty patients."""
    patient_pks: set[int] = set()
    studies = 0
    for chunk in _chunks(study_pks):
        patient_pks.update(session.scalars(
            select(Study.patient_pk).where(Study.id.in_(chunk)).distinct()).all())
        has_series = select(Series.id).where(Series.study_pk == Study.id).exists()
        has_results = select(ResultObject.id).where(
            ResultObject.study_instance_uid == Study.study_instance_uid).exists()
        studies += _rowcount(session.execute(
            delete(Study).where(Study.id.in_(chunk), ~has_series, ~has_results)))
    patients = 0
    for chunk in _chunks(sorted(patient_pks)):
        has_studies = select(Study.id).where(Study.patient_pk == Patient.id).exists()
        patients += _rowcount(session.execute(
            delete(Patient).where(Patient.id.in_(chunk), ~has_studies)))
    return studies, patients


def expired_results(session: Session, *, cutoff: datetime,
                    job_ids: Sequence[int] | None = None) -> list[ExpiredResults]:
    """Jobs finished at or before `cutoff` whose results may go, oldest first.

    Parameters
    ----------
    session : Session
        An open session.
    cutoff : datetime
        Jobs that finished (or, without a finish time, were created) at or before this.
    job_ids : sequence of int, optional
        Only consider these jobs (re-checking a plan before applying it).

    Returns
    -------
    list of ExpiredResults
        Jobs that still have result objects or findings.
    """
    age = func.coalesce(Job.finished_at, Job.created_at)
    other = aliased(Job)
    busy = select(other.id).where(other.study_instance_uid == Job.study_instance_uid,
                                  other.state.in_(UNFINISHED))
    # Never an object not yet delivered (a commitment destination: not yet committed).
    unsent = select(OutboxItem.id).where(OutboxItem.job_id == Job.id, ~outbox_rows.delivered())
    has_results = select(ResultObject.id).where(ResultObject.job_id == Job.id)
    has_findings = select(FindingRecord.id).where(FindingRecord.job_id == Job.id)
    query = (
        select(Job.id, Job.study_instance_uid, age)
        .where(Job.state.in_((DONE, FAILED)), age <= cutoff, ~busy.exists(), ~unsent.exists(),
               has_results.exists() | has_findings.exists())
        .order_by(age, Job.id)
    )
    if job_ids is not None:
        rows: list[Any] = []
        for chunk in _chunks(sorted(set(job_ids))):
            rows += session.execute(query.where(Job.id.in_(chunk))).all()
    else:
        rows = list(session.execute(query).all())
    found: list[ExpiredResults] = []
    for job_id, study_uid, finished in rows:
        paths = list(session.scalars(
            select(ResultObject.path).where(ResultObject.job_id == job_id)
            .order_by(ResultObject.id)).all())
        heatmaps = session.scalars(
            select(FindingRecord.heatmap_path).where(
                FindingRecord.job_id == job_id, FindingRecord.heatmap_path.is_not(None))
            .distinct()).all()
        paths += sorted({str(p) for p in heatmaps} - set(paths))
        findings = session.scalar(
            select(func.count(FindingRecord.id)).where(FindingRecord.job_id == job_id)) or 0
        outbox = session.scalar(
            select(func.count(OutboxItem.id)).where(OutboxItem.job_id == job_id)) or 0
        results = session.scalar(
            select(func.count(ResultObject.id)).where(ResultObject.job_id == job_id)) or 0
        found.append(ExpiredResults(int(job_id), str(study_uid), finished, int(results),
                                    int(findings), int(outbox), tuple(str(p) for p in paths)))
    return found


def delete_results(session: Session, job_ids: Sequence[int]) -> RowsRemoved:
    """Delete the outbox rows, result objects and findings of jobs (the job rows stay).

    Study rows left with neither instances nor results are deleted too, with their patients
    when those have no other study. The caller commits.
    """
    ids = sorted(set(job_ids))
    outbox = results = findings = 0
    study_uids: set[str] = set()
    for chunk in _chunks(ids):
        study_uids.update(session.scalars(
            select(Job.study_instance_uid).where(Job.id.in_(chunk)).distinct()).all())
        of_results = select(ResultObject.id).where(ResultObject.job_id.in_(chunk))
        outbox += _rowcount(session.execute(delete(OutboxItem).where(
            OutboxItem.job_id.in_(chunk) | OutboxItem.result_id.in_(of_results))))
        results += _rowcount(session.execute(
            delete(ResultObject).where(ResultObject.job_id.in_(chunk))))
        findings += _rowcount(session.execute(
            delete(FindingRecord).where(FindingRecord.job_id.in_(chunk))))
    study_pks: list[int] = []
    for uids in _chunks(sorted(study_uids)):
        study_pks += session.scalars(
            select(Study.id).where(Study.study_instance_uid.in_(uids))).all()
    studies, patients = _prune_studies(session, sorted(study_pks))
    return RowsRemoved(studies=studies, patients=patients, results=results, outbox=outbox,
                       findings=findings)


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
