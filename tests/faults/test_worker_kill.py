"""Fault 2: kill -9 of a local pool worker while it runs a job: the pool starts a new worker,
the job runs again, and its results are sent once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_ai.config import Settings
from dicom_ai.service import Service
from tests.faults import harness
from tests.integration.test_loop import _big_series, db_jobs, dicom_files
from tests.peers import wait_until

IMAGES = 6  # a job of a second or two: long enough to be killed in
# Mostly the new worker's TensorFlow import and model load (8-20 s on a busy 2-core machine).
RECOVERY_LIMIT = 45.0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_worker_killed_mid_job_runs_it_again_and_sends_once(
    tmp_path: Path, db_url: str, cr_studies: Path, pacs: harness.ResultSCP,
    start_service: Callable[[Settings], Service], fault_report: list[harness.FaultFigures]
) -> None:
    big = _big_series(cr_studies, tmp_path / "big", IMAGES)
    study = str(dcmread(big[0], stop_before_pixels=True).StudyInstanceUID)
    service = start_service(harness.fault_settings(tmp_path, db_url, pacs.port))
    assert service.address is not None
    assert service.pool is not None
    acked = harness.push_acknowledged(service.address[1], [*big, dicom_files(cr_studies)[0]])
    victim = service.pool.pids()[0]
    assert victim is not None
    wait_until(lambda: any(j.state == "running" and j.study_instance_uid == study
                           for j in db_jobs(db_url)), 60, "the big study's job running",
               interval=0.05)
    os.kill(victim, signal.SIGKILL)
    ended = time.time()  # the pool starts a new worker by itself
    harness.wait_delivered(pacs.folder, acked, 60, "every result delivered")
    figures = harness.check("local worker kill -9", db_url=db_url,
                            store_root=tmp_path / "store", acked=acked,
                            destination=pacs.folder, fault_ended=ended, report=fault_report)
    figures.notes.append("from the kill; includes the new worker's model load")
    assert service.pool.pids()[0] != victim, "the pool replaced the worker"
    by_study = {j.study_instance_uid: j for j in db_jobs(db_url)}
    assert by_study[study].attempts == 2, "the killed attempt counts, the job ran again"
    assert all(j.state == "done" for j in by_study.values())
    assert figures.recovery_seconds < RECOVERY_LIMIT
