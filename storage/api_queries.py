"""The HTTP API's reads and operator actions: keyset-paginated, filtered on indexed columns.

Every list is ``WHERE <filters> AND id > :after ORDER BY id LIMIT :limit`` (or ``id <`` with
``ORDER BY id DESC``, newest first). Equality filters have an index ending in ``id`` (see the
indexes at the end of :mod:`storage.models`), so a page is one index range scan whatever the
table size; aggregates (instance counts) are computed for the rows of the page only. Nothing
here counts or sorts a whole table (the ``/metrics`` counts are in :mod:`storage.metrics`).

One reader per question: the job and batch lists live with their aggregate
(:func:`storage.jobs.list_jobs`, :func:`storage.batches.list_batches`) and are re-exported
here for the API's callers; the CLI and the API call the same readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from storage.batches import list_batches as list_batches
from storage.jobs import list_jobs as list_jobs
from storage.models import (
    PENDING,
    BatchStudy,
    FindingRecord,
    Instance,
    OutboxItem,
    Patient,
    ResultObject,
    Series,
    Study,
)
from storage.paging import MAX_ID as MAX_ID
from storage.paging import MAX_LIMIT as MAX_LIMIT
from storage.paging import Order as Order
from storage.paging import keyset as _keyset

#: Raised when the database cannot be reached; the API answers 503 for it.
DatabaseError = OperationalError


def ping(session: Session) -> None:
    """Run ``SELECT 1`` (raises :class:`DatabaseError` when the database is unreachable)."""
    session.execute(text("SELECT 1"))


# -- studies and series -----------------------------------------------------------------------
@dataclass
class StudyRow:
    """A study with its counts; patient fields only when the caller asked for them."""

    id: int
    study_instance_uid: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    study_description: str
    state: str
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    completion_reason: str | None
    completion_count: int
    series: int = 0
    instances: int = 0
    modalities: list[str] = field(default_factory=list)
    patient: dict[str, str] | None = None


@dataclass
class SeriesRow:
    """A series with its instance count."""

    id: int
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    series_number: int | None
    state: str
    last_received_at: datetime
    completed_at: datetime | None
    instances: int = 0


def _study_row(study: Study, patient: Patient | None) -> StudyRow:
    return StudyRow(
        study.id, study.study_instance_uid, study.accession_number, study.study_id,
        study.study_date, study.study_time, study.study_description, study.state,
        study.first_received_at, study.last_received_at, study.completed_at,
        study.completion_reason, study.completion_count,
        patient=None if patient is None else {
            "PatientName": patient.patient_name, "PatientID": patient.patient_id,
            "IssuerOfPatientID": patient.issuer_of_patient_id,
            "PatientBirthDate": patient.patient_birth_date, "PatientSex": patient.patient_sex,
        },
    )


def _instance_counts(session: Session, series_ids: Sequence[int]) -> dict[int, int]:
    """Instances per series, for the given series only (index on ``instances.series_pk``)."""
    if not series_ids:
        return {}
    rows = session.execute(
        select(Instance.series_pk, func.count(Instance.id))
        .where(Instance.series_pk.in_(list(series_ids))).group_by(Instance.series_pk)
    ).all()
    return {int(pk): int(n) for pk, n in rows}


def _fill_study_counts(session: Session, studies: Sequence[StudyRow]) -> None:
    by_id = {s.id: s for s in studies}
    if not by_id:
        return
    series = session.execute(
        select(Series.id, Series.study_pk, Series.modality)
        .where(Series.study_pk.in_(list(by_id)))
    ).all()
    counts = _instance_counts(session, [row.id for row in series])
    for series_id, study_pk, modality in series:
        study = by_id[study_pk]
        study.series += 1
        study.instances += counts.get(series_id, 0)
        if modality and modality not in study.modalities:
            study.modalities.append(modality)
    for study in studies:
        study.modalities.sort()


def list_studies(session: Session, *, after: int | None = None, limit: int = 50,
                 order: Order = "desc", state: str | None = None,
                 study_date_from: str | None = None, study_date_to: str | None = None,
                 accession_number: str | None = None,
                 with_patient: bool = False) -> list[StudyRow]:
    """Studies, one page, with series/instance counts and modalities of that page.

    Parameters
    ----------
    session : Session
        An open session.
    after : int, optional
        The last id of the previous page.
    limit : int
        Page size (1-500).
    order : {"asc", "desc"}
        By id; ``desc`` is newest first.
    state : str, optional
        ``receiving`` or ``complete``.
    study_date_from, study_date_to : str, optional
        Inclusive StudyDate bounds, ``YYYYMMDD``.
    accession_number : str, optional
        Exact AccessionNumber.
    with_patient : bool
        Include patient name, ID and birth date (only when the operator allowed it).

    Returns
    -------
    list of StudyRow
    """
    query: Select[Any] = (select(Study, Patient) if with_patient  # type: ignore[assignment]
                          else select(Study))
    if with_patient:
        query = query.join(Patient, Study.patient_pk == Patient.id)
    if state is not None:
        query = query.where(Study.state == state)
    if study_date_from:
        query = query.where(Study.study_date >= study_date_from)
    if study_date_to:
        query = query.where(Study.study_date <= study_date_to, Study.study_date != "")
    if accession_number is not None:
        query = query.where(Study.accession_number == accession_number)
    rows = session.execute(_keyset(query, Study.id, after, limit, order)).all()
    found = [_study_row(row[0], row[1] if with_patient else None) for row in rows]
    _fill_study_counts(session, found)
    return found


def get_study(session: Session, study_instance_uid: str, *,
              with_patient: bool = False) -> StudyRow | None:
    """One study by UID, with its counts."""
    row = session.execute(
        select(Study, Patient).join(Patient, Study.patient_pk == Patient.id)
        .where(Study.study_instance_uid == study_instance_uid)
    ).first()
    if row is None:
        return None
    study = _study_row(row[0], row[1] if with_patient else None)
    _fill_study_counts(session, [study])
    return study


def list_series(session: Session, *, after: int | None = None, limit: int = 50,
                order: Order = "desc", study_instance_uid: str | None = None,
                modality: str | None = None) -> list[SeriesRow]:
    """Series, one page, with the instance count of each."""
    query = select(Series, Study.study_instance_uid).join(Study, Series.study_pk == Study.id)
    if study_instance_uid is not None:
        query = query.where(Study.study_instance_uid == study_instance_uid)
    if modality is not None:
        query = query.where(Series.modality == modality)
    rows = session.execute(_keyset(query, Series.id, after, limit, order)).all()
    counts = _instance_counts(session, [s.id for s, _ in rows])
    return [SeriesRow(s.id, s.series_instance_uid, uid, s.modality, s.body_part_examined,
                      s.series_description, s.series_number, s.state, s.last_received_at,
                      s.completed_at, counts.get(s.id, 0)) for s, uid in rows]


# -- jobs, findings, results, outbox ---------------------------------------------------------
def list_findings(session: Session, *, after: int | None = None, limit: int = 50,
                  order: Order = "desc", model_name: str | None = None,
                  present: bool | None = None, since: datetime | None = None,
                  until: datetime | None = None, study_instance_uid: str | None = None,
                  job_id: int | None = None, current_only: bool = False) -> list[FindingRecord]:
    """Findings, one page, filtered by model, decision, creation time, study or job.

    ``since`` is inclusive and ``until`` exclusive (both timezone-aware).
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
    return list(session.scalars(_keyset(query, FindingRecord.id, after, limit, order)).all())


