"""Shared fixtures: databases (SQLite and PostgreSQL), settings, a running service, peers.

``DICOM_AI_REQUIRE_PEERS=1`` (set by ``.ci/run``) turns every "peer missing" skip into a
failure, so CI always exercises dcmtk, Orthanc, dicom3tools and PostgreSQL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_ai.config import Settings, load_settings
from dicom_ai.service import Service
from tests.peers import binary

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
            "logging": {"level": "DEBUG"},
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
