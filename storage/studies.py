"""Studies, series and instances as the API, the CLI and the dashboard read them.

Lists are keyset pages (:mod:`storage.paging`) filtered on indexed columns; aggregates (series
and instance counts, modalities) are computed for the rows of the page only, so nothing here
counts or sorts a whole table (the ``/metrics`` counts are in :mod:`storage.metrics`). Writes
of the index (patients, studies, series, instances) are in :mod:`storage.repository`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from storage.models import Instance, Patient, Series, Study
from storage.paging import Order, keyset

__all__ = ["SeriesRow", "StudyRow", "get_study", "list_series", "list_studies"]


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
    after, limit, order
        The page (:func:`storage.paging.keyset`); ``desc`` is newest first.
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
    rows = session.execute(keyset(query, Study.id, after, limit, order)).all()
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
    rows = session.execute(keyset(query, Series.id, after, limit, order)).all()
    counts = _instance_counts(session, [s.id for s, _ in rows])
    return [SeriesRow(s.id, s.series_instance_uid, uid, s.modality, s.body_part_examined,
                      s.series_description, s.series_number, s.state, s.last_received_at,
                      s.completed_at, counts.get(s.id, 0)) for s, uid in rows]
