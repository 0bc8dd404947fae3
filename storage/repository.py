"""Queries and updates of the index, one function per operation the service needs.

Every write is safe under concurrency (several receiver processes, several threads): rows are
created with ``INSERT ... ON CONFLICT`` and state changes are conditional ``UPDATE`` statements,
so two receivers never create a study twice and the completion monitor never completes a series
that just received another instance.

Nothing here maintains the instance count and byte total of ``/metrics``: triggers on
``instances`` (migration 0012) add every insert, delete and size change to the writer's row of
``instance_totals`` in the same transaction, so no statement of the ingest path is added.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import Select, and_, bindparam, delete, func, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

from storage.db import RawTransaction
from storage.models import (
    COMPLETE,
    RECEIVING,
    Event,
    Instance,
    Mpps,
    QuarantineRecord,
    Series,
    Study,
    UTCDateTime,
)

STUDY_COMPLETE = "study.complete"
SERIES_COMPLETE = "series.complete"


@dataclass(frozen=True)
class InstanceRecord:
    """The header fields of a received instance that the index keeps (all strings clipped)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    body_part_examined: str = ""
    series_description: str = ""
    series_number: int | None = None
    series_date: str = ""
    instance_number: int | None = None


class IndexOutcome(Enum):
    """What :func:`index_instance` did."""

    INSERTED = "inserted"
    DUPLICATE_KEPT = "duplicate-kept"
    REPLACED = "replaced"


@dataclass(frozen=True)
class IndexResult:
    """The outcome of indexing one instance, and a file that became garbage, if any.

    For a kept duplicate, `kept_path` is where the indexed first copy is.
    """

    outcome: IndexOutcome
    obsolete_path: str | None = None
    kept_path: str | None = None


