"""The durable job state machine on real SQLite and PostgreSQL databases, and study routing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from dicom_ai.config import load_settings
from dicom_ai.dispatch.delivery import retry_delay
from dicom_ai.dispatch.scheduler import Scheduler
from dicom_ai.ingest.index import read_stored_record
from dicom_ai.training.synth import synthesize
from storage import jobs, outbox, repository
from storage.db import Database
from storage.filestore import FileStore
from storage.models import (
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    SENT,
    Event,
    FindingRecord,
    Job,
    OutboxItem,
    ResultObject,
    RoutingDecision,
)
from tests.conftest import T0, at
from tests.peers import make_ct_series

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"


# -- helpers ----------------------------------------------------------------------------------
@pytest.fixture
def other(db_url: str, db: Database) -> Iterator[Database]:
    """A second connection pool to the same database: another process's view."""
    database = Database(db_url)
    try:
        yield database
    finally:
        database.dispose()


def new_job(db: Database, *, study: str = STUDY, route: str = "chest", max_attempts: int = 3,
            now: datetime = T0) -> int:
    """Create a pending job (committed); its id."""
    with db.write_session() as session:
        job = jobs.create_job(session, study_instance_uid=study, series_instance_uids=[SERIES],
                              route=route, model_name="chest-model", max_attempts=max_attempts,
                              event_id=None, now=now)
        return job.id


def load(db: Database, job_id: int) -> Job:
    """A fresh copy of a job row."""
    with db.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def claim(db: Database, job_id: int, owner: str, now: datetime,
          lease: float = 30.0) -> Job | None:
    """Claim a job in its own transaction."""
    with db.write_session() as session:
        return jobs.claim_job(session, job_id, owner=owner, lease_seconds=lease, now=now)


def due(db: Database, now: datetime, redispatch_after: float = 60.0) -> list[int]:
    """Due jobs in their own transaction."""
    with db.write_session() as session:
        return jobs.due_jobs(session, now=now, redispatch_after=redispatch_after)


def finding(job_number: int, label: str = "nodule", sop: str = "1.2.3.4") -> dict[str, Any]:
    """The column values of one finding."""
    return {
        "study_instance_uid": STUDY, "series_instance_uid": SERIES, "sop_instance_uid": sop,
        "frame_number": None, "model_name": "chest-model", "model_version": f"v{job_number}",
        "label": label, "code_value": "RID50149", "code_scheme": "RADLEX",
        "code_meaning": "Pulmonary nodule", "probability": 0.9, "threshold": 0.5,
        "present": True, "location_kind": "point", "location": {"point": [10, 20]},
        "segment_number": None, "heatmap_path": None, "tracking_uid": f"2.25.{job_number}1",
    }


def result(sop: str, destinations: list[str]) -> jobs.ResultToStore:
    """An SR result to deliver to `destinations`."""
    return jobs.ResultToStore(
        kind="sr", sr_kind="comprehensive", study_instance_uid=STUDY,
        series_instance_uid="1.2.826.0.1.3680043.8.498.99", sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33", path=f"results/{sop}.dcm",
        destinations=destinations,
    )


def complete(db: Database, job_id: int, owner: str, now: datetime, *,
             findings: list[dict[str, Any]] | None = None,
             results: list[jobs.ResultToStore] | None = None) -> bool:
    """Complete a job in its own transaction."""
    with db.write_session() as session:
        return jobs.complete_job(session, job_id, owner=owner, model_version="v1",
                                 findings=findings or [], results=results or [],
                                 timings={"inference": 0.25}, now=now)


def count(db: Database, model: type[Any]) -> int:
    """Rows in a table."""
    with db.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


# -- events -----------------------------------------------------------------------------------
def test_event_is_taken_by_one_process_only(db: Database, other: Database) -> None:
    with db.write_session() as session:
        event = Event(kind=repository.STUDY_COMPLETE, study_instance_uid=STUDY,
                      series_instance_uid=None, reason="quiet", created_at=T0)
        session.add(event)
        session.flush()
        event_id = event.id
    with db.write_session() as session:
        assert jobs.take_event(session, event_id, at(1)) is True
    with other.write_session() as session:
        assert jobs.take_event(session, event_id, at(2)) is False
    with other.sessions() as session:
        stored = session.get(Event, event_id)
        assert stored is not None
        assert stored.consumed_at == at(1)  # the loser changed nothing
        assert repository.pending_events(session) == []


