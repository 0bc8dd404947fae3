"""Engine and session set-up, and schema migrations applied on start.

SQLite is tuned for a durable, concurrent receiver: WAL journal (readers never block the writer),
``synchronous=NORMAL`` (a commit survives a process crash; after power loss the last commits may
be lost, which recovery repairs from the fsynced files), and a busy timeout so several receiver
processes can share one database file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import TextClause

if TYPE_CHECKING:
    from alembic.config import Config

LOGGER = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
#: The newest migration's revision (a test holds it equal to the migrations folder's head).
HEAD_REVISION = "0012"


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
    from alembic.config import Config

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
    if schema_revision(engine) == HEAD_REVISION:
        # Nothing to do, and Alembic's imports (0.2-0.5 s on the 2-core machine) are skipped:
        # a restart answers its first C-ECHO that much sooner.
        return
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def schema_revision(engine: Engine) -> str | None:
    """The migration the database is at (``alembic_version``), ``None`` for an empty database.

    Parameters
    ----------
    engine : Engine
        The engine of the index database.

    Returns
    -------
    str or None
        The revision id, e.g. ``"0006"``.
    """
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return None if revision is None else str(revision)


#: Raised when the database cannot be reached; the API answers 503 for it.
DatabaseError = sa_exc.OperationalError


def ping(session: Session) -> None:
    """Run ``SELECT 1`` (raises :data:`DatabaseError` when the database is unreachable)."""
    session.execute(text("SELECT 1"))


# -- resource errors: a wait, not an attempt ---------------------------------------------------
# sqlite3 messages of a database that is full, or cannot be reached or written for now.
_SQLITE_FULL = ("database or disk is full",)
_SQLITE_UNAVAILABLE = ("disk i/o error", "unable to open database file", "database is locked")
# PostgreSQL SQLSTATE classes (appendix A of its manual): 08 connection exception, 53
# insufficient resources (53100 disk full), 57P01-57P03 shutdown / cannot connect now, 58 system
# error (58030 I/O error).
_PG_FULL = ("53100",)
_PG_UNAVAILABLE_PREFIXES = ("08", "53", "57P01", "57P02", "57P03", "58")


def is_resource_error(exc: BaseException) -> str | None:
    """Why `exc` means the index is full or unavailable for now, or None when it does not.

    Such an error is a wait, not a failed attempt (design convention 15): the same statement
    works once the disk has room again or the server is back. Integrity, programming and data
    errors are not resource errors (trying again cannot help).

    Parameters
    ----------
    exc : BaseException
        Any exception; its cause and context chain is searched too. SQLAlchemy's
        ``OperationalError``, ``InterfaceError``, ``DisconnectionError`` and pool timeouts, and
        the bare ``sqlite3`` and ``psycopg`` errors of :meth:`Database.raw_write`, are
        recognised.

    Returns
    -------
    str or None
        ``"index database full (...)"`` or ``"index database unavailable (...)"`` with the
        driver's fixed text or SQLSTATE in brackets (never a statement or a value), or None.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        reason = _resource_reason(current)
        if reason is not None:
            return reason
        current = current.__cause__ or current.__context__
    return None


def _resource_reason(exc: BaseException) -> str | None:
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return f"index database unavailable ({type(exc).__name__})"
    orig: BaseException | None = exc
    wrapped = False
    if isinstance(exc, sa_exc.DBAPIError):
        wrapped = True
        orig = exc.orig
        if exc.connection_invalidated:
            return "index database unavailable (connection lost)"
    elif not type(exc).__module__.startswith(("sqlite3", "psycopg")):
        return None
    driver = type(orig).__module__.split(".")[0] if orig is not None else ""
    name = type(orig).__name__ if orig is not None else type(exc).__name__
    if driver == "sqlite3":
        text_ = str(orig).strip().lower()
        if any(text_.startswith(m) for m in _SQLITE_FULL):
            return "index database full (database or disk is full)"
        if any(text_.startswith(m) for m in _SQLITE_UNAVAILABLE):
            return f"index database unavailable ({text_.split(chr(10))[0][:80]})"
        return None
    if driver == "psycopg":
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate in _PG_FULL:
            return f"index database full (SQLSTATE {sqlstate})"
        if sqlstate and str(sqlstate).startswith(_PG_UNAVAILABLE_PREFIXES):
            return f"index database unavailable (SQLSTATE {sqlstate})"
        # No SQLSTATE: the client could not connect or lost the connection.
        if sqlstate is None and name in ("OperationalError", "InterfaceError"):
            return f"index database unavailable ({name})"
        return None
    if wrapped and isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return f"index database unavailable ({type(exc).__name__})"  # another driver
    return None