# The ingest path runs these for every instance, so they are plain SQL compiled once (the ORM's
# per-statement overhead was most of the per-instance index cost). ``INSERT ... ON CONFLICT ...
# RETURNING`` has the same syntax on SQLite (3.35+) and PostgreSQL.
_FIND_INSTANCE = text("SELECT id, path FROM instances WHERE sop_instance_uid = :uid")
_UPSERT_PATIENT = text(
    "INSERT INTO patients (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
    " patient_sex) VALUES (:patient_id, :issuer_of_patient_id, :patient_name,"
    " :patient_birth_date, :patient_sex)"
    " ON CONFLICT (patient_id, issuer_of_patient_id) DO UPDATE SET patient_id ="
    " excluded.patient_id RETURNING id"
)
_UPSERT_STUDY = text(
    "INSERT INTO studies (study_instance_uid, patient_pk, accession_number, study_id,"
    " study_date, study_time, study_description, referring_physician_name, state,"
    " first_received_at, last_received_at, completion_count)"
    " VALUES (:study_instance_uid, :patient_pk, :accession_number, :study_id, :study_date,"
    " :study_time, :study_description, :referring_physician_name, :receiving, :now, :now, 0)"
    " ON CONFLICT (study_instance_uid) DO UPDATE SET last_received_at ="
    " excluded.last_received_at, state = excluded.state RETURNING id"
).bindparams(bindparam("now", type_=UTCDateTime()))
_UPSERT_SERIES = text(
    "INSERT INTO series (series_instance_uid, study_pk, modality, body_part_examined,"
    " series_description, series_number, series_date, state, last_received_at)"
    " VALUES (:series_instance_uid, :study_pk, :modality, :body_part_examined,"
    " :series_description, :series_number, :series_date, :receiving, :now)"
    " ON CONFLICT (series_instance_uid) DO UPDATE SET last_received_at ="
    " excluded.last_received_at, state = excluded.state RETURNING id"
).bindparams(bindparam("now", type_=UTCDateTime()))
# Our own results received back (:func:`index_instance` with ``own=True``): a new study or series
# is created complete (no quiet period, no completion event), an existing one is left as it is.
_UPSERT_OWN_STUDY = text(
    "INSERT INTO studies (study_instance_uid, patient_pk, accession_number, study_id,"
    " study_date, study_time, study_description, referring_physician_name, state,"
    " first_received_at, last_received_at, completed_at, completion_reason, completion_count)"
    " VALUES (:study_instance_uid, :patient_pk, :accession_number, :study_id, :study_date,"
    " :study_time, :study_description, :referring_physician_name, :complete, :now, :now, :now,"
    " :own_reason, 0)"
    " ON CONFLICT (study_instance_uid) DO UPDATE SET study_instance_uid ="
    " excluded.study_instance_uid RETURNING id"
).bindparams(bindparam("now", type_=UTCDateTime()))
_UPSERT_OWN_SERIES = text(
    "INSERT INTO series (series_instance_uid, study_pk, modality, body_part_examined,"
    " series_description, series_number, series_date, state, last_received_at, completed_at,"
    " own_results)"
    " VALUES (:series_instance_uid, :study_pk, :modality, :body_part_examined,"
    " :series_description, :series_number, :series_date, :complete, :now, :now, :own_results)"
    " ON CONFLICT (series_instance_uid) DO UPDATE SET series_instance_uid ="
    " excluded.series_instance_uid RETURNING id"
).bindparams(bindparam("now", type_=UTCDateTime()))
_FIND_RESULT = text("SELECT 1 FROM result_objects WHERE sop_instance_uid = :uid")
#: ``completion_reason`` of a study first created by our own results arriving.
OWN_RESULTS_REASON = "own-results"
_INSTANCE_VALUES = (
    "INSERT INTO instances (sop_instance_uid, series_pk, sop_class_uid, transfer_syntax_uid,"
    " instance_number, path, size_bytes, calling_ae_title, received_at)"
    " VALUES (:sop_instance_uid, :series_pk, :sop_class_uid, :transfer_syntax_uid,"
    " :instance_number, :path, :size_bytes, :calling_ae_title, :now)"
)
_INSERT_INSTANCE = text(
    _INSTANCE_VALUES + " ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id"
).bindparams(bindparam("now", type_=UTCDateTime()))
_UPSERT_INSTANCE = text(
    _INSTANCE_VALUES + " ON CONFLICT (sop_instance_uid) DO UPDATE SET"
    " series_pk = excluded.series_pk, sop_class_uid = excluded.sop_class_uid,"
    " transfer_syntax_uid = excluded.transfer_syntax_uid,"
    " instance_number = excluded.instance_number, path = excluded.path,"
    " size_bytes = excluded.size_bytes, calling_ae_title = excluded.calling_ae_title,"
    " received_at = excluded.received_at"
).bindparams(bindparam("now", type_=UTCDateTime()))