def test_taking_an_event_rolls_back_with_its_transaction(db: Database, other: Database) -> None:
    with db.write_session() as session:
        event = Event(kind=repository.STUDY_COMPLETE, study_instance_uid=STUDY,
                      series_instance_uid=None, reason="quiet", created_at=T0)
        session.add(event)
        session.flush()
        event_id = event.id

    def crash_while_routing() -> None:
        with db.write_session() as session:
            assert jobs.take_event(session, event_id, at(1))
            raise RuntimeError("routing crashed")

    with pytest.raises(RuntimeError, match="routing crashed"):
        crash_while_routing()
    # The crashed router's claim is gone: another process routes the event.
    with other.write_session() as session:
        assert jobs.take_event(session, event_id, at(2)) is True


# -- creating and superseding -----------------------------------------------------------------
def test_create_job_cancels_a_predecessor_that_never_ran(db: Database) -> None:
    first = new_job(db)
    second = new_job(db, now=at(5))
    cancelled = load(db, first)
    assert cancelled.state == FAILED
    assert cancelled.error is not None
    assert "superseded before it ran" in cancelled.error
    assert cancelled.finished_at == at(5)
    created = load(db, second)
    assert created.state == PENDING
    assert created.attempts == 0
    assert created.not_before == at(5)
    assert created.series_instance_uids == [SERIES]
    assert created.supersedes_job_id is None  # nothing ran before: nothing to replace
    # Other studies and other routes are independent.
    other_route = new_job(db, route="knee", now=at(6))
    other_study = new_job(db, study=STUDY + ".7", now=at(6))
    assert load(db, second).state == PENDING
    assert load(db, other_route).supersedes_job_id is None
    assert load(db, other_study).supersedes_job_id is None
    assert due(db, at(6)) == [second, other_route, other_study]


def test_create_job_leaves_a_started_predecessor_running(db: Database) -> None:
    first = new_job(db)
    assert claim(db, first, "w1", at(1)) is not None
    second = new_job(db, now=at(2))
    running = load(db, first)
    assert running.state == RUNNING  # keeps running; its results stand until replaced
    assert running.lease_owner == "w1"
    assert load(db, second).supersedes_job_id is None  # decided when it completes
    third = new_job(db, now=at(3))  # the second never ran: cancelled, the third covers it
    assert load(db, second).state == FAILED
    assert load(db, third).state == PENDING


def test_create_job_does_not_cancel_a_predecessor_waiting_for_a_retry(db: Database) -> None:
    first = new_job(db)
    claim(db, first, "w1", at(1))
    with db.write_session() as session:
        assert jobs.fail_job(session, first, owner="w1", error="boom", retryable=True,
                             backoff_seconds=10, now=at(2)) == PENDING
    second = new_job(db, now=at(3))
    assert load(db, first).state == PENDING  # it ran once: not cancelled
    assert load(db, second).state == PENDING


# -- claiming and leases ----------------------------------------------------------------------
def test_claim_is_exclusive(db: Database, other: Database) -> None:
    job_id = new_job(db, now=at(10))
    assert claim(db, job_id, "early", at(9)) is None  # not due yet
    won = claim(db, job_id, "w1", at(10), lease=30)
    assert won is not None
    assert (won.state, won.lease_owner, won.attempts) == (RUNNING, "w1", 1)
    assert won.lease_expires_at == at(40)
    assert won.started_at == at(10)
    assert claim(other, job_id, "w2", at(11)) is None
    assert claim(other, job_id, "w2", at(40)) is None  # the lease ends after its instant
    stored = load(other, job_id)
    assert (stored.lease_owner, stored.attempts) == ("w1", 1)


