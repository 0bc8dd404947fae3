"""Series and study completion over real associations: quiet periods, MPPS, restarts, events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from dicom_ai.config import Settings
from dicom_ai.ingest.completion import CompletionEvent
from dicom_ai.service import Service
from storage import jobs, repository, studies
from storage.db import Database
from storage.models import COMPLETE, RECEIVING, Event, Study
from tests.integration.test_receive import port_of, send_paths
from tests.peers import make_ct_series, mpps_dataset

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112

FAST = {"series_quiet_seconds": 0.5, "study_quiet_seconds": 1.0, "poll_seconds": 0.1}
MPPS_ONLY = {"series_quiet_seconds": 60, "study_quiet_seconds": 60, "poll_seconds": 0.1}


# -- helpers ----------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@contextmanager
def open_index(settings: Settings) -> Iterator[Database]:
    """A second connection to the service's index, disposed on exit."""
    db = Database(settings.storage.url)
    try:
        yield db
    finally:
        db.dispose()


def study(db: Database, study_uid: str) -> studies.StudyRow:
    """The index's summary of one study (it must exist)."""
    with db.sessions() as session:
        found = studies.get_study(session, study_uid)
    assert found is not None, f"study {study_uid} not indexed"
    return found


def state_is(db: Database, study_uid: str, state: str) -> Callable[[], bool]:
    """A predicate: the study is in `state`."""
    return lambda: study(db, study_uid).state == state


def completion_count(db: Database, study_uid: str) -> int:
    """How many times a study became complete."""
    with db.sessions() as session:
        count = session.scalar(
            select(Study.completion_count).where(Study.study_instance_uid == study_uid)
        )
    assert count is not None
    return count


def events_of(db: Database, study_uid: str, kind: str) -> list[Event]:
    """Unconsumed events of one kind for one study, oldest first."""
    with db.sessions() as session:
        pending = repository.pending_events(session, kinds=[kind], limit=1000)
    return [e for e in pending if e.study_instance_uid == study_uid]


def all_events_of(db: Database, study_uid: str, kind: str) -> list[Event]:
    """Every event (consumed or not) of one kind for one study, oldest first."""
    with db.sessions() as session:
        return list(session.scalars(
            select(Event).where(Event.study_instance_uid == study_uid, Event.kind == kind)
            .order_by(Event.id)).all())


