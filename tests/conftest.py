"""Shared fixtures: databases (SQLite and PostgreSQL), settings, a running service, peers.

``DICOM_AI_REQUIRE_PEERS=1`` (set by ``.ci/run``) turns every "peer missing" skip into a
failure, so CI always exercises dcmtk, Orthanc, dicom3tools and PostgreSQL.

``DICOM_AI_DICOM__TUNE_NETWORK=false`` runs the suite on stock pynetdicom: every service,
receiver and requestor the tests start reads ``[dicom] tune_network`` from the environment
(:data:`TUNE_NETWORK`), and the tests of the tuning itself skip.

Every log record of the session (all loggers, from DEBUG, with exception text) is also appended
to ``<basetemp>/session-records.log``; ``tests/zz_privacy`` runs last and greps it, with every
other ``*.log`` the tests' services wrote under the basetemp, for the test patients' names and
IDs.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dicom_ai.config import LoggingSettings, Settings, load_settings
from dicom_ai.logs import setup_logging
from dicom_ai.service import Service
from storage.db import Database
from storage.filestore import FileStore
from tests.peers import binary

# Where every log record of the session goes (see pytest_configure), under the basetemp.
SESSION_LOG = "session-records.log"
PRIVACY_TESTS = "tests/zz_privacy/"


class _SessionLog(logging.Handler):
    """Appends each record, formatted with its exception text, to a file (fork-safe)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.DEBUG)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Record every log record of the session, whatever handlers the code installs.

    ``setup_logging`` (called by every CLI command) replaces the root handlers, so the file is
    fed from ``Logger.callHandlers``, which every record that passes its logger's level and
    filters goes through. The service's own policy applies, at its most verbose level (DEBUG).
    """
    basetemp = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    handler = _SessionLog(Path(basetemp) / SESSION_LOG)
    original = logging.Logger.callHandlers

    def call_handlers(self: logging.Logger, record: logging.LogRecord) -> None:
        handler.handle(record)
        original(self, record)

    logging.Logger.callHandlers = call_handlers  # type: ignore[method-assign]
    setup_logging(LoggingSettings(level="DEBUG"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Each test starts with the root logger at DEBUG (a CLI call may have set its level)."""
    logging.getLogger().setLevel(logging.DEBUG)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The privacy check greps what every other test logged: it runs last."""
    items.sort(key=lambda item: item.nodeid.startswith(PRIVACY_TESTS))


# A receiver thread may log after pytest closed the captured stream its handler writes to;
# the record still reaches the session log below, only the stale stream is gone.
logging.raiseExceptions = False

#: ``[dicom] tune_network`` of this run (``DICOM_AI_DICOM__TUNE_NETWORK``; default true).
TUNE_NETWORK = Settings().dicom.tune_network


def needs_tuning(what: str) -> pytest.MarkDecorator:
    """Skip a test of a property only dicom-ai's pynetdicom tuning gives, when it is off."""
    return pytest.mark.skipif(not TUNE_NETWORK, reason=f"{what} comes from the pynetdicom tuning "
                              "(dicom_ai.network.tuning), off: DICOM_AI_DICOM__TUNE_NETWORK=false")

PG_SERVER = os.environ.get("DICOM_AI_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REQUIRE_PEERS = os.environ.get("DICOM_AI_REQUIRE_PEERS") == "1"


def missing(reason: str) -> None:
    """Skip (on a user's machine) or fail (in CI) because a peer is missing."""
    if REQUIRE_PEERS:
        pytest.fail(f"required peer missing: {reason}")
    pytest.skip(reason)


def need_binary(name: str) -> str:
    """The path of an executable the test needs, else skip/fail naming its package."""
    path = binary(name)
    if path is None:
        package = {"dciodvfy": "dicom3tools", "Orthanc": "orthanc"}.get(name, "dcmtk")
        missing(f"{name} not found (apt-get install {package})")
    assert path is not None
    return path


def _postgres_database() -> Iterator[str]:
    import psycopg

    admin = PG_SERVER.replace("postgresql+psycopg://", "postgresql://") + "/test"
    name = f"dicom_ai_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        missing(f"PostgreSQL not reachable at {admin}: {exc}")
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty index database: SQLite in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite3'}"
    else:
        yield from _postgres_database()


#: The fixed "now" of the tests of the state machines (jobs, outbox), with :func:`at`.
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """T0 plus `seconds`."""
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated, empty index database (SQLite and PostgreSQL, from :func:`db_url`)."""
    database = Database(db_url)
    database.upgrade()
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    """An empty store under tmp_path."""
    return FileStore(tmp_path / "store")


@pytest.fixture
def make_settings(tmp_path: Path, db_url: str) -> Callable[..., Settings]:
    """Build settings for a test: loopback, a free port, the store under tmp_path.

    Keyword arguments are section dicts merged over the defaults, e.g.
    ``make_settings(dicom={"allowed_calling_aets": ["GOOD"]})``.
    """

    def build(**sections: dict[str, Any]) -> Settings:
        base: dict[str, dict[str, Any]] = {
            "dicom": {"host": "127.0.0.1", "port": 0, "receivers": 1},
            "api": {"host": "127.0.0.1", "port": 0},
            "storage": {"root": tmp_path / "store", "database_url": db_url,
                        "min_free_bytes": 0},
            "completion": {"series_quiet_seconds": 30, "study_quiet_seconds": 30,
                           "poll_seconds": 0.2},
            # Spawned processes (local workers, receivers) log here too: the privacy test
            # greps every *.log under the basetemp.
            "logging": {"level": "DEBUG", "file": tmp_path / "service.log"},
        }
        for key, values in sections.items():
            base[key] = {**base.get(key, {}), **values}
        return load_settings(None, **base)

    return build


@pytest.fixture
def start_service() -> Iterator[Callable[[Settings], Service]]:
    """Start services in this process (stopped at teardown); ``service.address`` has the port."""
    started: list[Service] = []

    def start(settings: Settings) -> Service:
        service = Service(settings)
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def service(make_settings: Callable[..., Settings],
            start_service: Callable[[Settings], Service]) -> Service:
    """A running service with default test settings."""
    return start_service(make_settings())