def test_extend_lease_only_for_its_owner(db: Database) -> None:
    job_id = new_job(db)
    claim(db, job_id, "w1", T0, lease=10)
    with db.write_session() as session:
        assert jobs.extend_lease(session, job_id, owner="w2", until=at(100)) is False
        assert jobs.extend_lease(session, job_id, owner="w1", until=at(100)) is True
    assert claim(db, job_id, "w2", at(50)) is None  # the extended lease holds
    assert due(db, at(50)) == []
    assert due(db, at(101)) == [job_id]


def test_expired_lease_is_due_once_per_expiry(db: Database) -> None:
    job_id = new_job(db)
    assert due(db, T0) == [job_id]
    assert due(db, at(1)) == []  # dispatched, not yet stale
    assert due(db, at(61)) == [job_id]  # not picked up within redispatch_after: again
    assert due(db, at(62)) == []
    assert claim(db, job_id, "w1", at(62), lease=10) is not None  # lease until 72
    assert due(db, at(70)) == []  # running, lease live
    assert due(db, at(73)) == [job_id]  # the worker died: handed out once
    assert due(db, at(74)) == []
    assert due(db, at(500)) == []  # still the same expiry
    taken = claim(db, job_id, "w2", at(501), lease=10)  # renews the lease until 511
    assert taken is not None
    assert taken.attempts == 2
    assert due(db, at(505)) == []
    assert due(db, at(512)) == [job_id]  # a new expiry: once more
    assert due(db, at(513)) == []


def test_expire_leases_of_a_dead_worker(db: Database) -> None:
    a1, a2, b1 = new_job(db), new_job(db, route="r2"), new_job(db, route="r3")
    assert due(db, T0) == [a1, a2, b1]
    for job_id, owner in ((a1, "dead"), (a2, "dead"), (b1, "alive")):
        assert claim(db, job_id, owner, at(1), lease=300) is not None
    with db.write_session() as session:
        assert jobs.expire_leases(session, "dead", now=at(5)) == 2
    assert due(db, at(5)) == [a1, a2]  # at once, not after the 300 s lease
    taken = claim(db, a1, "new", at(5))
    assert taken is not None
    assert (taken.lease_owner, taken.attempts) == ("new", 2)
    assert load(db, b1).lease_owner == "alive"
    assert claim(db, b1, "new", at(5)) is None
    with db.write_session() as session:
        assert jobs.expire_leases(session, "nobody", now=at(6)) == 0


def test_poison_job_fails_when_leases_use_up_its_attempts(db: Database) -> None:
    job_id = new_job(db, max_attempts=2)
    assert claim(db, job_id, "w1", T0, lease=10) is not None
    second = claim(db, job_id, "w2", at(11), lease=10)  # w1 died
    assert second is not None
    assert second.attempts == 2
    assert claim(db, job_id, "w3", at(15)) is None  # w2's lease is live
    assert due(db, at(22)) == [job_id]  # w2 died too
    assert claim(db, job_id, "w3", at(22)) is None  # no third attempt
    failed = load(db, job_id)
    assert failed.state == FAILED
    assert failed.attempts == 2
    assert failed.lease_owner is None
    assert failed.finished_at == at(22)
    assert failed.error is not None
    assert "worker lost (lease expired) on the last attempt" in failed.error
    assert due(db, at(1000)) == []
    assert claim(db, job_id, "w4", at(1000)) is None


