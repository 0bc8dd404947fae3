"""Fault 1: the destination PACS goes down while studies are pushed and processed, then comes
back on the same port: every study's results arrive, once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_ai.config import Settings
from dicom_ai.service import Service
from tests.faults import harness
from tests.integration.test_loop import db_jobs, dicom_files
from tests.peers import wait_until

# retry_max_seconds is 1 s in these tests: the next retry finds the destination back.
RECOVERY_LIMIT = 10.0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_destination_down_then_up_every_result_arrives_once(
    tmp_path: Path, db_url: str, cr_studies: Path, pacs: harness.ResultSCP,
    start_service: Callable[[Settings], Service], fault_report: list[harness.FaultFigures]
) -> None:
    files = dicom_files(cr_studies)
    service = start_service(harness.fault_settings(tmp_path, db_url, pacs.port))
    assert service.address is not None
    port = service.address[1]
    acked = harness.push_acknowledged(port, files[:2])
    pacs.stop()  # down while the first studies are processed and the rest arrive
    down_at = time.monotonic()
    acked += harness.push_acknowledged(port, files[2:])
    results = len(files) * 2  # an SR and a heat-map SC per single-image study

    def failing() -> bool:
        rows = harness.outbox_rows(db_url)
        done = [j for j in db_jobs(db_url) if j.state == "done"]
        return (len(done) == len(files) and len(rows) == results
                and all(r.attempts >= 2 for r in rows if r.state != "sent"))

    wait_until(failing, 60, "every result made and failing at the down destination")
    pacs.start()  # the same port
    ended = time.time()
    harness.wait_delivered(pacs.folder, acked, 30, "every result delivered")
    figures = harness.check("destination down, then up", db_url=db_url,
                            store_root=tmp_path / "store", acked=acked,
                            destination=pacs.folder, fault_ended=ended, report=fault_report)
    figures.notes.append(f"destination down {time.monotonic() - down_at:.0f} s")
    assert {r.state for r in harness.outbox_rows(db_url)} == {"sent"}
    assert figures.recovery_seconds < RECOVERY_LIMIT
