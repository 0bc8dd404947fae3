"""Resource errors are waits, not attempts (issue 19): classification, the job state machine,
the job runner's results watermark, and polling loops that log an outage once.

Real databases (SQLite, PostgreSQL), real errors: SQLite's own "database or disk is full"
(``max_page_count`` reached), a PostgreSQL connection refused and a terminated backend, a
real ``ENOSPC`` from a small tmpfs (skipped where mounting is not permitted).
"""

from __future__ import annotations

import errno
import logging
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from dicom_ai.config import Settings, load_settings
from dicom_ai.dispatch.scheduler import Scheduler
from dicom_ai.exceptions import JobError, OutOfSpaceError
from dicom_ai.ingest.completion import CompletionMonitor
from dicom_ai.resources import results_space_problem, space_problem
from dicom_ai.runner.results import _write_atomic
from dicom_ai.runner.run import WAIT_PREFIX, JobRunner, resource_problem
from storage import jobs
from storage.db import Database, is_resource_error
from storage.models import FAILED, PENDING, RUNNING, WAITING, Job
from tests.conftest import PG_SERVER, T0, at, missing
from tests.peers import free_port

STUDY = "1.2.826.0.1.3680043.8.498.11"
SERIES = "1.2.826.0.1.3680043.8.498.12"


def new_job(db: Database, now: datetime = T0, max_attempts: int = 3) -> int:
    with db.write_session() as session:
        return jobs.create_job(session, study_instance_uid=STUDY, series_instance_uids=[SERIES],
                               route="chest", model_name="chest-nodule",
                               max_attempts=max_attempts, event_id=None, now=now).id


def job_row(db: Database, job_id: int) -> Job:
    with db.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