# -- failing ----------------------------------------------------------------------------------
def test_fail_job_retries_with_exponential_backoff_then_fails(db: Database) -> None:
    job_id = new_job(db, max_attempts=3)
    claim(db, job_id, "w1", T0)
    with db.write_session() as session:
        assert jobs.fail_job(session, job_id, owner="intruder", error="x", retryable=True,
                             backoff_seconds=10, now=at(1)) is None
        assert jobs.fail_job(session, job_id, owner="w1", error="timeout 1", retryable=True,
                             backoff_seconds=10, now=at(1)) == PENDING
    job = load(db, job_id)
    assert (job.state, job.error, job.attempts) == (PENDING, "timeout 1", 1)
    assert job.not_before == at(1 + 10)  # backoff * 2**0
    assert (job.lease_owner, job.lease_expires_at, job.dispatched_at) == (None, None, None)
    assert job.finished_at is None
    assert claim(db, job_id, "w2", at(10.5)) is None
    assert due(db, at(10.5)) == []
    assert due(db, at(11)) == [job_id]

    assert claim(db, job_id, "w2", at(11)) is not None
    with db.write_session() as session:
        assert jobs.fail_job(session, job_id, owner="w2", error="timeout 2", retryable=True,
                             backoff_seconds=10, now=at(12)) == PENDING
    assert load(db, job_id).not_before == at(12 + 20)  # backoff * 2**1

    assert claim(db, job_id, "w3", at(32)) is not None
    with db.write_session() as session:
        assert jobs.fail_job(session, job_id, owner="w3", error="timeout 3", retryable=True,
                             backoff_seconds=10, now=at(33)) == FAILED  # attempts == max
    job = load(db, job_id)
    assert (job.state, job.attempts, job.error) == (FAILED, 3, "timeout 3")
    assert job.finished_at == at(33)
    assert job.lease_owner is None
    assert due(db, at(1000)) == []
    with db.write_session() as session:  # a failed job is nobody's any more
        assert jobs.fail_job(session, job_id, owner="w3", error="again", retryable=True,
                             backoff_seconds=10, now=at(34)) is None


def test_fail_job_non_retryable_is_final_at_once(db: Database) -> None:
    job_id = new_job(db, max_attempts=5)
    claim(db, job_id, "w1", T0)
    with db.write_session() as session:
        assert jobs.fail_job(session, job_id, owner="w1", error="E" * 5000, retryable=False,
                             backoff_seconds=10, now=at(1)) == FAILED
    job = load(db, job_id)
    assert (job.state, job.attempts, job.finished_at) == (FAILED, 1, at(1))
    assert job.error == "E" * 4000  # clipped
    assert claim(db, job_id, "w2", at(100)) is None


# -- completing -------------------------------------------------------------------------------
def test_complete_job_refused_after_the_lease_was_lost(db: Database, other: Database) -> None:
    job_id = new_job(db)
    claim(db, job_id, "slow", T0, lease=10)
    assert claim(other, job_id, "fast", at(11), lease=10) is not None  # "slow" looked dead
    with db.write_session() as session:
        assert jobs.extend_lease(session, job_id, owner="slow", until=at(100)) is False
    assert complete(db, job_id, "slow", at(12), findings=[finding(1)],
                    results=[result("2.25.1001", ["pacs"])]) is False
    for model in (FindingRecord, ResultObject, OutboxItem):
        assert count(db, model) == 0, model.__name__
    job = load(db, job_id)
    assert (job.state, job.lease_owner, job.model_version) == (RUNNING, "fast", None)
    with db.write_session() as session:
        assert jobs.fail_job(session, job_id, owner="slow", error="x", retryable=True,
                             backoff_seconds=1, now=at(12)) is None
    assert complete(other, job_id, "fast", at(13), findings=[finding(1)]) is True
    assert complete(other, job_id, "fast", at(14), findings=[finding(1)]) is False  # only once
    assert count(db, FindingRecord) == 1


def test_complete_job_writes_findings_results_and_outbox(db: Database) -> None:
    job_id = new_job(db)
    claim(db, job_id, "w1", T0)
    results = [result("2.25.1001", ["pacs", "viewer"]), result("2.25.1002", [])]
    assert complete(db, job_id, "w1", at(5), findings=[finding(1), finding(1, "mass")],
                    results=results) is True
    job = load(db, job_id)
    assert (job.state, job.finished_at, job.model_version) == (DONE, at(5), "v1")
    assert (job.lease_owner, job.lease_expires_at, job.error) == (None, None, None)
    assert job.timings == {"inference": 0.25}
    with db.sessions() as session:
        rows = jobs.findings_of_study(session, STUDY)
        assert [(f.job_id, f.ordinal, f.label) for f in rows] == [
            (job_id, 0, "nodule"), (job_id, 1, "mass")]
        assert rows[0].created_at == at(5)
        assert rows[0].superseded_by_job_id is None
        assert rows[0].location == {"point": [10, 20]}  # a JSON column: the object itself
        stored = jobs.results_of_job(session, job_id)
        assert [(r.sop_instance_uid, r.kind, r.sr_kind) for r in stored] == [
            ("2.25.1001", "sr", "comprehensive"), ("2.25.1002", "sr", "comprehensive")]
        rows_sent = session.scalars(select(OutboxItem).order_by(OutboxItem.id)).all()
        assert [(o.result_id, o.job_id, o.destination, o.state, o.attempts, o.next_attempt_at)
                for o in rows_sent] == [
            (stored[0].id, job_id, "pacs", PENDING, 0, at(5)),
            (stored[0].id, job_id, "viewer", PENDING, 0, at(5)),
        ]
        assert outbox.outbox_counts(session) == {PENDING: 2}
        assert jobs.job_counts(session) == {DONE: 1}


