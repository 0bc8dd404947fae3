"""The migrations build exactly the schema the models declare, and hot queries use indexes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.dialects import sqlite

from storage import repository
from storage.db import Database
from storage.models import AuditEvent, Base, Batch, Event, FindingRecord, Job, Mpps


def test_migrations_match_the_models(db_url: str) -> None:
    """``alembic upgrade head`` leaves nothing for autogenerate to add, drop or alter."""
    db = Database(db_url)
    db.upgrade()
    try:
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        db.dispose()


def test_pending_study_events_do_not_scan_unconsumed_series_events(tmp_path: Path) -> None:
    """The scheduler's per-tick query finds pending study events by index, whatever the
    number of ``series.complete`` events (never consumed) before them."""
    db = Database(f"sqlite:///{tmp_path}/index.sqlite3")
    db.upgrade()
    now = datetime.now(UTC)
    try:
        with db.write_session() as session:
            session.add_all(Event(kind=repository.SERIES_COMPLETE, study_instance_uid=f"1.{i}",
                                  series_instance_uid=f"1.{i}.1", reason="quiet", created_at=now)
                            for i in range(2000))
            session.add(Event(kind=repository.STUDY_COMPLETE, study_instance_uid="1.9",
                              reason="quiet", created_at=now))
        with db.sessions() as session:
            [found] = repository.pending_events(session, kinds=[repository.STUDY_COMPLETE])
            assert found.study_instance_uid == "1.9"
        query = repository.pending_events_query([repository.STUDY_COMPLETE])
        compiled = str(query.compile(dialect=sqlite.dialect(),
                                     compile_kwargs={"literal_binds": True}))
        with db.engine.connect() as conn:
            plan = " ".join(str(row[-1]) for row in conn.execute(
                text(f"EXPLAIN QUERY PLAN {compiled}")))
        assert "ix_events_kind_pending" in plan, plan
    finally:
        db.dispose()


def test_head_revision_is_the_migrations_head() -> None:
    from alembic.script import ScriptDirectory

    from storage.db import HEAD_REVISION, MIGRATIONS, alembic_config

    cfg = alembic_config("sqlite://")
    assert str(MIGRATIONS) == cfg.get_main_option("script_location")
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


def test_an_up_to_date_database_starts_without_alembic(db_url: str) -> None:
    """A restart checks the schema's revision and skips Alembic (its imports cost 0.2-0.5 s)."""
    import subprocess
    import sys

    from storage.db import HEAD_REVISION, schema_revision

    db = Database(db_url)
    try:
        assert schema_revision(db.engine) is None  # empty database
        db.upgrade()
        assert schema_revision(db.engine) == HEAD_REVISION
    finally:
        db.dispose()
    script = (
        "import sys\n"
        "from storage.db import Database\n"
        f"db = Database({db_url!r})\n"
        "db.upgrade()\n"
        "db.dispose()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parents[2])
    assert done.stdout.strip() == "[]"


@pytest.mark.postgres
def test_migration_0010_reads_json_text_of_a_database_at_0009_as_objects(db_url: str) -> None:
    """Rows written as JSON text before 0010 read back as lists and dicts, unchanged."""
    from alembic import command
    from sqlalchemy import select

    from storage.db import alembic_config

    database = Database(db_url)
    try:
        cfg = alembic_config(db_url)
        with database.engine.begin() as connection:  # as storage.db.upgrade runs it
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "0009")
        now = datetime.now(UTC)
        cut = '{"note": "' + "x" * 3990  # an audit detail an older version cut into non-JSON
        with database.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO mpps (id, sop_instance_uid, status, referenced_sop_instance_uids, "
                "created_at, updated_at) VALUES (1, '1.9', 'COMPLETED', '[\"1.2.3\", \"1.2.4\"]', "
                ":now, :now)"), {"now": now})
            conn.execute(text(
                "INSERT INTO jobs (id, study_instance_uid, series_instance_uids, route, "
                "model_name, state, attempts, max_attempts, not_before, timings, created_at) "
                "VALUES (1, '1.2', '[\"1.2.1\"]', 'r', 'm', 'done', 1, 3, :now, "
                "'{\"inference\": 0.25, \"queue\": 1}', :now)"), {"now": now})
            conn.execute(text(
                "INSERT INTO batches (id, kind, source, query, state, created_at, updated_at) "
                "VALUES (1, 'run', 'pacs', '{\"accessions\": [\"A1\"], \"modality\": null}', "
                "'created', :now, :now)"), {"now": now})
            conn.execute(text(  # a child row: the batch's row is kept, not copied and dropped
                "INSERT INTO batch_studies (id, batch_id, study_instance_uid, accession_number, "
                "study_date, state, retrieved_instances, failed_suboperations, attempts) "
                "VALUES (1, 1, '1.2', 'A1', '20260101', 'found', 0, 0, 0)"))
            conn.execute(text(
                "INSERT INTO audit_events (id, at, actor_kind, actor, action, uids, detail) "
                "VALUES (1, :now, 'dicom', 'AE', 'instances.stored', '[\"1.2\"]', "
                "'{\"instances\": 3, \"nested\": {\"a\": [1, 2]}}'), "
                "(2, :now, 'system', 'outbox', 'result.sent', '[]', :cut)"),
                {"now": now, "cut": cut})
        database.upgrade()
        with database.sessions() as session:
            assert session.scalars(select(Mpps.referenced_sop_instance_uids)).one() == [
                "1.2.3", "1.2.4"]
            job = session.scalars(select(Job)).one()
            assert job.series_instance_uids == ["1.2.1"]
            assert job.timings == {"inference": 0.25, "queue": 1}
            assert session.scalars(select(Batch.query)).one() == {"accessions": ["A1"],
                                                                  "modality": None}
            events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
            assert [(e.id, e.uids, e.detail) for e in events] == [
                (1, ["1.2"], {"instances": 3, "nested": {"a": [1, 2]}}),
                (2, [], {"detail_truncated": True})]
        with database.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        with database.engine.begin() as connection:  # and back: the text is JSON again
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, "0009")
        with database.engine.connect() as conn:
            assert json.loads(conn.execute(text("SELECT timings FROM jobs")).scalar_one()) == {
                "inference": 0.25, "queue": 1}
            assert json.loads(conn.execute(text(
                "SELECT detail FROM audit_events WHERE id = 1")).scalar_one()) == {
                "instances": 3, "nested": {"a": [1, 2]}}
    finally:
        database.dispose()


