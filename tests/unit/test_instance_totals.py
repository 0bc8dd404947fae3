"""The running instance totals (migration 0012) stay equal to COUNT(*) and SUM(size_bytes) of
``instances`` through every path that writes it, on real SQLite and PostgreSQL indexes; on
PostgreSQL concurrent writers never wait on each other's totals row."""

from __future__ import annotations

import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from dicom_ai.ingest.index import read_stored_record
from dicom_ai.ingest.recovery import reconcile
from storage import metrics, repository, retention
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Instance, InstanceTotal
from tests.peers import make_ct_series


def _record(study: str, n: int) -> repository.InstanceRecord:
    return repository.InstanceRecord(
        study_instance_uid=f"2.25.{study}", series_instance_uid=f"2.25.{study}.1",
        sop_instance_uid=f"2.25.{study}.1.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id=f"P{study}", modality="CT")


def _index(db: Database, study: str, n: int, size: int, *, replace: bool = False,
           raw: bool = True) -> repository.IndexOutcome:
    """Index one instance as the receiver does (raw_write) or as recovery does (a session)."""
    record = _record(study, n)
    path = f"instances/{record.study_instance_uid}/{record.series_instance_uid}/" \
           f"{record.sop_instance_uid}.dcm"
    with db.raw_write() if raw else db.write_session() as transaction:
        return repository.index_instance(transaction, record, path=path, size_bytes=size,
                                         calling_ae_title="CT1", now=datetime.now(UTC),
                                         replace=replace).outcome


def _counted(db: Database) -> tuple[int, int]:
    """What the full scan says (the truth the totals must equal)."""
    with db.sessions() as session:
        count, total = session.execute(select(
            func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))).one()
    return int(count), int(total)


def _totals(db: Database) -> tuple[int, int]:
    with db.sessions() as session:
        return metrics.instance_totals(session)


def _shards(db: Database) -> int:
    with db.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(InstanceTotal)) or 0)


def _check(db: Database, expected: tuple[int, int]) -> None:
    assert _counted(db) == expected
    assert _totals(db) == expected
    with db.sessions() as session:
        snap = metrics.metrics_snapshot(session, now=datetime.now(UTC))
        assert (snap.instances, snap.instance_bytes) == expected
        assert retention.store_bytes(session) == expected[1]


def test_totals_follow_ingest_duplicates_replacement_retention_and_recovery(
        db: Database, tmp_path: Path) -> None:
    """Every path that adds, replaces or removes instance rows moves the totals with it."""
    _check(db, (0, 0))
    for n in range(5):
        assert _index(db, "1", n, 100 + n) is repository.IndexOutcome.INSERTED
    assert _index(db, "2", 0, 1000, raw=False) is repository.IndexOutcome.INSERTED
    _check(db, (6, 100 + 101 + 102 + 103 + 104 + 1000))

    # Re-sent duplicates (kept first copy, either path) count nothing.
    assert _index(db, "1", 0, 999) is repository.IndexOutcome.DUPLICATE_KEPT
    assert _index(db, "2", 0, 999, raw=False) is repository.IndexOutcome.DUPLICATE_KEPT
    _check(db, (6, 1510))

    # A replaced instance counts once, with its new size.
    assert _index(db, "1", 1, 5000, replace=True) is repository.IndexOutcome.REPLACED
    assert _index(db, "2", 0, 10, replace=True, raw=False) is repository.IndexOutcome.REPLACED
    _check(db, (6, 100 + 5000 + 102 + 103 + 104 + 10))

    # Retention deletes the rows of study 1's first two instances.
    with db.sessions() as session:
        ids = [pk for pk, _ in retention.instances_of_study(session, "2.25.1")][:2]
    with db.write_session() as session:
        assert retention.delete_instances(session, ids).instances == 2
    _check(db, (4, 102 + 103 + 104 + 10))

    # Recovery: the files of study 1 and 2 are gone (rows removed); real files placed in the
    # store without rows are indexed.
    store = FileStore(tmp_path / "store")
    sources = make_ct_series(tmp_path / "src", 3, size=16)
    sizes = 0
    for source in sources:
        record = read_stored_record(source)
        target = store.absolute(store.relative_path(
            record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        sizes += target.stat().st_size
    assert reconcile(store, db) == (3, 4, 0)
    _check(db, (3, sizes))


def test_the_migration_seeds_the_totals_from_the_rows_already_there(db_url: str) -> None:
    """A database at 0011 holding instances upgrades with its totals equal to its rows."""
    from alembic import command

    from storage.db import alembic_config

    database = Database(db_url)
    try:
        cfg = alembic_config(db_url)
        with database.engine.begin() as connection:  # as storage.db.upgrade runs it
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "0011")
        for n in range(4):
            _index(database, "7", n, 10 * (n + 1))
        database.upgrade()
        _check(database, (4, 100))
        _index(database, "7", 9, 5)
        _check(database, (5, 105))
    finally:
        database.dispose()


def _postgres_only(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("concurrent writers are a PostgreSQL matter (SQLite has one writer)")


def test_concurrent_writers_never_wait_on_each_other(db: Database, db_url: str) -> None:
    """A writer holding its transaction open (its totals row updated, not committed) does not
    block another writer's commit; then four threads index at once, with duplicates, and the
    totals equal the rows."""
    _postgres_only(db_url)
    _index(db, "0", 0, 1)  # the first totals row exists (no first-insert race in the check)
    with db.raw_write() as held:
        repository.index_instance(held, _record("10", 0), path="instances/a.dcm", size_bytes=7,
                                  calling_ae_title="A", now=datetime.now(UTC), replace=False)
        errors: list[BaseException] = []

        def other() -> None:
            try:
                with db.raw_write() as transaction:
                    # A wait on the held writer's row would fail here instead of hanging.
                    transaction.execute(text("SET LOCAL lock_timeout = '2s'"), {})
                    repository.index_instance(
                        transaction, _record("11", 0), path="instances/b.dcm", size_bytes=9,
                        calling_ae_title="B", now=datetime.now(UTC), replace=False)
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
        assert errors == []
        assert _counted(db) == _totals(db) == (2, 10)  # the held insert is not visible yet
    _check(db, (3, 17))

    failures: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for n in range(60):
                # Instances 0-29 of study 20 are sent by every writer (duplicates, races).
                study = "20" if n < 30 else f"2{k + 1}"
                _index(db, study, n, 1000 + n, raw=n % 2 == 0)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert not any(t.is_alive() for t in threads)
    expected = (3 + 30 + 4 * 30, 17 + sum(1000 + n for n in range(30))
                + 4 * sum(1000 + n for n in range(30, 60)))
    _check(db, expected)
    assert _shards(db) >= 2


def test_rows_of_closed_connections_are_folded_and_the_sum_kept(db: Database,
                                                                 db_url: str) -> None:
    """Each server process that writes adds a row; a read past FOLD_ABOVE rows folds those of
    closed connections into one, and the totals stay exact (PostgreSQL)."""
    _postgres_only(db_url)
    _index(db, "30", 0, 3)
    many = metrics.FOLD_ABOVE + 8
    for n in range(1, many + 1):
        _index(db, "30", n, 3)
        db.engine.dispose()  # the next write comes from a new server process
    assert _shards(db) > metrics.FOLD_ABOVE
    _check(db, (many + 1, 3 * (many + 1)))  # this read folds
    assert _shards(db) <= 2
    _check(db, (many + 1, 3 * (many + 1)))
    with db.engine.begin() as conn:  # TRUNCATE empties the totals with the rows
        conn.execute(text("TRUNCATE instances"))
    _check(db, (0, 0))
