"""The audit trail: append-only rows of who did what to which UIDs, and when.

This module only inserts and reads: there is no update and no delete (retention never touches
the audit table either). Rows name AE titles, API key ids, hosts, UIDs and counts; the patient
attributes of the index (name, ID, birth date) never go into a row, and :func:`insert_events`
refuses details whose keys name them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from storage.models import ACTOR_API, ACTOR_DICOM, ACTOR_SYSTEM, AuditEvent, Instance, Series, Study

__all__ = ["ACTOR_KINDS", "MAX_UIDS", "AuditEntry", "AuditRecord", "insert_events",
           "list_events", "studies_of_instances"]

ACTOR_KINDS = (ACTOR_DICOM, ACTOR_API, ACTOR_SYSTEM)
#: At most this many UIDs are kept in a row's ``uids`` (the detail counts them all).
MAX_UIDS = 100
#: A detail longer than this (as JSON) is cut down to its scalar values.
MAX_DETAIL_CHARS = 4000
_MAX_LIMIT = 500
# Detail keys that would carry patient data (compared case-insensitively, without "_").
_PATIENT_KEYS = {"patientname", "patientid", "patientbirthdate", "otherpatientids",
                 "otherpatientnames", "patientaddress"}
_LOOKUP_CHUNK = 500


@dataclass(frozen=True)
class AuditEntry:
    """One action to record.

    Attributes
    ----------
    at : datetime
        When it happened (timezone-aware).
    actor_kind : str
        ``dicom`` (a peer, by calling AE title), ``api`` (an API key) or ``system``.
    actor : str
        The AE title, ``apikey:<id>``, or the component (``outbox``, ``retention``).
    action : str
        What was done, e.g. ``association.accepted``, ``instances.stored``, ``query.find``.
    peer : str or None
        The other side's host (caller or destination), when there is one.
    study_instance_uid : str or None
        The study acted on, when the action concerns one (indexed, for ``--study``).
    uids : tuple of str
        The UIDs acted on (studies, SOP instances); only the first :data:`MAX_UIDS` are kept.
    detail : mapping
        Counts, levels, statuses, destinations: JSON-serialisable, never patient data.
    """

    at: datetime
    actor_kind: str
    actor: str
    action: str
    peer: str | None = None
    study_instance_uid: str | None = None
    uids: tuple[str, ...] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    """A stored row, as listings show it."""

    id: int
    at: datetime
    actor_kind: str
    actor: str
    peer: str | None
    action: str
    study_instance_uid: str | None
    uids: list[str]
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``at`` in ISO 8601)."""
        return {"id": self.id, "at": self.at.isoformat(), "actor_kind": self.actor_kind,
                "actor": self.actor, "peer": self.peer, "action": self.action,
                "study_instance_uid": self.study_instance_uid, "uids": self.uids,
                "detail": self.detail}


def _check_detail(detail: Mapping[str, Any]) -> None:
    for key, value in detail.items():
        if str(key).replace("_", "").lower() in _PATIENT_KEYS:
            raise ValueError(f"audit detail key {key!r} would hold patient data")
        if isinstance(value, Mapping):
            _check_detail(value)


#: The table itself, for Core inserts (typed as a Table, unlike ``AuditEvent.__table__``).
_AUDIT_TABLE = AuditEvent.metadata.tables[AuditEvent.__tablename__]


def _bounded_detail(entry: AuditEntry, uids_total: int) -> dict[str, Any]:
    _check_detail(entry.detail)
    detail = dict(entry.detail)
    if uids_total > MAX_UIDS:
        detail["uids_total"] = uids_total
    # Through JSON text and back: values JSON has no type for (datetimes, paths) become
    # strings, as the JSON column's own serialiser would refuse them, and the size is known.
    text = json.dumps(detail, sort_keys=True, default=str)
    if len(text) <= MAX_DETAIL_CHARS:
        return dict(json.loads(text))
    # Too long: the scalar values only, as many as fit (in key order), so the row stays JSON.
    bounded: dict[str, Any] = {"detail_truncated": True}
    size = len(json.dumps(bounded))
    for key, value in sorted(detail.items()):
        if isinstance(value, str | int | float | bool):
            item = len(json.dumps({key: value}, default=str))
            if size + item > MAX_DETAIL_CHARS:
                break
            bounded[key] = value
            size += item
    return bounded