@pytest.mark.postgres
def test_migration_0011_reads_finding_locations_of_a_database_at_0010_as_objects(
        db_url: str) -> None:
    """findings.location written as JSON text before 0011 reads back as a dict (or None)."""
    from alembic import command
    from sqlalchemy import select

    from storage.db import alembic_config

    database = Database(db_url)
    try:
        cfg = alembic_config(db_url)
        with database.engine.begin() as connection:  # as storage.db.upgrade runs it
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "0010")
        now = datetime.now(UTC)
        with database.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, study_instance_uid, series_instance_uids, route, "
                "model_name, state, attempts, max_attempts, not_before, timings, created_at) "
                "VALUES (1, '1.2', '[\"1.2.1\"]', 'r', 'm', 'done', 1, 3, :now, '{}', :now)"),
                {"now": now})
            conn.execute(text(
                "INSERT INTO findings (id, job_id, ordinal, study_instance_uid, "
                "series_instance_uid, sop_instance_uid, frame_number, model_name, "
                "model_version, label, code_value, code_scheme, code_meaning, probability, "
                "threshold, present, location_kind, location, tracking_uid, created_at, "
                "out_of_distribution) VALUES "
                "(1, 1, 0, '1.2', '1.2.1', '1.2.1.1', NULL, 'm', '1', 'nodule', '27925004', "
                "'SCT', 'Nodule', 0.9, 0.5, true, 'bbox', "
                "'{\"point\": [10.5, 20.25], \"bbox\": [1, 2, 30, 40], \"area_pixels\": 7}', "
                "'1.9.1', :now, false), "
                "(2, 1, 1, '1.2', '1.2.1', '', NULL, 'm', '1', 'nodule', '27925004', 'SCT', "
                "'Nodule', 0.1, 0.5, false, NULL, NULL, '1.9.2', :now, false), "
                "(3, 1, 2, '1.2', '1.2.1', '', NULL, 'm', '1', 'nodule', '27925004', 'SCT', "
                "'Nodule', 0.1, 0.5, false, NULL, '', '1.9.3', :now, false)"), {"now": now})
        with database.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "0011")
        with database.engine.connect() as conn:
            locations = conn.execute(
                select(FindingRecord.id, FindingRecord.location).order_by(FindingRecord.id)
            ).all()
            assert [tuple(row) for row in locations] == [
                (1, {"point": [10.5, 20.25], "bbox": [1, 2, 30, 40], "area_pixels": 7}),
                (2, None), (3, None)]
            # No geometry is SQL NULL, not the JSON value null.
            assert conn.execute(text(
                "SELECT count(*) FROM findings WHERE location IS NULL")).scalar_one() == 2
        with database.engine.begin() as connection:  # and back: the text is JSON again
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, "0010")
        with database.engine.connect() as conn:
            assert json.loads(conn.execute(text(
                "SELECT location FROM findings WHERE id = 1")).scalar_one()) == {
                "point": [10.5, 20.25], "bbox": [1, 2, 30, 40], "area_pixels": 7}
            assert conn.execute(text(
                "SELECT location FROM findings WHERE id = 2")).scalar_one() is None
    finally:
        database.dispose()


def test_a_finding_without_geometry_is_stored_as_sql_null(db_url: str) -> None:
    """The ORM writes None as SQL NULL and a geometry as an object it reads back equal."""
    from sqlalchemy import select

    from storage import jobs

    database = Database(db_url)
    database.upgrade()
    try:
        now = datetime.now(UTC)
        with database.write_session() as session:
            job = jobs.create_job(session, study_instance_uid="1.2", series_instance_uids=["1.2.1"],
                                  route="r", model_name="m", max_attempts=3, event_id=None,
                                  now=now)
            for ordinal, location in enumerate(({"point": [1.5, 2.0]}, None)):
                session.add(FindingRecord(
                    job_id=job.id, ordinal=ordinal, study_instance_uid="1.2",
                    series_instance_uid="1.2.1", sop_instance_uid="", frame_number=None,
                    model_name="m", model_version="1", label="l", code_value="c",
                    code_scheme="SCT", code_meaning="C", probability=0.5, threshold=0.5,
                    present=False, location_kind=None, location=location, segment_number=None,
                    heatmap_path=None, tracking_uid=f"1.9.{ordinal}", created_at=now,
                    ood_score=None, out_of_distribution=False))
        with database.sessions() as session:
            assert session.scalars(select(FindingRecord.location)
                                   .order_by(FindingRecord.ordinal)).all() == [
                {"point": [1.5, 2.0]}, None]
        with database.engine.connect() as conn:
            assert conn.execute(text(
                "SELECT count(*) FROM findings WHERE location IS NULL")).scalar_one() == 1
    finally:
        database.dispose()