def test_complete_job_is_all_or_nothing(db: Database) -> None:
    job_id = new_job(db)
    claim(db, job_id, "w1", T0)
    duplicate = [result("2.25.1001", ["pacs"]), result("2.25.1001", ["pacs"])]
    with pytest.raises(IntegrityError):
        complete(db, job_id, "w1", at(5), findings=[finding(1)], results=duplicate)
    job = load(db, job_id)
    assert (job.state, job.lease_owner) == (RUNNING, "w1")
    for model in (FindingRecord, ResultObject, OutboxItem):
        assert count(db, model) == 0, model.__name__
    assert complete(db, job_id, "w1", at(6), findings=[finding(1)],
                    results=[result("2.25.1001", ["pacs"])]) is True


def test_completing_a_newer_job_supersedes_older_findings(db: Database) -> None:
    first = new_job(db)
    claim(db, first, "w1", T0)
    assert complete(db, first, "w1", at(1), findings=[finding(1), finding(1, "mass")])
    second = new_job(db, now=at(2))
    claim(db, second, "w2", at(2))
    with db.sessions() as session:  # until the new job completes, the old findings stand
        assert {f.job_id for f in jobs.findings_of_study(session, STUDY)} == {first}
    assert complete(db, second, "w2", at(3), findings=[finding(2)])
    with db.sessions() as session:
        current = jobs.findings_of_study(session, STUDY)
        assert [(f.job_id, f.label) for f in current] == [(second, "nodule")]
        everything = jobs.findings_of_study(session, STUDY, current_only=False)
        assert [(f.job_id, f.superseded_by_job_id) for f in everything] == [
            (first, second), (first, second), (second, None)]


def test_findings_of_a_done_job_are_superseded_across_a_failed_job(db: Database) -> None:
    first = new_job(db)
    claim(db, first, "w1", T0)
    assert complete(db, first, "w1", at(1), findings=[finding(1)])
    second = new_job(db, now=at(2))  # more images arrived
    claim(db, second, "w2", at(2))
    with db.write_session() as session:
        assert jobs.fail_job(session, second, owner="w2", error="model crashed",
                             retryable=False, now=at(3), backoff_seconds=1) == FAILED
    third = new_job(db, now=at(4))  # still more images
    claim(db, third, "w3", at(4))
    assert complete(db, third, "w3", at(5), findings=[finding(3)])
    with db.sessions() as session:
        current = jobs.findings_of_study(session, STUDY)
        assert [f.job_id for f in current] == [third]


def test_an_older_job_completing_after_a_newer_one_stays_superseded_and_unsent(
    db: Database
) -> None:
    older = new_job(db)
    claim(db, older, "w1", T0)  # slow: still running when more images arrive
    newer = new_job(db, now=at(1))
    claim(db, newer, "w2", at(1))
    assert complete(db, newer, "w2", at(2), findings=[finding(2)],
                    results=[result("1.2.826.0.1.3680043.8.498.2", ["pacs"])])
    assert complete(db, older, "w1", at(3), findings=[finding(1)],
                    results=[result("1.2.826.0.1.3680043.8.498.1", ["pacs"])])
    with db.sessions() as session:
        assert [f.job_id for f in jobs.findings_of_study(session, STUDY)] == [newer]
        everything = jobs.findings_of_study(session, STUDY, current_only=False)
        assert {(f.job_id, f.superseded_by_job_id) for f in everything} == {
            (newer, None), (older, newer)}
        # No stale SR is sent.
        assert [o.job_id for o, _ in outbox.list_outbox(session)] == [newer]


