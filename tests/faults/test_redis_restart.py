"""Fault 5: the Celery broker (Redis) restarts empty while jobs are queued in it.

``serve`` routes and publishes (Celery backend, no local workers) and a ``dicom-ai worker``
runs the jobs, both on a redis-server of the test's own. Redis is killed and started again
empty while one job runs and others wait in its queue: their messages are gone, the job rows
are not, and the scheduler publishes them again (``workers.redispatch_seconds``, short here).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_ai.config import Settings
from dicom_ai.service import Service
from tests.faults import harness
from tests.integration.test_loop import _big_series, _celery_worker, db_jobs, dicom_files
from tests.peers import settings_toml, wait_until

REDISPATCH_SECONDS = 3.0
STUDIES = 3  # queued behind the running one: 6 images each, a second or two per job
RECOVERY_LIMIT = 20.0  # the re-publication delay plus the queued jobs' run time


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_redis_restarted_empty_with_jobs_queued_every_study_gets_its_sr(
    tmp_path: Path, db_url: str, cr_studies: Path, pacs: harness.ResultSCP,
    start_service: Callable[[Settings], Service], fault_report: list[harness.FaultFigures]
) -> None:
    studies = [_big_series(cr_studies, tmp_path / f"study{i}", 6) for i in range(STUDIES)]
    with harness.ThrowawayRedis(tmp_path / "redis") as redis:
        settings = harness.fault_settings(
            tmp_path, db_url, pacs.port,
            workers={"backend": "celery", "broker_url": redis.url,
                     "queue": f"dicom-ai-faults-{uuid.uuid4().hex[:8]}",
                     "redispatch_seconds": REDISPATCH_SECONDS})
        config = tmp_path / "worker.toml"
        config.write_text(settings_toml(settings))
        worker = _celery_worker(config, tmp_path / "worker.log")
        try:
            service = start_service(settings)
            assert service.address is not None
            port = service.address[1]
            # A first study proves the worker is up (its model loaded) before the fault.
            acked = harness.push_acknowledged(port, dicom_files(cr_studies)[:1])
            harness.wait_delivered(pacs.folder, acked, 90, "the first SR through Celery")
            for files in studies:
                acked += harness.push_acknowledged(port, files)

            def queued() -> bool:
                rows = db_jobs(db_url)
                waiting = [j for j in rows if j.state == "pending" and j.dispatched_at]
                return (len(rows) == STUDIES + 1 and any(j.state == "running" for j in rows)
                        and len(waiting) >= 1)

            wait_until(queued, 30, "a job running and others queued in Redis", interval=0.02)
            waiting = sum(j.state == "pending" for j in db_jobs(db_url))
            redis.kill()
            redis.start()  # empty: the queued messages are gone
            ended = time.time()
            harness.wait_delivered(pacs.folder, acked, 60, "every SR after the restart")
            figures = harness.check("Redis restart (empty)", db_url=db_url,
                                    store_root=tmp_path / "store", acked=acked,
                                    destination=pacs.folder, fault_ended=ended,
                                    report=fault_report)
            assert worker.poll() is None, "the worker survived the broker restart"
        finally:
            harness.stop_group(worker)
    figures.notes.append(f"{waiting} job(s) queued in Redis at the restart; re-published after "
                         f"redispatch_seconds = {REDISPATCH_SECONDS:.0f}")
    assert all(j.state == "done" for j in db_jobs(db_url))
    assert figures.recovery_seconds < RECOVERY_LIMIT
