"""Engine and session set-up, and schema migrations applied on start.

SQLite is tuned for a durable, concurrent receiver: WAL journal (readers never block the writer),
``synchronous=NORMAL`` (a commit survives a process crash; after power loss the last commits may
be lost, which recovery repairs from the fsynced files), and a busy timeout so several receiver
processes can share one database file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

LOGGER = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Create an engine for `url` (``sqlite:///...`` or ``postgresql+psycopg://...``).

    Parameters
    ----------
    url : str
        An SQLAlchemy database URL.

    Returns
    -------
    Engine
        The engine; SQLite files get their folder created and WAL mode switched on.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=20,
            max_overflow=80,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_size=10, max_overflow=60, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """An Alembic configuration for our migrations, no ini file needed."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent; serialised on PostgreSQL).

    Parameters
    ----------
    engine : Engine
        The engine of the index database.
    """
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


SessionFactory = sessionmaker[Session]
"""The type of a session factory, for packages that must not import SQLAlchemy themselves."""


class Database:
    """The index database: an engine, its session factory, and a write gate.

    Parameters
    ----------
    url : str
        An SQLAlchemy database URL.
    """

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions: SessionFactory = make_session_factory(self.engine)
        # SQLite has one writer at a time and makes waiting writers sleep in growing steps
        # (1, 2, 5, 10 ms...). Queueing this process's writers on a lock instead keeps
        # concurrent associations from paying those sleeps; PostgreSQL needs no gate.
        self._write_gate: threading.Lock | None = (
            threading.Lock() if self.engine.dialect.name == "sqlite" else None
        )

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A session in a transaction that commits on exit (rolls back on error)."""
        gate = self._write_gate if self._write_gate is not None else nullcontext()
        with gate, self.sessions.begin() as session:
            yield session

    def upgrade(self) -> None:
        """Apply pending migrations."""
        upgrade(self.engine)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
