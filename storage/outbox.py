"""The outbox: result objects to deliver, their senders' claims, and Storage Commitment.

A pending row is sent by one sender at a time (:func:`claim_outbox`, a lease) and stays pending
with a growing delay until the destination accepts it (:func:`mark_sent`, :func:`mark_retry`):
nothing is dropped. Rows are written with their job's results (:func:`storage.jobs.complete_job`)
and made due again by an operator (:func:`resend_result`, :func:`retry_delivery`).

Delivered means committed where a destination asks for Storage Commitment.

A destination with ``storage_commitment = true`` (PS3.4 annex J, Push Model) has its result
objects C-STOREd, then named in one N-ACTION (a Transaction UID per association). The rows
sent are ``sent`` with ``commit_transaction_uid`` and ``commit_requested_at`` set; they become
``committed`` when the destination's N-EVENT-REPORT (on the same association or a new one, to
any receiver of the deployment: the rows, not memory, hold the transaction) lists them, and go
back to ``pending`` (due at once, same file and SOP Instance UID) when it lists them as failed
or reports nothing within ``delivery.commitment_timeout_seconds``.

A row is *delivered* (:func:`delivered`) when committed, or sent to a destination without
commitment (``sent`` and no commitment requested). Retention, batch counts, the API and the
dashboard use this predicate wherever "sent" meant delivered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from storage.models import COMMITTED, PENDING, SENT, OutboxItem, ResultObject
from storage.paging import Order, grouped, keyset

__all__ = [
    "CommitTransaction",
    "Delivery",
    "ReportOutcome",
    "abandon_commitment",
    "await_commitment",
    "awaiting",
    "claim_outbox",
    "commitment_counts",
    "delivered",
    "deliveries_of_results",
    "expire_commitments",
    "list_outbox",
    "mark_retry",
    "mark_sent",
    "outbox_counts",
    "record_report",
    "release_outbox_claims",
    "resend_result",
    "retry_delivery",
    "transaction",
]


# -- the sender's claims ----------------------------------------------------------------------
@dataclass(frozen=True)
class Delivery:
    """One claimed outbox row with what the sender needs."""

    outbox_id: int
    destination: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    attempts: int
    study_instance_uid: str = ""


def claim_outbox(session: Session, *, now: datetime, lease_seconds: float,
                 limit: int = 200) -> list[Delivery]:
    """Take due pending outbox rows for this sender (a lease, so senders never double-send)."""
    candidates = session.execute(
        select(OutboxItem.id).where(
            OutboxItem.state == PENDING, OutboxItem.next_attempt_at <= now,
            or_(OutboxItem.lease_expires_at.is_(None), OutboxItem.lease_expires_at < now),
        ).order_by(OutboxItem.id).limit(limit)
    ).scalars().all()
    lease = now + timedelta(seconds=lease_seconds)
    taken: list[Delivery] = []
    for outbox_id in candidates:
        won = session.execute(
            update(OutboxItem).where(
                OutboxItem.id == outbox_id, OutboxItem.state == PENDING,
                or_(OutboxItem.lease_expires_at.is_(None), OutboxItem.lease_expires_at < now),
            ).values(lease_expires_at=lease, attempts=OutboxItem.attempts + 1)
        ).rowcount  # type: ignore[attr-defined]
        if not won:
            continue
        item, result = session.execute(
            select(OutboxItem, ResultObject).join(ResultObject,
                                                  OutboxItem.result_id == ResultObject.id)
            .where(OutboxItem.id == outbox_id)
        ).one()
        taken.append(Delivery(item.id, item.destination, result.path, result.sop_class_uid,
                              result.sop_instance_uid, item.attempts,
                              result.study_instance_uid))
    return taken


def release_outbox_claims(session: Session, outbox_ids: Sequence[int], *,
                          lease: datetime) -> int:
    """Release rows a dead sender claimed, so they are sent now instead of after the claim.

    `lease` is the claim's expiry, recorded by that sender: a row whose lease differs was
    claimed again since (by another sender after the claim expired) and keeps its claim.
    """
    if not outbox_ids:
        return 0
    return int(session.execute(
        update(OutboxItem).where(OutboxItem.id.in_(list(outbox_ids)),
                                 OutboxItem.state == PENDING,
                                 OutboxItem.lease_expires_at == lease)
        .values(lease_expires_at=None)
    ).rowcount)  # type: ignore[attr-defined]


def mark_sent(session: Session, outbox_id: int, *, now: datetime, detail: str) -> None:
    """The destination accepted the object (success or warning status)."""
    session.execute(
        update(OutboxItem).where(OutboxItem.id == outbox_id)
        .values(state=SENT, sent_at=now, lease_expires_at=None, last_error=detail or None,
                # a destination without storage commitment: delivered as sent (storage.outbox)
                commit_transaction_uid=None, commit_requested_at=None, committed_at=None)
    )


def mark_retry(session: Session, outbox_id: int, *, now: datetime, error: str,
               delay_seconds: float) -> None:
    """Sending failed: stay pending and try again after `delay_seconds`."""
    session.execute(
        update(OutboxItem).where(OutboxItem.id == outbox_id)
        .values(next_attempt_at=now + timedelta(seconds=delay_seconds), lease_expires_at=None,
                last_error=error[:2000])
    )


def outbox_counts(session: Session) -> dict[str, int]:
    """Outbox rows by state."""
    rows = session.execute(
        select(OutboxItem.state, func.count()).group_by(OutboxItem.state)
    ).all()
    return {str(state): int(count) for state, count in rows}


# -- readers ----------------------------------------------------------------------------------
def list_outbox(session: Session, *, after: int | None = None, limit: int = 50,
                order: Order = "desc", state: str | None = None,
                destination: str | None = None, job_id: int | None = None,
                failing: bool = False) -> list[tuple[OutboxItem, ResultObject]]:
    """Outbox rows with their result object, one keyset page (:mod:`storage.paging`; ``desc``,
    the default, is newest first), filtered by state, destination or job.

    ``failing`` keeps pending rows whose last attempt failed (the dashboard's table).
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
    rows = session.execute(keyset(query, OutboxItem.id, after, limit, order)).all()
    return [(item, result) for item, result in rows]


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
    return grouped(session, OutboxItem, OutboxItem.result_id, [int(r) for r in result_ids])


# -- operator actions -------------------------------------------------------------------------
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


# -- Storage Commitment -----------------------------------------------------------------------
def delivered() -> ColumnElement[bool]:
    """SQL: the outbox row is delivered (committed, or sent without commitment requested)."""
    return or_(OutboxItem.state == COMMITTED,
               and_(OutboxItem.state == SENT, OutboxItem.commit_requested_at.is_(None)))


def awaiting() -> ColumnElement[bool]:
    """SQL: the outbox row was sent and its commitment was requested, not yet reported."""
    return and_(OutboxItem.state == SENT, OutboxItem.commit_requested_at.is_not(None))


def await_commitment(session: Session, outbox_ids: Sequence[int], *, transaction_uid: str,
                     now: datetime, details: dict[int, str] | None = None) -> None:
    """The destination stored these rows' objects; their commitment is requested next.

    Written (and committed) before the N-ACTION goes out: the report may reach another
    receiver, on a new association, before the N-ACTION's own response reaches us.

    Parameters
    ----------
    session : Session
        A write session.
    outbox_ids : sequence of int
        The rows whose objects the destination accepted (C-STORE success or warning).
    transaction_uid : str
        The Transaction UID the N-ACTION will carry (PS3.4 J.3.2.1.1).
    now : datetime
        Send time.
    details : dict, optional
        Per row, the C-STORE warning status text (kept as ``last_error``, as for a plain send).
    """
    details = details or {}
    for outbox_id in outbox_ids:
        session.execute(
            update(OutboxItem).where(OutboxItem.id == outbox_id)
            .values(state=SENT, sent_at=now, lease_expires_at=None,
                    last_error=details.get(outbox_id) or None,
                    commit_transaction_uid=transaction_uid, commit_requested_at=now,
                    committed_at=None)
        )


@dataclass(frozen=True)
class CommitTransaction:
    """An outstanding Storage Commitment transaction: its destination and objects."""

    transaction_uid: str
    destination: str
    # SOP Instance UID -> (outbox id, SOP Class UID, Study Instance UID) of rows still awaiting
    awaiting: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    # rows of the transaction already committed (a repeated report is answered success)
    committed: int = 0


def transaction(session: Session, transaction_uid: str) -> CommitTransaction | None:
    """The transaction's rows, or None if no outbox row carries `transaction_uid`."""
    rows = session.execute(
        select(OutboxItem.id, OutboxItem.destination, OutboxItem.state,
               ResultObject.sop_class_uid, ResultObject.sop_instance_uid,
               ResultObject.study_instance_uid)
        .join(ResultObject, OutboxItem.result_id == ResultObject.id)
        .where(OutboxItem.commit_transaction_uid == transaction_uid)
    ).all()
    if not rows:
        return None
    waiting = {str(row.sop_instance_uid): (int(row.id), str(row.sop_class_uid),
                                           str(row.study_instance_uid))
               for row in rows if row.state == SENT}
    return CommitTransaction(transaction_uid, str(rows[0].destination), waiting,
                             sum(1 for row in rows if row.state == COMMITTED))


@dataclass
class ReportOutcome:
    """What one N-EVENT-REPORT changed: rows committed and rows to send again, by study."""

    committed: dict[str, list[str]] = field(default_factory=dict)  # study -> SOP Instance UIDs
    failed: dict[str, list[str]] = field(default_factory=dict)
    unknown: int = 0  # references naming no awaiting row of the transaction

    @property
    def committed_count(self) -> int:
        """Rows committed by this report."""
        return sum(len(v) for v in self.committed.values())

    @property
    def failed_count(self) -> int:
        """Rows this report sends back to pending."""
        return sum(len(v) for v in self.failed.values())


def record_report(session: Session, found: CommitTransaction, *,
                  committed: Iterable[str], failed: Iterable[tuple[str, int]],
                  now: datetime) -> ReportOutcome:
    """Apply an N-EVENT-REPORT (PS3.4 J.3.3) to the transaction's awaiting rows.

    Rows named committed become ``committed``; rows named failed go back to ``pending``, due
    now, ``last_error`` naming the Failure Reason (e.g. ``0x0110``), so the sender sends the
    same file again. Rows the report does not name keep waiting (until the timeout). Each
    update is conditional on the row still awaiting this transaction, so a repeated or late
    report changes nothing.

    Parameters
    ----------
    session : Session
        A write session.
    found : CommitTransaction
        From :func:`transaction`.
    committed : iterable of str
        SOP Instance UIDs of the Referenced SOP Sequence.
    failed : iterable of (str, int)
        SOP Instance UID and Failure Reason of each Failed SOP Sequence item.
    now : datetime
        Report time.
    """
    outcome = ReportOutcome()
    mine = and_(OutboxItem.commit_transaction_uid == found.transaction_uid,
                OutboxItem.state == SENT)
    for sop_instance_uid in committed:
        row = found.awaiting.get(sop_instance_uid)
        if row is None:
            outcome.unknown += 1
            continue
        if session.execute(update(OutboxItem).where(OutboxItem.id == row[0], mine)
                           .values(state=COMMITTED, committed_at=now)).rowcount:  # type: ignore[attr-defined]
            outcome.committed.setdefault(row[2], []).append(sop_instance_uid)
    for sop_instance_uid, reason in failed:
        row = found.awaiting.get(sop_instance_uid)
        if row is None:
            outcome.unknown += 1
            continue
        if session.execute(update(OutboxItem).where(OutboxItem.id == row[0], mine).values(
                state=PENDING, next_attempt_at=now, lease_expires_at=None,
                commit_transaction_uid=None, commit_requested_at=None,
                last_error=f"storage commitment failed: failure reason 0x{reason:04X}",
        )).rowcount:  # type: ignore[attr-defined]
            outcome.failed.setdefault(row[2], []).append(sop_instance_uid)
    return outcome


def abandon_commitment(session: Session, transaction_uid: str, *, now: datetime, error: str,
                       delay_seconds: float) -> int:
    """The N-ACTION itself failed: the transaction's awaiting rows are retried with backoff."""
    return int(session.execute(
        update(OutboxItem).where(OutboxItem.commit_transaction_uid == transaction_uid,
                                 OutboxItem.state == SENT)
        .values(state=PENDING, next_attempt_at=now + timedelta(seconds=delay_seconds),
                lease_expires_at=None, commit_transaction_uid=None, commit_requested_at=None,
                last_error=error[:2000])
    ).rowcount)  # type: ignore[attr-defined]


def expire_commitments(session: Session, *, now: datetime, timeout_seconds: float) -> int:
    """Send again what was not reported within `timeout_seconds`; returns how many rows.

    One indexed update (``ix_outbox_commit_due``): cheap enough for every sender poll.
    """
    cutoff = now - timedelta(seconds=timeout_seconds)
    return int(session.execute(
        update(OutboxItem).where(OutboxItem.state == SENT,
                                 OutboxItem.commit_requested_at < cutoff)
        .values(state=PENDING, next_attempt_at=now, lease_expires_at=None,
                commit_transaction_uid=None, commit_requested_at=None,
                last_error=f"no storage commitment report within {timeout_seconds:g} s")
        .execution_options(synchronize_session=False)
    ).rowcount)  # type: ignore[attr-defined]


def commitment_counts(session: Session) -> dict[str, int]:
    """Rows ``committed`` and rows ``awaiting`` a commitment report."""
    committed = session.scalar(
        select(func.count(OutboxItem.id)).where(OutboxItem.state == COMMITTED)) or 0
    waiting = session.scalar(select(func.count(OutboxItem.id)).where(awaiting())) or 0
    return {"committed": int(committed), "awaiting": int(waiting)}