def uids(paths: list[Path]) -> tuple[str, str]:
    """The Study and Series Instance UIDs of a series written by make_ct_series."""
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def headers(paths: list[Path]) -> list[Dataset]:
    """The headers of `paths` (what an MPPS references)."""
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@contextmanager
def mpps_association(port: int) -> Iterator[Any]:
    """An association proposing only Modality Performed Procedure Step, released on exit."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MPPS_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_AI")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def status_of(response: tuple[Dataset, Dataset | None]) -> int:
    """The DIMSE status of an N-CREATE/N-SET response; -1 if none came."""
    status = response[0]
    return int(status.Status) if "Status" in status else -1


def n_create(assoc: Any, ds: Dataset, instance_uid: str) -> int:
    """Send an MPPS N-CREATE; its status."""
    return status_of(assoc.send_n_create(ds, MPPS_SOP_CLASS, instance_uid))


def n_set(assoc: Any, ds: Dataset, instance_uid: str) -> int:
    """Send an MPPS N-SET; its status."""
    return status_of(assoc.send_n_set(ds, MPPS_SOP_CLASS, instance_uid))


# -- quiet period -----------------------------------------------------------------------------
def test_quiet_period_completes_reopens_and_events_are_consumed(
    make_settings: Callable[..., Settings],
    start_service: Callable[[Settings], Service],
    tmp_path: Path,
) -> None:
    """A quiet series/study completes once with one event each; a late instance re-opens it."""
    settings = make_settings(completion=FAST)
    service = start_service(settings)
    paths = make_ct_series(tmp_path / "ct", 4, size=32)
    study_uid, series_uid = uids(paths)
    assert send_paths(port_of(service), paths[:3]) == [SUCCESS] * 3
    with open_index(settings) as db:
        first = study(db, study_uid)
        assert first.state == RECEIVING
        assert first.instances == 3
        assert wait_for(state_is(db, study_uid, COMPLETE), 5.0)
        done = study(db, study_uid)
        assert done.completion_reason == "quiet"
        assert done.completed_at is not None
        assert completion_count(db, study_uid) == 1
        series_events = events_of(db, study_uid, repository.SERIES_COMPLETE)
        study_events = all_events_of(db, study_uid, repository.STUDY_COMPLETE)
        assert [e.series_instance_uid for e in series_events] == [series_uid]
        assert len(study_events) == 1
        assert study_events[0].series_instance_uid is None
        assert study_events[0].reason == "quiet"
        # The scheduler takes each study.complete event once and records its routing: with no
        # routes configured, the series is recorded as unrouted.
        assert wait_for(lambda: not events_of(db, study_uid, repository.STUDY_COMPLETE), 5.0)
        with db.sessions() as session:
            decisions = jobs.decisions_of_study(session, study_uid)
        assert [(d.series_instance_uid, d.route, d.job_id) for d in decisions] == [
            (series_uid, None, None)]
        assert decisions[0].reason.startswith("unrouted")

        # A late instance re-opens the study, which completes (and is announced) again.
        assert send_paths(port_of(service), paths[3:]) == [SUCCESS]
        assert study(db, study_uid).state == RECEIVING
        assert wait_for(state_is(db, study_uid, COMPLETE), 5.0)
        again = study(db, study_uid)
        assert completion_count(db, study_uid) == 2
        assert again.instances == 4
        assert again.completion_reason == "quiet"
        assert len(all_events_of(db, study_uid, repository.STUDY_COMPLETE)) == 2
        series_events = events_of(db, study_uid, repository.SERIES_COMPLETE)
        assert len(series_events) == 2

        # Consumed events are no longer pending (series events are for consumers to come).
        with db.write_session() as session:
            repository.mark_consumed(session, [series_events[0].id], datetime.now(UTC))
        assert [e.id for e in events_of(db, study_uid, repository.SERIES_COMPLETE)] == [
            series_events[1].id
        ]
        with db.write_session() as session:
            every = repository.pending_events(session, limit=1000)
            repository.mark_consumed(session, [e.id for e in every], datetime.now(UTC))
        with db.sessions() as session:
            assert repository.pending_events(session) == []


def test_on_event_callback_receives_series_and_study_events(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Service(on_event=...) is called with a CompletionEvent for the series and the study."""
    settings = make_settings(completion=FAST)
    received: list[CompletionEvent] = []
    lock = threading.Lock()

    def callback(event: CompletionEvent) -> None:
        with lock:
            received.append(event)

    def kinds() -> list[str]:
        with lock:
            return [e.kind for e in received]

    service = Service(settings, on_event=callback)
    service.start()
    try:
        paths = make_ct_series(tmp_path / "ct", 2, size=32)
        study_uid, series_uid = uids(paths)
        assert send_paths(port_of(service), paths) == [SUCCESS] * 2
        assert wait_for(lambda: repository.STUDY_COMPLETE in kinds(), 5.0)
    finally:
        service.stop()
    with lock:
        events = list(received)
    assert all(isinstance(e, CompletionEvent) for e in events)
    assert [e.kind for e in events] == [repository.SERIES_COMPLETE, repository.STUDY_COMPLETE]
    series_event, study_event = events
    assert series_event.study_instance_uid == study_uid
    assert series_event.series_instance_uid == series_uid
    assert study_event.study_instance_uid == study_uid
    assert study_event.series_instance_uid is None
    assert study_event.reason == "quiet"
    assert study_event.created_at.tzinfo is not None
    with open_index(settings) as db:
        ids = [e.id for e in all_events_of(db, study_uid, repository.STUDY_COMPLETE)]
    assert ids == [study_event.id]