def insert_events(session: Session, entries: Iterable[AuditEntry]) -> int:
    """Append audit rows (the caller commits).

    Parameters
    ----------
    session : Session
        A session in a transaction.
    entries : iterable of AuditEntry
        What to record; UIDs beyond :data:`MAX_UIDS` are dropped (their number is kept as
        ``uids_total`` in the detail).

    Returns
    -------
    int
        How many rows were added.

    Raises
    ------
    ValueError
        An unknown actor kind, a naive time, or a detail key that names a patient attribute.
    """
    rows: list[dict[str, Any]] = []
    for entry in entries:
        if entry.actor_kind not in ACTOR_KINDS:
            raise ValueError(f"actor_kind must be one of {', '.join(ACTOR_KINDS)}")
        if entry.at.tzinfo is None:
            raise ValueError("audit times are timezone-aware")
        uids = list(dict.fromkeys(u for u in entry.uids if u))
        rows.append({
            "at": entry.at, "actor_kind": entry.actor_kind, "actor": entry.actor[:64],
            "peer": entry.peer[:64] if entry.peer else None, "action": entry.action[:32],
            "study_instance_uid": entry.study_instance_uid or None,
            "uids": uids[:MAX_UIDS], "detail": _bounded_detail(entry, len(uids))})
    if rows:
        # A Core executemany: the ORM's unit of work (identity map, id fetch per row) costs
        # several times more CPU, on the receiver's GIL, for rows nobody reads back here.
        session.execute(insert(_AUDIT_TABLE), rows)
    return len(rows)


def _record(row: AuditEvent) -> AuditRecord:
    return AuditRecord(row.id, row.at, row.actor_kind, row.actor, row.peer, row.action,
                       row.study_instance_uid, list(row.uids), dict(row.detail))


def list_events(session: Session, *, after: int | None = None, limit: int = 50,
                order: Literal["asc", "desc"] = "desc", action: str | None = None,
                study_instance_uid: str | None = None, since: datetime | None = None,
                until: datetime | None = None) -> list[AuditRecord]:
    """A keyset page of audit rows: ``WHERE <filters> AND id < :after ORDER BY id DESC``.

    Parameters
    ----------
    session : Session
        A session.
    after : int, optional
        The last id of the previous page.
    limit : int
        Page size (1-500).
    order : {"desc", "asc"}
        By id; ``desc`` is newest first.
    action : str, optional
        Only this action (indexed with the id), or, ending in ``.``, actions with that prefix
        (``association.``).
    study_instance_uid : str, optional
        Only rows about this study (indexed with the id).
    since, until : datetime, optional
        Only rows recorded at or after `since` and before `until` (indexed).

    Returns
    -------
    list of AuditRecord
        The page.
    """
    query = select(AuditEvent)
    if action is not None:
        query = query.where(AuditEvent.action.startswith(action, autoescape=True)
                            if action.endswith(".") else AuditEvent.action == action)
    if study_instance_uid is not None:
        query = query.where(AuditEvent.study_instance_uid == study_instance_uid)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if until is not None:
        query = query.where(AuditEvent.at < until)
    if after is not None:
        query = query.where(AuditEvent.id > after if order == "asc" else AuditEvent.id < after)
    query = query.order_by(AuditEvent.id.asc() if order == "asc" else AuditEvent.id.desc())
    query = query.limit(max(1, min(limit, _MAX_LIMIT)))
    return [_record(row) for row in session.scalars(query).all()]


def studies_of_instances(session: Session, sop_instance_uids: Sequence[str]
                         ) -> dict[str, Counter[str]]:
    """Where indexed instances belong: study UID -> series UID -> how many of them.

    The receiver tallies SOP Instance UIDs per association and resolves them here once, when
    the association ends, so the C-STORE path itself does no audit work. Instances no longer
    indexed (removed in between) are left out.
    """
    studies: dict[str, Counter[str]] = {}
    for start in range(0, len(sop_instance_uids), _LOOKUP_CHUNK):
        chunk = list(sop_instance_uids[start:start + _LOOKUP_CHUNK])
        for study_uid, series_uid in session.execute(
            select(Study.study_instance_uid, Series.series_instance_uid)
            .select_from(Instance)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .where(Instance.sop_instance_uid.in_(chunk))
        ).all():
            studies.setdefault(study_uid, Counter())[series_uid] += 1
    return studies