def deliveries_of_results(session: Session,
                          result_ids: Sequence[int]) -> dict[int, list[OutboxItem]]:
    """The outbox rows of each result object (oldest first), by result id.

    Parameters
    ----------
    session : Session
        An open session.
    result_ids : sequence of int
        Result object ids (e.g. those of :func:`storage.jobs.results_of_job`).

    Returns
    -------
    dict
        ``result id -> outbox rows``; every id given is a key.
    """
    by_result: dict[int, list[OutboxItem]] = {int(r): [] for r in result_ids}
    if not by_result:
        return by_result
    for item in session.scalars(
        select(OutboxItem).where(OutboxItem.result_id.in_(list(by_result)))
        .order_by(OutboxItem.id)
    ).all():
        by_result[item.result_id].append(item)
    return by_result


def list_outbox(session: Session, *, after: int | None = None, limit: int = 50,
                order: Order = "desc", state: str | None = None,
                destination: str | None = None, job_id: int | None = None,
                failing: bool = False) -> list[tuple[OutboxItem, ResultObject]]:
    """Outbox rows with their result object, one page.

    ``failing`` keeps pending rows whose last attempt failed.
    """
    query = select(OutboxItem, ResultObject).join(
        ResultObject, OutboxItem.result_id == ResultObject.id)
    if state is not None:
        query = query.where(OutboxItem.state == state)
    if destination is not None:
        query = query.where(OutboxItem.destination == destination)
    if job_id is not None:
        query = query.where(OutboxItem.job_id == job_id)
    if failing:
        query = query.where(OutboxItem.state == PENDING, OutboxItem.last_error.is_not(None))
    rows = session.execute(_keyset(query, OutboxItem.id, after, limit, order)).all()
    return [(item, result) for item, result in rows]


def get_result(session: Session, result_id: int) -> ResultObject | None:
    """One result object by id."""
    return session.get(ResultObject, result_id)


def resend_result(session: Session, result_id: int, destinations: Sequence[str], *,
                  now: datetime) -> int:
    """Send a result again: its outbox rows (and rows for `destinations` it lacks) go pending.

    Returns
    -------
    int
        Outbox rows now pending and due.
    """
    changed = int(session.execute(
        update(OutboxItem).where(OutboxItem.result_id == result_id)
        .values(state=PENDING, next_attempt_at=now, sent_at=None, commit_transaction_uid=None,
                commit_requested_at=None, committed_at=None)
    ).rowcount)  # type: ignore[attr-defined]
    result = session.get(ResultObject, result_id)
    if result is None:
        return changed
    have = set(session.scalars(
        select(OutboxItem.destination).where(OutboxItem.result_id == result_id)).all())
    for name in destinations:
        if name not in have:
            session.add(OutboxItem(result_id=result_id, job_id=result.job_id, destination=name,
                                   state=PENDING, attempts=0, next_attempt_at=now,
                                   created_at=now))
            changed += 1
    return changed


def retry_delivery(session: Session, outbox_id: int, *, now: datetime) -> OutboxItem | None:
    """Make a pending (failing) delivery due now; None if the row does not exist.

    A sent row is returned unchanged (re-sending is :func:`resend_result`).
    """
    session.execute(
        update(OutboxItem).where(OutboxItem.id == outbox_id, OutboxItem.state == PENDING)
        .values(next_attempt_at=now)
    )
    return session.get(OutboxItem, outbox_id, populate_existing=True)


# -- batches ----------------------------------------------------------------------------------
def batch_study_counts(session: Session, batch_id: int) -> dict[str, int]:
    """A batch's studies by retrieve state (``found``, ``retrieved``, ``failed``)."""
    rows = session.execute(
        select(BatchStudy.state, func.count(BatchStudy.id))
        .where(BatchStudy.batch_id == batch_id).group_by(BatchStudy.state)
    ).all()
    return {str(state): int(n) for state, n in rows}