class _SessionStatements:
    """The two calls :func:`index_instance` makes, on a session (RawTransaction has them too)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def execute(self, statement: TextClause, params: Mapping[str, Any]) -> None:
        self.session.execute(statement, params)

    def first(self, statement: TextClause, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        row = self.session.execute(statement, params).first()
        return None if row is None else tuple(row)


def _statements(session: Session | RawTransaction) -> _SessionStatements | RawTransaction:
    return session if isinstance(session, RawTransaction) else _SessionStatements(session)


def find_instance_path(session: Session | RawTransaction, sop_instance_uid: str) -> str | None:
    """The store-relative path of an indexed instance, or None."""
    row = _statements(session).first(_FIND_INSTANCE, {"uid": sop_instance_uid})
    return None if row is None else str(row[1])


def is_result_object(session: Session | RawTransaction, sop_instance_uid: str) -> bool:
    """Whether `sop_instance_uid` is one of the result objects we created (an indexed lookup)."""
    return _statements(session).first(_FIND_RESULT, {"uid": sop_instance_uid}) is not None


def _returned_id(rows: _SessionStatements | RawTransaction, statement: TextClause,
                 values: Mapping[str, Any]) -> int:
    row = rows.first(statement, values)
    if row is None:  # an upsert with RETURNING always returns its row
        raise RuntimeError("INSERT ... ON CONFLICT DO UPDATE returned no row")
    return int(row[0])


def index_instance(
    session: Session | RawTransaction,
    record: InstanceRecord,
    *,
    path: str,
    size_bytes: int,
    calling_ae_title: str,
    now: datetime,
    replace: bool,
    own: bool = False,
) -> IndexResult:
    """Add (or replace) an instance row, creating its patient, study and series as needed.

    The caller commits. The study and series are (re-)opened: their state becomes
    ``receiving`` and their quiet period restarts, unless the instance was a kept duplicate or
    is one of our own results (`own`): those never re-open anything (a new study or series is
    created complete, its series marked ``own_results``), so no completion event follows.

    Parameters
    ----------
    session : Session or RawTransaction
        An open session, or the ingest path's :meth:`~storage.db.Database.raw_write`.
    record : InstanceRecord
        The instance's header fields.
    path : str
        Store-relative path of the file already in its final place.
    size_bytes : int
        File size.
    calling_ae_title : str
        Who sent it.
    now : datetime
        Reception time (timezone-aware).
    replace : bool
        The duplicate policy: True replaces an existing row, False keeps the first.
    own : bool
        The instance is one of our own results received back (design convention 14).

    Returns
    -------
    IndexResult
        What happened, and a store-relative path whose file is now unreferenced, if any.
    """
    rows = _statements(session)
    existing = rows.first(_FIND_INSTANCE, {"uid": record.sop_instance_uid})
    existing_path = None if existing is None else str(existing[1])
    if existing_path is not None and not replace:
        return IndexResult(IndexOutcome.DUPLICATE_KEPT, path if existing_path != path else None,
                           kept_path=existing_path)

    values = {f.name: getattr(record, f.name) for f in fields(record)}
    values.update(
        now=now, path=path, size_bytes=size_bytes, calling_ae_title=calling_ae_title[:16],
        receiving=RECEIVING, complete=COMPLETE, own_results=True, own_reason=OWN_RESULTS_REASON,
    )
    values["patient_pk"] = _returned_id(rows, _UPSERT_PATIENT, values)
    values["study_pk"] = _returned_id(rows, _UPSERT_OWN_STUDY if own else _UPSERT_STUDY, values)
    values["series_pk"] = _returned_id(rows, _UPSERT_OWN_SERIES if own else _UPSERT_SERIES,
                                       values)
    if replace:
        rows.execute(_UPSERT_INSTANCE, values)
        if existing_path is not None:
            return IndexResult(IndexOutcome.REPLACED, existing_path if existing_path != path
                               else None)
        return IndexResult(IndexOutcome.INSERTED)
    if rows.first(_INSERT_INSTANCE, values) is None:
        # A concurrent receiver indexed it between our check and our insert.
        winner = find_instance_path(session, record.sop_instance_uid)
        return IndexResult(IndexOutcome.DUPLICATE_KEPT, path if winner != path else None,
                           kept_path=winner)
    return IndexResult(IndexOutcome.INSERTED)


def add_quarantine(
    session: Session,
    *,
    path: str,
    reason: str,
    status: int,
    calling_ae_title: str,
    sop_instance_uid: str,
    now: datetime,
) -> None:
    """Record a refused instance (the caller commits)."""
    session.add(
        QuarantineRecord(
            path=path,
            reason=reason,
            status=status,
            calling_ae_title=calling_ae_title[:16],
            sop_instance_uid=sop_instance_uid[:128],
            created_at=now,
        )
    )


# -- completion -------------------------------------------------------------------------------
def _event(kind: str, study_uid: str, series_uid: str | None, reason: str, now: datetime) -> Event:
    return Event(
        kind=kind,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        reason=reason,
        created_at=now,
    )


def complete_quiet(
    session: Session, *, now: datetime, series_quiet: float, study_quiet: float
) -> list[Event]:
    """Complete every series and study that received nothing during its quiet period.

    A study completes only once none of its series is still receiving. The caller commits; the
    events are added to the session.

    Returns
    -------
    list of Event
        The ``series.complete`` and ``study.complete`` events emitted.
    """
    events: list[Event] = []
    series_cutoff = now - timedelta(seconds=series_quiet)
    due_series = session.execute(
        select(Series.id, Series.series_instance_uid, Study.study_instance_uid)
        .join(Study, Study.id == Series.study_pk)
        .where(Series.state == RECEIVING, Series.last_received_at <= series_cutoff)
    ).all()
    for series_pk, series_uid, study_uid in due_series:
        done = session.execute(
            update(Series)
            .where(
                Series.id == series_pk,
                Series.state == RECEIVING,
                Series.last_received_at <= series_cutoff,
            )
            .values(state=COMPLETE, completed_at=now)
        )
        if getattr(done, "rowcount", 0) == 1:
            events.append(_event(SERIES_COMPLETE, study_uid, series_uid, "quiet", now))

    study_cutoff = now - timedelta(seconds=study_quiet)
    still_receiving = select(Series.id).where(
        Series.study_pk == Study.id, Series.state == RECEIVING
    )
    due_studies = session.execute(
        select(Study.id, Study.study_instance_uid).where(
            Study.state == RECEIVING,
            Study.last_received_at <= study_cutoff,
            ~still_receiving.exists(),
        )
    ).all()
    for study_pk, study_uid in due_studies:
        if _complete_study(session, study_pk, now, "quiet", cutoff=study_cutoff):
            events.append(_event(STUDY_COMPLETE, study_uid, None, "quiet", now))
    session.add_all(events)
    return events


def _complete_study(
    session: Session, study_pk: int, now: datetime, reason: str, cutoff: datetime | None = None
) -> bool:
    conditions = [Study.id == study_pk, Study.state == RECEIVING]
    if cutoff is not None:
        conditions.append(Study.last_received_at <= cutoff)
    done = session.execute(
        update(Study)
        .where(and_(*conditions))
        .values(
            state=COMPLETE,
            completed_at=now,
            completion_reason=reason,
            completion_count=Study.completion_count + 1,
        )
    )
    return getattr(done, "rowcount", 0) == 1


# -- MPPS -------------------------------------------------------------------------------------
def upsert_mpps(
    session: Session,
    *,
    sop_instance_uid: str,
    status: str | None,
    study_instance_uid: str | None,
    referenced_sop_instance_uids: Sequence[str] | None,
    now: datetime,
    create: bool,
) -> bool:
    """Store an MPPS N-CREATE (``create=True``) or N-SET; the caller commits.

    Returns
    -------
    bool
        False if an N-CREATE names an existing step or an N-SET an unknown one.
    """
    row = session.scalar(select(Mpps).where(Mpps.sop_instance_uid == sop_instance_uid))
    if create:
        if row is not None:
            return False
        row = Mpps(
            sop_instance_uid=sop_instance_uid,
            status=status or "IN PROGRESS",
            study_instance_uid=study_instance_uid,
            referenced_sop_instance_uids=list(referenced_sop_instance_uids or []),
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        return True
    if row is None:
        return False
    if status:
        row.status = status
    if study_instance_uid:
        row.study_instance_uid = study_instance_uid
    if referenced_sop_instance_uids is not None:
        row.referenced_sop_instance_uids = list(referenced_sop_instance_uids)
    row.updated_at = now
    return True


def mpps_status(session: Session, sop_instance_uid: str) -> str | None:
    """The stored status of an MPPS, or None if unknown."""
    return session.scalar(select(Mpps.status).where(Mpps.sop_instance_uid == sop_instance_uid))


def complete_by_mpps(session: Session, *, now: datetime) -> list[Event]:
    """Complete the studies of every COMPLETED MPPS whose referenced instances have all arrived.

    The study and its series complete at once, without the quiet period. The caller commits.

    Returns
    -------
    list of Event
        The completion events emitted.
    """
    events: list[Event] = []
    waiting = session.scalars(
        select(Mpps).where(Mpps.status == "COMPLETED", Mpps.satisfied_at.is_(None))
    ).all()
    for mpps in waiting:
        wanted = mpps.referenced_sop_instance_uids
        have = _count_present(session, wanted)
        if have < len(set(wanted)):
            continue
        mpps.satisfied_at = now
        studies = session.execute(
            select(Study.id, Study.study_instance_uid)
            .join(Series, Series.study_pk == Study.id)
            .join(Instance, Instance.series_pk == Series.id)
            .where(Instance.sop_instance_uid.in_(wanted[:1000]))
            .distinct()
        ).all()
        for study_pk, study_uid in studies:
            open_series = session.execute(
                select(Series.id, Series.series_instance_uid).where(
                    Series.study_pk == study_pk, Series.state == RECEIVING
                )
            ).all()
            for series_pk, series_uid in open_series:
                session.execute(
                    update(Series)
                    .where(Series.id == series_pk)
                    .values(state=COMPLETE, completed_at=now)
                )
                events.append(_event(SERIES_COMPLETE, study_uid, series_uid, "mpps", now))
            if _complete_study(session, study_pk, now, "mpps"):
                events.append(_event(STUDY_COMPLETE, study_uid, None, "mpps", now))
    session.add_all(events)
    return events


def _count_present(session: Session, uids: Iterable[str]) -> int:
    unique = sorted(set(uids))
    total = 0
    for start in range(0, len(unique), 500):  # stay under bind-parameter limits
        chunk = unique[start : start + 500]
        total += session.scalar(
            select(func.count(Instance.id)).where(Instance.sop_instance_uid.in_(chunk))
        ) or 0
    return total


# -- events -----------------------------------------------------------------------------------
def pending_events_query(kinds: Sequence[str] | None = None,
                         limit: int = 100) -> Select[Event]:
    """The query of :func:`pending_events` (by kind: index ``ix_events_kind_pending``)."""
    query = select(Event).where(Event.consumed_at.is_(None))
    if kinds:
        query = query.where(Event.kind.in_(list(kinds)))
    return query.order_by(Event.id).limit(limit)


def pending_events(session: Session, *, kinds: Sequence[str] | None = None,
                   limit: int = 100) -> list[Event]:
    """Unconsumed events, oldest first."""
    return list(session.scalars(pending_events_query(kinds, limit)).all())


def mark_consumed(session: Session, event_ids: Sequence[int], now: datetime) -> None:
    """Mark events consumed (the caller commits)."""
    if event_ids:
        session.execute(
            update(Event).where(Event.id.in_(list(event_ids))).values(consumed_at=now)
        )


# -- reconciliation ---------------------------------------------------------------------------
def indexed_paths(session: Session) -> set[str]:
    """The store-relative path of every indexed instance."""
    return set(session.scalars(select(Instance.path)).all())


def delete_instances_by_path(session: Session, paths: Iterable[str]) -> int:
    """Remove the rows of instances whose files are gone (the caller commits)."""
    removed = 0
    chunk: list[str] = []
    for path in paths:
        chunk.append(path)
        if len(chunk) == 500:
            removed += _delete_chunk(session, chunk)
            chunk = []
    if chunk:
        removed += _delete_chunk(session, chunk)
    return removed


def _delete_chunk(session: Session, chunk: list[str]) -> int:
    result = session.execute(delete(Instance).where(Instance.path.in_(chunk)))
    return int(getattr(result, "rowcount", 0))