SessionFactory = sessionmaker[Session]
"""The type of a session factory, for packages that must not import SQLAlchemy themselves."""


@dataclass(frozen=True)
class _Compiled:
    """A text statement compiled once for a dialect: SQL, parameter order, bind processors."""

    sql: str
    positional: tuple[str, ...] | None  # names in order (qmark), None for named parameters
    names: tuple[str, ...]
    processors: dict[str, Callable[[Any], Any]]

    @classmethod
    def of(cls, statement: TextClause, dialect: Dialect) -> _Compiled:
        compiled = statement.compile(dialect=dialect)
        processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        positional = tuple(compiled.positiontup) if compiled.positiontup is not None else None
        return cls(compiled.string, positional, tuple(compiled.binds), processors)

    def parameters(self, params: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        def value(name: str) -> Any:
            processor = self.processors.get(name)
            return params[name] if processor is None else processor(params[name])

        if self.positional is not None:
            return tuple(value(name) for name in self.positional)
        return {name: value(name) for name in self.names}


class RawTransaction:
    """Text statements on a DBAPI cursor, in one transaction (see :meth:`Database.raw_write`).

    Runs the same ``text()`` statements a session would, compiled once per dialect, without
    the session and result machinery: on the per-instance ingest path that machinery cost more
    than the database work itself.
    """

    def __init__(self, cursor: Any, compile_statement: Callable[[TextClause], _Compiled]) -> None:
        self._cursor = cursor
        self._compile = compile_statement

    def execute(self, statement: TextClause, params: Mapping[str, Any]) -> None:
        """Run a statement that returns no rows."""
        compiled = self._compile(statement)
        self._cursor.execute(compiled.sql, compiled.parameters(params))

    def first(self, statement: TextClause, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Run a statement that returns rows; its first row (a tuple), or None."""
        compiled = self._compile(statement)
        self._cursor.execute(compiled.sql, compiled.parameters(params))
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)


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
        self._compiled: dict[TextClause, _Compiled] = {}

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A session in a transaction that commits on exit (rolls back on error)."""
        gate = self._write_gate if self._write_gate is not None else nullcontext()
        with gate, self.sessions.begin() as session:
            yield session

    @contextmanager
    def raw_write(self) -> Iterator[RawTransaction]:
        """Like :meth:`write_session`, on a bare DBAPI connection: for the hottest path only.

        The statements run on a pooled connection inside the same write gate and commit on exit
        (roll back on error).
        """
        gate = self._write_gate if self._write_gate is not None else nullcontext()
        with gate:
            connection = self.engine.raw_connection()
            try:
                cursor = connection.cursor()
                try:
                    yield RawTransaction(cursor, self._compile)
                    connection.commit()
                except BaseException:
                    connection.rollback()
                    raise
                finally:
                    cursor.close()
            finally:
                connection.close()  # back to the pool

    def _compile(self, statement: TextClause) -> _Compiled:
        compiled = self._compiled.get(statement)
        if compiled is None:
            compiled = self._compiled[statement] = _Compiled.of(statement, self.engine.dialect)
        return compiled

    def upgrade(self) -> None:
        """Apply pending migrations."""
        upgrade(self.engine)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
