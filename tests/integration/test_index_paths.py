"""The ingest path's bare DBAPI transaction writes exactly what a session writes.

:func:`storage.repository.index_instance` runs on a session (recovery) or on
:meth:`storage.db.Database.raw_write` (every received instance); the rows, timestamps included,
must not depend on which.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text

from storage import repository
from storage.db import Database
from storage.models import Instance

RECORD = repository.InstanceRecord(
    study_instance_uid="1.2.3.1", series_instance_uid="1.2.3.1.1", sop_instance_uid="1.2.3.1.1.1",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
    patient_id="P1", accession_number="A1", study_date="20260101", modality="CT",
    series_number=3, instance_number=7,
)
NOW = datetime(2026, 11, 26, 10, 30, 15, 123456, tzinfo=UTC)


def _index_both(db: Database, *, replace_first: bool) -> list[repository.IndexResult]:
    """Index one instance through a session and a sibling through the raw path."""
    sibling = replace(RECORD, sop_instance_uid="1.2.3.1.1.2", instance_number=8)
    results = []
    with db.write_session() as session:
        results.append(repository.index_instance(
            session, RECORD, path="a/1", size_bytes=10, calling_ae_title="MOD", now=NOW,
            replace=replace_first))
    with db.raw_write() as transaction:
        results.append(repository.index_instance(
            transaction, sibling, path="a/2", size_bytes=10, calling_ae_title="MOD", now=NOW,
            replace=replace_first))
    return results


@pytest.mark.parametrize("replace_first", [False, True])
def test_raw_and_session_rows_are_identical(db_url: str, replace_first: bool) -> None:
    db = Database(db_url)
    db.upgrade()
    try:
        results = _index_both(db, replace_first=replace_first)
        assert [r.outcome for r in results] == [repository.IndexOutcome.INSERTED] * 2
        with db.sessions() as session:
            rows = session.execute(text(
                "SELECT sop_instance_uid, series_pk, sop_class_uid, transfer_syntax_uid, "
                "instance_number, path, size_bytes, calling_ae_title, received_at "
                "FROM instances ORDER BY sop_instance_uid")).all()
            raw_stamp = session.execute(text(
                "SELECT CAST(received_at AS TEXT) FROM instances")).scalars().all()
            studies = session.execute(text("SELECT count(*) FROM studies")).scalar_one()
            series = session.execute(text("SELECT count(*) FROM series")).scalar_one()
        assert studies == series == 1
        first, second = rows
        assert first.series_pk == second.series_pk
        assert (first.instance_number, second.instance_number) == (7, 8)
        assert first[2:4] == second[2:4]
        assert first[6:8] == second[6:8]
        # The timestamp is stored in the same form (SQLite keeps text) and reads back the same.
        assert raw_stamp[0] == raw_stamp[1]
        with db.sessions() as session:
            stamps = session.execute(select(Instance.received_at)).scalars().all()
        assert stamps == [NOW, NOW]
    finally:
        db.dispose()


def test_raw_path_duplicates_and_rollback(db_url: str) -> None:
    db = Database(db_url)
    db.upgrade()
    try:
        with db.raw_write() as transaction:
            first = repository.index_instance(
                transaction, RECORD, path="a/1", size_bytes=10, calling_ae_title="MOD", now=NOW,
                replace=False)
        with db.raw_write() as transaction:
            kept = repository.index_instance(
                transaction, RECORD, path="a/9", size_bytes=10, calling_ae_title="MOD", now=NOW,
                replace=False)
        with db.raw_write() as transaction:
            replaced = repository.index_instance(
                transaction, RECORD, path="a/9", size_bytes=11, calling_ae_title="MOD", now=NOW,
                replace=True)
        assert first.outcome is repository.IndexOutcome.INSERTED
        assert (kept.outcome, kept.kept_path, kept.obsolete_path) == (
            repository.IndexOutcome.DUPLICATE_KEPT, "a/1", "a/9")
        assert (replaced.outcome, replaced.obsolete_path) == (
            repository.IndexOutcome.REPLACED, "a/1")
        # An error inside the block rolls everything in it back.
        def fail_after_indexing() -> None:
            with db.raw_write() as transaction:
                repository.index_instance(
                    transaction, replace(RECORD, sop_instance_uid="1.2.3.1.1.5"), path="a/5",
                    size_bytes=1, calling_ae_title="MOD", now=NOW, replace=False)
                raise RuntimeError("the file could not be placed")

        with pytest.raises(RuntimeError):
            fail_after_indexing()
        with db.sessions() as session:
            assert repository.find_instance_path(session, "1.2.3.1.1.5") is None
            assert repository.find_instance_path(session, RECORD.sop_instance_uid) == "a/9"
            sizes = session.execute(text("SELECT size_bytes FROM instances")).scalars().all()
        assert sizes == [11]
    finally:
        db.dispose()
