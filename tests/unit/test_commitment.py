"""Storage Commitment bookkeeping of the outbox (storage.outbox) and its DIMSE datasets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from dicom_ai.network.scu import (
    COMMITTED_SOME_FAILED,
    FileToSend,
    commitment_request,
    parse_commitment_report,
)
from storage import outbox
from storage.db import Database
from storage.models import COMMITTED, PENDING, SENT, Job, OutboxItem, ResultObject

SR = "1.2.840.10008.5.1.4.1.1.88.33"


def add_rows(db: Database, n: int, *, destination: str = "pacs") -> list[int]:
    """A done job with `n` result objects, one outbox row each (pending)."""
    now = datetime.now(UTC)
    with db.write_session() as session:
        job = Job(study_instance_uid="1.2.3", route="r", model_name="m", state="done",
                  not_before=now, created_at=now)
        session.add(job)
        session.flush()
        ids = []
        for i in range(n):
            result = ResultObject(job_id=job.id, kind="sr", study_instance_uid="1.2.3",
                                  series_instance_uid="1.2.3.9", sop_instance_uid=f"1.2.3.9.{i}",
                                  sop_class_uid=SR, path=f"results/{i}.dcm", created_at=now)
            session.add(result)
            session.flush()
            item = OutboxItem(result_id=result.id, job_id=job.id, destination=destination,
                              state=PENDING, attempts=1, next_attempt_at=now, created_at=now)
            session.add(item)
            session.flush()
            ids.append(item.id)
    return ids


def rows(db: Database) -> dict[int, OutboxItem]:
    with db.sessions() as session:
        return {r.id: r for r in session.scalars(select(OutboxItem)).all()}


def delivered_ids(db: Database) -> set[int]:
    with db.sessions() as session:
        return set(session.scalars(select(OutboxItem.id).where(outbox.delivered())).all())


@pytest.mark.postgres
def test_report_commits_and_fails_rows_of_its_transaction_only(db: Database) -> None:
    a, b, c = add_rows(db, 3)
    now = datetime.now(UTC)
    with db.write_session() as session:
        outbox.await_commitment(session, [a, b], transaction_uid="2.25.1", now=now)
        outbox.await_commitment(session, [c], transaction_uid="2.25.2", now=now)
    assert delivered_ids(db) == set(), "sent, awaiting commitment: not delivered"
    with db.sessions() as session:
        found = outbox.transaction(session, "2.25.1")
        assert outbox.transaction(session, "2.25.404") is None
        assert outbox.commitment_counts(session) == {"committed": 0, "awaiting": 3}
    assert found is not None
    assert found.destination == "pacs"
    assert set(found.awaiting) == {"1.2.3.9.0", "1.2.3.9.1"}
    with db.write_session() as session:
        # c belongs to another transaction: naming it here changes nothing
        result = outbox.record_report(session, found, committed=["1.2.3.9.0", "1.2.3.9.2"],
                                      failed=[("1.2.3.9.1", 0x0110)], now=now)
    assert result.committed == {"1.2.3": ["1.2.3.9.0"]}
    assert result.failed_count == 1
    assert result.unknown == 1
    got = rows(db)
    assert got[a].state == COMMITTED
    assert got[a].committed_at is not None
    assert got[b].state == PENDING
    assert "0x0110" in (got[b].last_error or "")
    assert got[b].commit_transaction_uid is None
    assert got[b].next_attempt_at <= datetime.now(UTC)
    assert got[c].state == SENT
    assert got[c].commit_transaction_uid == "2.25.2"
    assert delivered_ids(db) == {a}
    # The same report again: nothing more changes (b is no longer awaiting this transaction).
    with db.write_session() as session:
        again = outbox.transaction(session, "2.25.1")
        assert again is not None
        assert again.awaiting == {}
        assert again.committed == 1
        repeat = outbox.record_report(session, again, committed=["1.2.3.9.0"],
                                      failed=[("1.2.3.9.1", 0x0110)], now=now)
    assert repeat.committed_count == repeat.failed_count == 0
    assert rows(db)[b].state == PENDING


@pytest.mark.postgres
def test_unreported_commitments_expire_and_plain_sends_count_as_delivered(db: Database) -> None:
    a, b, c = add_rows(db, 3)
    then = datetime.now(UTC) - timedelta(seconds=10)
    with db.write_session() as session:
        outbox.await_commitment(session, [a], transaction_uid="2.25.1", now=then)
        outbox.await_commitment(session, [b], transaction_uid="2.25.2",
                                now=datetime.now(UTC))
        session.execute(update(OutboxItem).where(OutboxItem.id == c)
                        .values(state=SENT, sent_at=then))  # a destination without commitment
    assert delivered_ids(db) == {c}
    now = datetime.now(UTC)
    with db.write_session() as session:
        assert outbox.expire_commitments(session, now=now, timeout_seconds=5) == 1
    got = rows(db)
    assert got[a].state == PENDING
    assert got[a].commit_transaction_uid is None
    assert got[a].last_error == "no storage commitment report within 5 s"
    assert got[b].state == SENT
    assert got[c].state == SENT
    with db.write_session() as session:
        assert outbox.abandon_commitment(session, "2.25.2", now=now, error="refused: 0x0122",
                                         delay_seconds=3) == 1
    got = rows(db)
    assert got[b].state == PENDING
    assert got[b].next_attempt_at > now
    assert got[b].last_error == "refused: 0x0122"


def test_n_action_and_n_event_report_datasets() -> None:
    files = [FileToSend(Path(f"{i}.dcm"), SR, "1.2.840.10008.1.2.1", f"1.2.3.{i}")
             for i in range(2)]
    ds = commitment_request("2.25.7", files)
    assert ds.TransactionUID == "2.25.7"
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID)
            for r in ds.ReferencedSOPSequence] == [(SR, "1.2.3.0"), (SR, "1.2.3.1")]
    # A report: the first committed, the second failed
    report = ds.copy()
    failed = report.ReferencedSOPSequence.pop(1)
    failed.FailureReason = 0x0110
    report.FailedSOPSequence = [failed]
    parsed = parse_commitment_report(COMMITTED_SOME_FAILED, report)
    assert parsed.transaction_uid == "2.25.7"
    assert parsed.committed == [(SR, "1.2.3.0")]
    assert parsed.failed == [(SR, "1.2.3.1", 0x0110)]
    with pytest.raises(ValueError, match="event type"):
        parse_commitment_report(5, report)
    del report.TransactionUID
    with pytest.raises(ValueError, match="Transaction UID"):
        parse_commitment_report(1, report)


@pytest.mark.postgres
def test_migration_0009_upgrades_a_database_at_0008(db_url: str) -> None:
    """Outbox rows sent before 0009 stay delivered (no commitment was asked for them)."""
    from alembic import command
    from sqlalchemy import text

    from storage.db import alembic_config

    database = Database(db_url)
    try:
        cfg = alembic_config(db_url)
        with database.engine.begin() as connection:  # as storage.db.upgrade runs it
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "0008")
        now = datetime.now(UTC)
        with database.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, study_instance_uid, series_instance_uids, route, "
                "model_name, state, attempts, max_attempts, not_before, timings, created_at) "
                "VALUES (1, '1.2', '[]', 'r', 'm', 'done', 1, 3, :now, '{}', :now)"), {"now": now})
            conn.execute(text(
                "INSERT INTO result_objects (id, job_id, kind, study_instance_uid, "
                "series_instance_uid, sop_instance_uid, sop_class_uid, path, created_at) "
                "VALUES (1, 1, 'sr', '1.2', '1.2.1', '1.2.1.1', :sr, 'results/a.dcm', :now)"),
                {"now": now, "sr": SR})
            conn.execute(text(
                "INSERT INTO outbox (id, result_id, job_id, destination, state, attempts, "
                "next_attempt_at, created_at, sent_at) "
                "VALUES (1, 1, 1, 'pacs', 'sent', 1, :now, :now, :now)"), {"now": now})
        database.upgrade()
        [row] = rows(database).values()
        assert row.state == SENT
        assert row.commit_transaction_uid is None
        assert row.committed_at is None
        assert delivered_ids(database) == {1}
    finally:
        database.dispose()
