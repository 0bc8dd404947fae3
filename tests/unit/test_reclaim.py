"""Start-up reclaim (issue 19): what a restarted serve takes back from its dead predecessor."""

from __future__ import annotations

from storage import jobs, outbox
from storage.db import Database
from tests.conftest import T0, at
from tests.unit.test_jobs import claim, complete, load, new_job, result


def test_only_this_nodes_previous_serve_loses_its_leases(db: Database) -> None:
    owners = {
        "old": "node-a/0ld0ld0ld0ld/pool-0/11-abcdef",    # this node, the killed serve
        "live": "node-a/n3wn3wn3wn3w/pool-0/12-abcdef",   # this node, the serve now starting
        "celery": "node-a:4242:abcdef",                    # a Celery worker on the same host
        "other": "node-b/0ld0ld0ld0ld/pool-0/11-abcdef",  # another node's serve
        "prefix": "node-ab/0ld0ld0ld0ld/pool-0/11-abc",  # a node whose id starts the same
    }
    ids: dict[str, int] = {}
    for name, owner in owners.items():
        ids[name] = new_job(db, study=f"1.2.826.0.1.3680043.8.498.{len(ids) + 10}")
        assert claim(db, ids[name], owner, T0, lease=60) is not None
    with db.write_session() as session:
        released = jobs.release_previous_incarnations(
            session, node="node-a", current="node-a/n3wn3wn3wn3w/", now=at(1))
    assert released == 1
    with db.write_session() as session:
        assert jobs.due_jobs(session, now=at(1), redispatch_after=60) == [ids["old"]]
    for name in ("live", "celery", "other", "prefix"):
        assert load(db, ids[name]).lease_expires_at == at(60)


def test_pending_jobs_dispatched_before_a_restart_are_dispatched_again(
    db: Database,
) -> None:
    job_id = new_job(db)
    with db.write_session() as session:
        assert jobs.due_jobs(session, now=T0, redispatch_after=60) == [job_id]
        assert jobs.due_jobs(session, now=at(1), redispatch_after=60) == []
        assert jobs.redispatch_pending(session) == 1
        assert jobs.due_jobs(session, now=at(1), redispatch_after=60) == [job_id]


def test_outbox_claims_are_released_only_with_their_recorded_expiry(
    db: Database,
) -> None:
    job_id = new_job(db)
    claim(db, job_id, "w1", T0)
    assert complete(db, job_id, "w1", T0, results=[result("2.25.1001", ["pacs", "viewer"])])
    with db.write_session() as session:
        first = outbox.claim_outbox(session, now=at(1), lease_seconds=120)
    ids = [d.outbox_id for d in first]
    with db.write_session() as session:  # a claim taken over since (another expiry): kept
        assert outbox.release_outbox_claims(session, ids, lease=at(2 + 120)) == 0
        assert outbox.claim_outbox(session, now=at(3), lease_seconds=120) == []
        assert outbox.release_outbox_claims(session, ids, lease=at(1 + 120)) == 2
        again = outbox.claim_outbox(session, now=at(3), lease_seconds=120)
    assert sorted(d.outbox_id for d in again) == sorted(ids)