# -- MPPS -------------------------------------------------------------------------------------
def test_mpps_statuses_and_completion(
    make_settings: Callable[..., Settings],
    start_service: Callable[[Settings], Service],
    tmp_path: Path,
) -> None:
    """MPPS N-CREATE/N-SET answer PS3.4 F.7 statuses; a COMPLETED step completes its study."""
    settings = make_settings(completion=MPPS_ONLY)
    service = start_service(settings)
    port = port_of(service)
    paths = make_ct_series(tmp_path / "a", 3, size=32)
    study_uid, _ = uids(paths)
    step_uid = generate_uid()
    with mpps_association(port) as assoc, open_index(settings) as db:
        assert n_create(assoc, mpps_dataset(study_uid, "IN PROGRESS"), step_uid) == SUCCESS
        assert n_create(assoc, mpps_dataset(study_uid, "IN PROGRESS"), step_uid) == (
            DUPLICATE_SOP_INSTANCE
        )
        assert n_create(assoc, mpps_dataset(study_uid, "COMPLETED"), generate_uid()) == (
            INVALID_ATTRIBUTE_VALUE
        )
        assert n_set(assoc, mpps_dataset(study_uid, "COMPLETED"), generate_uid()) == (
            NO_SUCH_OBJECT_INSTANCE
        )

        assert send_paths(port, paths) == [SUCCESS] * 3
        assert study(db, study_uid).state == RECEIVING
        completed = mpps_dataset(study_uid, "COMPLETED", headers(paths))
        assert n_set(assoc, completed, step_uid) == SUCCESS
        assert wait_for(state_is(db, study_uid, COMPLETE), 2.0)
        assert study(db, study_uid).completion_reason == "mpps"
        study_events = all_events_of(db, study_uid, repository.STUDY_COMPLETE)
        assert [e.reason for e in study_events] == ["mpps"]
        # A final step may not be modified.
        assert n_set(assoc, completed, step_uid) == PROCESSING_FAILURE

        # A step referencing an instance that has not arrived waits for it.
        more = make_ct_series(tmp_path / "b", 4, size=32)
        other_uid, _ = uids(more)
        other_step = generate_uid()
        assert n_create(assoc, mpps_dataset(other_uid, "IN PROGRESS"), other_step) == SUCCESS
        assert send_paths(port, more[:3]) == [SUCCESS] * 3
        assert n_set(assoc, mpps_dataset(other_uid, "COMPLETED", headers(more)),
                     other_step) == SUCCESS
        assert not wait_for(state_is(db, other_uid, COMPLETE), 1.5)
        assert study(db, other_uid).state == RECEIVING
        assert send_paths(port, more[3:]) == [SUCCESS]
        assert wait_for(state_is(db, other_uid, COMPLETE), 2.0)
        assert study(db, other_uid).completion_reason == "mpps"
        assert len(all_events_of(db, other_uid, repository.STUDY_COMPLETE)) == 1


# -- restart ----------------------------------------------------------------------------------
def test_completion_state_survives_a_restart(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Quiet periods run on persisted timestamps: a study due while stopped completes at start."""
    settings = make_settings(
        completion={"series_quiet_seconds": 1.0, "study_quiet_seconds": 1.5, "poll_seconds": 0.1}
    )
    paths = make_ct_series(tmp_path / "ct", 3, size=32)
    study_uid, _ = uids(paths)
    first = Service(settings)
    first.start()
    try:
        assert send_paths(port_of(first), paths) == [SUCCESS] * 3
        sent = time.monotonic()
    finally:
        first.stop()
    with open_index(settings) as db:
        assert study(db, study_uid).state == RECEIVING
    time.sleep(max(0.0, sent + 2.0 - time.monotonic()))

    second = Service(settings)
    second.start()
    try:
        with open_index(settings) as db:
            # Faster than a series quiet period: the clock was not restarted by the restart.
            assert wait_for(state_is(db, study_uid, COMPLETE), 0.9)
            assert study(db, study_uid).completion_reason == "quiet"
            assert len(all_events_of(db, study_uid, repository.STUDY_COMPLETE)) == 1
    finally:
        second.stop()
