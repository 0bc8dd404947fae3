"""Batch progress: every study's routing, latest job, findings and SR delivery, set-based."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event

from storage import batches
from storage.db import Database
from storage.models import FindingRecord, Job, OutboxItem, ResultObject, RoutingDecision

NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def _job(session: Any, uid: str, route: str, state: str, *, findings: int = 0,
         present: int = 0, srs: tuple[str, ...] = ()) -> int:
    job = Job(study_instance_uid=uid, route=route, model_name="m", state=state,
              not_before=NOW, created_at=NOW)
    session.add(job)
    session.flush()
    for i in range(findings):
        session.add(FindingRecord(
            job_id=job.id, ordinal=i, study_instance_uid=uid, series_instance_uid=uid + ".1",
            sop_instance_uid=f"{uid}.1.{i}", model_name="m", model_version="1", label="x",
            code_value="1", code_scheme="SCT", code_meaning="x", probability=0.5,
            threshold=0.5, present=i < present, tracking_uid=f"{uid}.9.{i}", created_at=NOW))
    for i, state_of_sr in enumerate(srs):
        result = ResultObject(job_id=job.id, kind="sr", study_instance_uid=uid,
                              series_instance_uid=uid + ".8", sop_instance_uid=f"{uid}.8.{i}",
                              sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33", path="x",
                              created_at=NOW)
        session.add(result)
        session.flush()
        session.add(OutboxItem(result_id=result.id, job_id=job.id, destination="pacs",
                               state=state_of_sr, next_attempt_at=NOW, created_at=NOW))
    return job.id


def _seed(db: Database, extra: int = 0) -> int:
    with db.write_session() as session:
        batch = batches.create_batch(session, kind="retrieve", source="archive", route=None,
                                     query={}, now=NOW)
        uids = ["1.1", "1.2", "1.3", "1.4", "1.5"] + [f"2.{i}" for i in range(extra)]
        batches.add_found(session, batch.id, [batches.FoundStudy(u) for u in uids])
        rows = {r.study_instance_uid: r for r in batches.studies(session, batch.id)}
        for uid in uids[1:]:
            batches.mark_retrieved(session, rows[uid].id, instances=3, failed=0, now=NOW)

        def decide(uid: str, route: str | None) -> None:
            session.add(RoutingDecision(study_instance_uid=uid, series_instance_uid=uid + ".1",
                                        route=route, created_at=NOW))

        decide("1.2", None)  # unrouted: processed without a job
        decide("1.3", "chest")  # routed: an older failed job, the latest one done and sent
        _job(session, "1.3", "chest", "failed")
        _job(session, "1.3", "chest", "done", findings=3, present=2, srs=("sent", "sent"))
        decide("1.4", "chest")  # done, its SR not yet delivered
        _job(session, "1.4", "chest", "done", findings=1, srs=("pending",))
        decide("1.5", "other")  # a job of another route only
        _job(session, "1.5", "other", "running")
        for uid in uids[5:]:
            decide(uid, "chest")
            _job(session, uid, "chest", "done", findings=1, present=1, srs=("sent",))
        return batch.id


def test_progress_of_each_kind_of_study(db: Database) -> None:
    batch_id = _seed(db)
    with db.sessions() as session:
        rows = {r.study_instance_uid: r for r in batches.progress(session, batch_id)}
        chest = {r.study_instance_uid: r for r in batches.progress(session, batch_id, "chest")}
    assert rows["1.1"].retrieve_state == batches.FOUND
    assert rows["1.1"].routed is None
    assert not rows["1.1"].processed
    assert rows["1.2"].routed is False
    assert rows["1.2"].job_state is None
    assert rows["1.2"].processed
    done = rows["1.3"]
    assert (done.routed, done.job_state, done.findings, done.present) == (True, "done", 3, 2)
    assert (done.sr_sent, done.sr_pending) == (2, 0)
    assert done.processed
    waiting = rows["1.4"]
    assert (waiting.job_state, waiting.findings, waiting.present) == ("done", 1, 0)
    assert (waiting.sr_sent, waiting.sr_pending) == (0, 1)
    assert not waiting.processed
    assert rows["1.5"].job_state == "running"
    assert chest["1.5"].job_state is None  # the batch's route: its job is not one of ours
    assert chest["1.3"].job_state == "done"


def test_progress_costs_a_fixed_number_of_queries(db: Database) -> None:
    """The runner polls this for batches of thousands of studies: no query per study."""
    batch_id = _seed(db, extra=600)
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        with db.sessions() as session:
            rows = batches.progress(session, batch_id)
    finally:
        event.remove(db.engine, "before_cursor_execute", count)
    assert len(rows) == 605
    assert sum(r.processed for r in rows) == 2 + 600
    # One for the batch's studies, then six per chunk of 500 retrieved studies (2 chunks).
    assert len(statements) <= 1 + 6 * 2, statements[:5]