# -- outbox -----------------------------------------------------------------------------------
def test_outbox_claims_are_exclusive_and_retried_with_backoff(db: Database,
                                                              other: Database) -> None:
    job_id = new_job(db)
    claim(db, job_id, "w1", T0)
    assert complete(db, job_id, "w1", T0, results=[result("2.25.1001", ["pacs", "viewer"])])
    with db.write_session() as session:
        assert outbox.claim_outbox(session, now=at(-1), lease_seconds=120) == []  # not due yet
        first = outbox.claim_outbox(session, now=at(1), lease_seconds=120)
    assert [(d.destination, d.path, d.sop_instance_uid, d.attempts) for d in first] == [
        ("pacs", "results/2.25.1001.dcm", "2.25.1001", 1),
        ("viewer", "results/2.25.1001.dcm", "2.25.1001", 1),
    ]
    assert first[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.33"
    with other.write_session() as session:  # another sender: everything is leased
        assert outbox.claim_outbox(session, now=at(2), lease_seconds=120) == []
    pacs, viewer = first
    delay = retry_delay(viewer.attempts, 5.0, 60.0)
    with db.write_session() as session:
        outbox.mark_sent(session, pacs.outbox_id, now=at(3), detail="")
        outbox.mark_retry(session, viewer.outbox_id, now=at(3), error="association rejected",
                          delay_seconds=delay)
    with db.sessions() as session:
        assert outbox.outbox_counts(session) == {SENT: 1, PENDING: 1}
        sent = session.get(OutboxItem, pacs.outbox_id)
        assert sent is not None
        assert (sent.sent_at, sent.lease_expires_at, sent.last_error) == (at(3), None, None)
        waiting = session.get(OutboxItem, viewer.outbox_id)
        assert waiting is not None
        assert waiting.next_attempt_at == at(3 + 5)
        assert waiting.last_error == "association rejected"
        assert waiting.lease_expires_at is None
    with other.write_session() as session:
        assert outbox.claim_outbox(session, now=at(7.9), lease_seconds=120) == []
        again = outbox.claim_outbox(session, now=at(8), lease_seconds=120)
    assert [(d.outbox_id, d.attempts) for d in again] == [(viewer.outbox_id, 2)]
    # A sender that dies keeps its rows for the lease only; the sent row never comes back.
    with db.write_session() as session:
        assert outbox.claim_outbox(session, now=at(127), lease_seconds=120) == []
        taken = outbox.claim_outbox(session, now=at(129), lease_seconds=120)
    assert [(d.outbox_id, d.attempts) for d in taken] == [(viewer.outbox_id, 3)]


def test_retry_delay_doubles_up_to_the_cap() -> None:
    assert [retry_delay(n, 5.0, 60.0) for n in range(8)] == [
        5.0, 5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert retry_delay(3, 0.5, 1000.0) == 2.0
    assert retry_delay(100, 5.0, 60.0) == 60.0
    assert isinstance(retry_delay(1, 5, 60), float)


# -- routing a study end to end ---------------------------------------------------------------
class Recorder:
    """A transport double: remembers the job ids it was handed."""

    def __init__(self) -> None:
        self.submitted: list[list[int]] = []

    def submit(self, job_ids: list[int]) -> None:
        self.submitted.append(list(job_ids))


class Down:
    """A transport whose broker is unreachable."""

    def submit(self, job_ids: list[int]) -> None:
        raise ConnectionError("broker down")


def test_scheduler_routes_a_study_once(db_url: str, db: Database, tmp_path: Path) -> None:
    synthesize(tmp_path / "synth", studies=1, seed=21, modality="CR", compress=False)
    (cr_source,) = sorted((tmp_path / "synth").glob("*/*/*.dcm"))
    cr = pydicom.dcmread(cr_source, stop_before_pixels=True)
    study_uid, cr_series = str(cr.StudyInstanceUID), str(cr.SeriesInstanceUID)
    ct_sources = make_ct_series(tmp_path / "ct", 2, size=16, study_uid=study_uid)
    ct_series = str(pydicom.dcmread(ct_sources[0]).SeriesInstanceUID)

    settings = load_settings(
        None,
        storage={"root": tmp_path / "store", "database_url": db_url, "min_free_bytes": 0},
        workers={"max_attempts": 4},
        routes=[{"name": "chest", "model": "chest-model",
                 "match": {"Modality": ["CR", "DX"], "CallingAETitle": "MOD1"}},
                {"name": "knee", "model": "knee-model", "match": {"BodyPartExamined": "KNEE"}}],
    )
    store = FileStore(settings.storage.root)
    with db.write_session() as session:
        for source in [cr_source, *ct_sources]:
            record = read_stored_record(source)
            relative = store.relative_path(record.study_instance_uid,
                                           record.series_instance_uid, record.sop_instance_uid)
            store.absolute(relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, store.absolute(relative))
            repository.index_instance(session, record, path=relative,
                                      size_bytes=source.stat().st_size, calling_ae_title="MOD1",
                                      now=T0, replace=False)
    with db.write_session() as session:
        events = repository.complete_quiet(session, now=at(600), series_quiet=30,
                                           study_quiet=60)
        assert [e.kind for e in events].count(repository.STUDY_COMPLETE) == 1

    recorder = Recorder()
    scheduler = Scheduler(settings, db, recorder)
    second_process = Scheduler(settings, Database(db_url), Recorder())
    try:
        created = scheduler.route_pending(at(601))
        assert len(created) == 1
        assert second_process.route_pending(at(602)) == []  # the event was consumed once
        assert scheduler.route_pending(at(603)) == []
    finally:
        second_process.db.dispose()
    (job_id,) = created
    job = load(db, job_id)
    assert (job.route, job.model_name, job.state, job.max_attempts) == (
        "chest", "chest-model", PENDING, 4)
    assert job.series_instance_uids == [cr_series]
    assert job.not_before == at(601)
    with db.sessions() as session:
        event = session.get(Event, job.event_id)
        assert event is not None
        assert (event.kind, event.consumed_at) == (repository.STUDY_COMPLETE, at(601))
        decisions = {d.series_instance_uid: d for d in jobs.decisions_of_study(session, study_uid)}
        assert count(db, RoutingDecision) == 2
    assert set(decisions) == {cr_series, ct_series}
    routed, unrouted = decisions[cr_series], decisions[ct_series]
    assert (routed.route, routed.job_id, routed.event_id) == ("chest", job_id, job.event_id)
    assert routed.reason == ("Modality 'CR' ~ ['CR', 'DX']: yes; "
                             "CallingAETitle 'MOD1' ~ 'MOD1': yes")
    assert (unrouted.route, unrouted.job_id, unrouted.event_id) == (None, None, job.event_id)
    assert unrouted.reason.startswith("unrouted (chest: Modality 'CT' ~ ['CR', 'DX']: no")
    assert "knee: BodyPartExamined absent ~ 'KNEE': no" in unrouted.reason

    # A broker that is down leaves the job due; a working one gets it exactly once.
    assert Scheduler(settings, db, Down()).dispatch_due(at(604)) == []
    assert scheduler.dispatch_due(at(605)) == [job_id]
    assert scheduler.dispatch_due(at(606)) == []
    assert recorder.submitted == [[job_id]]
    assert Scheduler(settings, db, None).dispatch_due(at(1000)) == []


def test_findings_of_a_done_job_are_superseded_across_a_retrying_job(db: Database) -> None:
    first = new_job(db)
    claim(db, first, "w1", T0)
    assert complete(db, first, "w1", at(1), findings=[finding(1)])
    second = new_job(db, now=at(2))
    claim(db, second, "w2", at(2))
    with db.write_session() as session:
        assert jobs.fail_job(session, second, owner="w2", error="timeout", retryable=True,
                             now=at(3), backoff_seconds=100) == PENDING
    third = new_job(db, now=at(4))
    claim(db, third, "w3", at(4))
    assert complete(db, third, "w3", at(5), findings=[finding(3)])
    with db.sessions() as session:
        assert [f.job_id for f in jobs.findings_of_study(session, STUDY)] == [third]
