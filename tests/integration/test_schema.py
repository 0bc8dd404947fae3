"""The migrations build exactly the schema the models declare, and hot queries use indexes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.dialects import sqlite

from storage import repository
from storage.db import Database
from storage.models import Base, Event


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