# -- classification --------------------------------------------------------------------------
def test_os_errors_of_a_full_disk_are_resource_errors() -> None:
    assert space_problem(OSError(errno.ENOSPC, "No space left on device")) == \
        "no space left on device"
    assert space_problem(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk quota exceeded"
    assert space_problem(OutOfSpaceError("store x has 5 bytes free")) == \
        "store x has 5 bytes free"
    # Anywhere in the chain: a wrapper raised from (or while handling) an ENOSPC.
    wrapped = JobError("cannot write the SR", retryable=False)
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert space_problem(wrapped) == "no space left on device"
    assert resource_problem(wrapped) == "no space left on device"
    for other in (OSError(errno.ENOENT, "No such file"), ValueError("1901-12-31"),
                  JobError("model failed", retryable=True)):
        assert space_problem(other) is None
        assert resource_problem(other) is None


def test_a_real_enospc_is_a_wait_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        missing(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.PixelData = np.zeros(1 << 20, np.uint8).tobytes()  # 1 MiB: more than the disk
        ds["PixelData"].VR = "OB"
        target = small / "results" / "x.dcm"
        with pytest.raises(OSError, match="No space left") as raised:
            _write_atomic(ds, target)
        assert resource_problem(raised.value) == "no space left on device"
        assert list((small / "results").iterdir()) == []  # the partial tmp file is gone
        problem = results_space_problem(small, 1 << 20)
        assert problem is not None
        assert "results_min_free_bytes" in problem
        assert results_space_problem(small, 0) is None
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_sqlite_database_or_disk_is_full_is_a_resource_error(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'full.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v BLOB)"))
    with engine.begin() as conn:
        # A real SQLITE_FULL: the file may not grow any more.
        conn.execute(text("PRAGMA max_page_count = 4"))
        with pytest.raises(OperationalError) as full:
            conn.execute(text("INSERT INTO t VALUES (zeroblob(100000))"))
    assert is_resource_error(full.value) == "index database full (database or disk is full)"
    assert resource_problem(full.value) == is_resource_error(full.value)
    # Not resource errors: trying again cannot help.
    with pytest.raises(OperationalError) as no_table, engine.begin() as conn:
        conn.execute(text("SELECT * FROM missing_table"))
    assert is_resource_error(no_table.value) is None
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE u (v INTEGER UNIQUE)"))
        conn.execute(text("INSERT INTO u VALUES (1)"))
    with pytest.raises(IntegrityError) as duplicate, engine.begin() as conn:
        conn.execute(text("INSERT INTO u VALUES (1)"))
    assert is_resource_error(duplicate.value) is None
    assert is_resource_error(ValueError("x")) is None
    engine.dispose()


@pytest.mark.postgres
def test_postgresql_unavailable_and_disk_full_are_resource_errors() -> None:
    down = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
                    "?connect_timeout=2")
    with pytest.raises(OperationalError) as refused, down.sessions() as session:
        session.execute(text("SELECT 1"))
    assert is_resource_error(refused.value) == "index database unavailable (OperationalError)"
    down.dispose()
    # A backend terminated under a live connection (what a server restart does).
    admin = PG_SERVER.replace("postgresql+psycopg://", "postgresql://") + "/test"
    try:
        psycopg.connect(admin, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        missing(f"PostgreSQL not reachable at {admin}: {exc}")
    engine = create_engine(f"{PG_SERVER}/test")
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with psycopg.connect(admin, autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(OperationalError) as terminated:
            conn.execute(text("SELECT 1"))
    reason = is_resource_error(terminated.value)
    assert reason is not None
    assert reason.startswith("index database unavailable"), reason
    engine.dispose()
    # DiskFull (SQLSTATE 53100) as SQLAlchemy wraps it.
    full = OperationalError("INSERT ...", {}, psycopg.errors.DiskFull("could not extend file"))
    assert is_resource_error(full) == "index database full (SQLSTATE 53100)"


# -- the job state machine -------------------------------------------------------------------
@pytest.mark.postgres
def test_a_wait_gives_the_attempt_back_and_is_due_again_later(db: Database) -> None:
    job_id = new_job(db)
    with db.write_session() as session:
        assert jobs.due_jobs(session, now=at(0), redispatch_after=60) == [job_id]
        job = jobs.claim_job(session, job_id, owner="w1", lease_seconds=60, now=at(0))
        assert job is not None
        assert job.attempts == 1
    with db.write_session() as session:
        state = jobs.wait_job(session, job_id, owner="w1",
                              reason=f"{WAIT_PREFIX}no space left on device",
                              retry_seconds=10, now=at(1))
    assert state == WAITING
    job = job_row(db, job_id)
    assert (job.state, job.attempts, job.lease_owner) == (WAITING, 0, None)
    assert job.error == "waiting: no space left on device"
    with db.write_session() as session:
        assert jobs.due_jobs(session, now=at(5), redispatch_after=60) == []
        assert jobs.claim_job(session, job_id, owner="w1", lease_seconds=60, now=at(5)) is None
        assert jobs.due_jobs(session, now=at(11), redispatch_after=60) == [job_id]
        job = jobs.claim_job(session, job_id, owner="w2", lease_seconds=60, now=at(11))
        assert job is not None
        assert (job.state, job.attempts) == (RUNNING, 1)
    with db.write_session() as session:  # a lease that is not ours changes nothing
        assert jobs.wait_job(session, job_id, owner="w1", reason="waiting: x",
                             retry_seconds=10, now=at(12)) is None
    assert job_row(db, job_id).state == RUNNING


@pytest.mark.postgres
def test_resource_errors_in_a_row_never_fail_a_job(db: Database) -> None:
    job_id = new_job(db, max_attempts=3)
    now = 0.0
    for _ in range(5):  # more waits than attempts
        with db.write_session() as session:
            assert jobs.claim_job(session, job_id, owner="w", lease_seconds=60,
                                  now=at(now)) is not None
            assert jobs.wait_job(session, job_id, owner="w",
                                 reason="waiting: index database unavailable",
                                 retry_seconds=10, now=at(now + 1)) == WAITING
        now += 11
    job = job_row(db, job_id)
    assert (job.state, job.attempts) == (WAITING, 0)
    # Real failures still count: the attempts are all there.
    for n in range(1, 4):
        with db.write_session() as session:
            assert jobs.claim_job(session, job_id, owner="w", lease_seconds=60,
                                  now=at(now)) is not None
            state = jobs.fail_job(session, job_id, owner="w", error="model failed",
                                  retryable=True, backoff_seconds=0, now=at(now))
        assert state == (PENDING if n < 3 else FAILED)
        now += 1


@pytest.mark.postgres
def test_a_new_job_supersedes_a_waiting_one_that_never_ran(db: Database) -> None:
    first = new_job(db)
    with db.write_session() as session:
        jobs.claim_job(session, first, owner="w", lease_seconds=60, now=at(0))
        jobs.wait_job(session, first, owner="w", reason="waiting: x", retry_seconds=10,
                      now=at(1))
    second = new_job(db, now=at(2))  # more images arrived: the new job covers them all
    assert job_row(db, first).state == FAILED
    assert job_row(db, second).state == PENDING


# -- the job runner ---------------------------------------------------------------------------
def runner_settings(tmp_path: Path, db_url: str, results_min_free_bytes: int,
                    routed: bool = True) -> Settings:
    return load_settings(
        None, storage={"root": tmp_path / "store", "database_url": db_url,
                       "min_free_bytes": 0, "results_min_free_bytes": results_min_free_bytes},
        workers={"resource_wait_seconds": 10},
        routes=[{"name": "chest", "match": {"Modality": ["CR"]}, "model": "chest-nodule"}]
        if routed else [])


@pytest.mark.postgres
def test_runner_waits_below_the_results_watermark_without_running_the_model(
        tmp_path: Path, db: Database, db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = runner_settings(tmp_path, db_url, results_min_free_bytes=1 << 62)
    settings.storage.root.mkdir(parents=True)
    runner = JobRunner(settings, owner="w", db=db)
    job_id = new_job(db, now=datetime.now(UTC))
    caplog.set_level(logging.DEBUG, logger="dicom_ai.runner.run")
    for n in range(4):  # more than max_attempts
        if n:  # due again (as resource_wait_seconds later)
            with db.write_session() as session:
                session.get(Job, job_id).not_before = datetime.now(UTC)  # type: ignore[union-attr]
        assert runner.run(job_id) == WAITING
        job = job_row(db, job_id)
        assert (job.state, job.attempts) == (WAITING, 0)
        assert job.error is not None
        assert job.error.startswith(
            "waiting: results store below storage.results_min_free_bytes (")
        assert job.not_before > datetime.now(UTC) + timedelta(seconds=8)
    assert runner.models._loaded == {}  # the model never ran (never even loaded)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "waits, no attempt used" in r.getMessage()]
    assert len(warnings) == 1  # once when it starts waiting, not at every retry
    # Room again: the job resumes and uses its first attempt (it then fails at once: its
    # route is gone from these settings, so no model loads in a unit test).
    runner.settings = runner_settings(tmp_path, db_url, results_min_free_bytes=0, routed=False)
    with db.write_session() as session:
        session.get(Job, job_id).not_before = datetime.now(UTC)  # type: ignore[union-attr]
    assert runner.run(job_id) == FAILED
    assert any("resumes" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)
    job = job_row(db, job_id)
    assert (job.state, job.attempts) == (FAILED, 1)
    assert job.error == "route 'chest' is no longer configured"


def fill_up(path: Path) -> None:
    """Write zeros to `path` until its filesystem has no block left (raises ENOSPC)."""
    with path.open("wb") as fh:
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()


def test_recording_an_outcome_waits_for_a_full_index_then_completes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The SQLite index on a filesystem filled to the last byte: SQLite's own "database or disk
    is full"; the worker keeps retrying the write (logged once) until the ballast goes."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        missing(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    url = f"sqlite:///{small / 'index.sqlite3'}"
    db = Database(url)
    try:
        db.upgrade()
        settings = runner_settings(tmp_path, url, results_min_free_bytes=0)
        runner = JobRunner(settings, owner="w", db=db)
        job_id = new_job(db, now=datetime.now(UTC))
        with db.write_session() as session:
            assert jobs.claim_job(session, job_id, owner="w", lease_seconds=60,
                                  now=datetime.now(UTC)) is not None
        ballast = small / "ballast"
        with pytest.raises(OSError, match="No space left"):
            fill_up(ballast)
        caplog.set_level(logging.INFO, logger="dicom_ai.runner.run")
        outcome: list[str | None] = []

        def record() -> None:
            outcome.append(runner._write(job_id, "recording that it waits", lambda s: (
                jobs.wait_job(s, job_id, owner="w", reason="waiting: x", retry_seconds=10,
                              now=datetime.now(UTC)))))

        thread = threading.Thread(target=record)
        thread.start()
        time.sleep(2.0)
        assert thread.is_alive(), f"the write should be retrying, not done: {outcome}"
        ballast.unlink()
        thread.join(timeout=20)
        assert outcome == [WAITING]
        assert job_row(db, job_id).state == WAITING
        lines = [r.getMessage() for r in caplog.records if r.name == "dicom_ai.runner.run"]
        assert [m for m in lines if "retrying until it is back" in m] == [
            f"job {job_id}: index database full (database or disk is full) while recording "
            "that it waits; retrying until it is back"]
        assert any("the index is back after" in m for m in lines)
    finally:
        db.dispose()
        subprocess.run(["umount", "-l", str(small)], check=False)


# -- polling loops survive an unavailable index, logging it once ------------------------------
def test_scheduler_and_completion_loops_log_an_outage_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none?connect_timeout=2"
    settings = load_settings(None, storage={"root": tmp_path / "store", "database_url": url},
                             workers={"poll_seconds": 0.05},
                             completion={"poll_seconds": 0.05})

    class Sink:
        def submit(self, job_ids: list[int]) -> None:
            """Nothing is due: the index is down."""

    db = Database(url)
    scheduler = Scheduler(settings, db, Sink())
    monitor = CompletionMonitor(db, settings.completion)
    caplog.set_level(logging.DEBUG)
    scheduler.start()
    monitor.start()
    try:
        time.sleep(1.5)  # about 30 polls each
        assert scheduler._thread is not None
        assert scheduler._thread.is_alive()
        assert monitor._thread is not None
        assert monitor._thread.is_alive()
    finally:
        scheduler.stop()
        monitor.stop()
        db.dispose()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    by_logger: dict[str, int] = {}
    for record in errors:
        by_logger[record.name] = by_logger.get(record.name, 0) + 1
    # One line per step and outage: routing and dispatching, and the completion check.
    assert by_logger == {"dicom_ai.dispatch.scheduler": 2, "dicom_ai.ingest.completion": 1}, \
        [r.getMessage() for r in errors]
