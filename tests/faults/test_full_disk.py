"""Fault 6: a full disk. Results survive it: jobs wait, then deliver by themselves once freed.

A real small filesystem (a tmpfs mounted here, as root; skipped with the reason where mounting
is not permitted) is the store of a real service (in this process, with its worker process and
the bundled model); four CR studies are pushed (re-sending what is not acknowledged, as a
modality does) and dcmtk ``storescp`` keeping every copy is the destination. A ballast file
fills the filesystem:

* ``watermark``: the SQLite index lives on the small filesystem too (the embedded default);
  the ballast leaves less than ``storage.results_min_free_bytes``. Jobs wait without running
  the model, ``/ready`` is false with the reason and ``dicom_ai_results_writable`` is 0.
* ``enospc``: the index lives elsewhere and the watermark is off; the ballast leaves less
  room than one heat-map capture, so writing results fails with a real ``ENOSPC``.

In both, no job fails or uses an attempt while it waits; once the ballast is deleted every
study's SR (and heat-map SC) reaches storescp within 60 s, with no manual step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from dicom_ai.config import Settings
from dicom_ai.service import Service
from storage import jobs
from storage.db import Database
from storage.models import DONE, RUNNING, WAITING, Job
from tests.faults import harness
from tests.integration.test_loop import dicom_files, loop_settings
from tests.peers import free_bytes, small_filesystem, wait_until

FS_BYTES = 48 << 20
WATERMARK = 16 << 20
WAIT_SECONDS = 3.0  # workers.resource_wait_seconds (10 s by default)
# From freeing the disk to the last result: the issue asks for "within a minute".
RECOVERY_LIMIT = 60.0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of FS_BYTES under tmp_path, unmounted at teardown (after the service stopped:
    it comes first in the test's arguments)."""
    with small_filesystem(tmp_path / "small", FS_BYTES) as mount_point:
        yield mount_point


def fill(path: Path, ballast: Path, leave: int) -> None:
    """Write `ballast` so that about `leave` bytes stay free on `path`'s filesystem."""
    size = free_bytes(path) - leave
    with ballast.open("wb") as fh:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            fh.write(chunk[:min(size, len(chunk))])
            size -= len(chunk)
        fh.flush()
        os.fsync(fh.fileno())


def all_jobs(url: str) -> list[Job]:
    db = Database(url)
    try:
        with db.sessions() as session:
            return jobs.list_jobs(session, limit=100)
    finally:
        db.dispose()


@pytest.mark.parametrize("case", ["watermark", "enospc"])
def test_jobs_wait_on_a_full_disk_and_deliver_once_it_is_freed(
    small_fs: Path, case: str, tmp_path: Path, cr_studies: Path, pacs: harness.ResultSCP,
    start_service: Callable[[Settings], Service], fault_report: list[harness.FaultFigures],
) -> None:
    root = small_fs / "store"
    inside = case == "watermark"
    url = f"sqlite:///{(root if inside else tmp_path) / 'index.sqlite3'}"
    files = dicom_files(cr_studies)
    settings = loop_settings(
        tmp_path, url, [{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1",
                         "port": pacs.port}],
        storage={"root": root, "results_min_free_bytes": WATERMARK if inside else 0},
        workers={"resource_wait_seconds": WAIT_SECONDS},
        # enospc: the studies complete after the ballast is in place (it is written
        # right after the push; the images themselves need the room).
        completion={"series_quiet_seconds": 2.0, "study_quiet_seconds": 2.0})
    service = start_service(settings)
    assert service.api_address is not None
    assert service.address is not None
    api = httpx.Client(base_url=f"http://127.0.0.1:{service.api_address[1]}", timeout=30)
    ballast = small_fs / "ballast"
    if inside:
        fill(small_fs, ballast, leave=WATERMARK // 2)  # ingest (min_free_bytes 0) goes on
        acked = harness.push_acknowledged(service.address[1], files)
    else:
        acked = harness.push_acknowledged(service.address[1], files)
        fill(small_fs, ballast, leave=32 << 10)  # less than one heat-map capture

    expected = ("waiting: results store below storage.results_min_free_bytes ("
                if inside else "waiting: no space left on device")

    def waiting() -> list[Job] | None:
        """Every job waits (one may be on its next try): never failed, no attempt used."""
        found = all_jobs(url)
        ok = len(found) == 4 and all(
            (j.state, j.attempts) in ((WAITING, 0), (RUNNING, 1))
            and (j.error or "").startswith(expected) for j in found)
        return found if ok and sum(j.state == WAITING for j in found) >= 3 else None

    wait_until(waiting, 40, "4 jobs waiting")
    time.sleep(2.5 * WAIT_SECONDS)  # several more tries each: still waiting, never failed
    rows = wait_until(waiting, 5, "4 jobs still waiting")
    assert rows is not None
    ready = api.get("/ready")
    metrics = api.get("/metrics").text
    assert 'dicom_ai_jobs{state="waiting"}' in metrics
    if inside:
        assert ready.status_code == 503, ready.text
        check = ready.json()["checks"]["results"]
        assert not check["ok"]
        assert "results_min_free_bytes" in check["detail"]
        assert "dicom_ai_results_writable 0.0" in metrics
    assert list(pacs.folder.iterdir()) == []
    assert not list(root.rglob("*.tmp")), "no partial result file is left behind"

    ballast.unlink()
    freed = time.time()
    harness.wait_delivered(pacs.folder, acked, RECOVERY_LIMIT,
                           "4 SRs and 4 SCs after freeing the disk")
    figures = harness.check(f"full disk ({case})", db_url=url, store_root=root,
                            acked=acked, destination=pacs.folder, fault_ended=freed,
                            report=fault_report)
    figures.notes.append(f"resource_wait_seconds {WAIT_SECONDS:g}; jobs waited, 0 attempts")
    assert figures.recovery_seconds < RECOVERY_LIMIT
    assert api.get("/ready").status_code == 200
    assert "dicom_ai_results_writable 1.0" in api.get("/metrics").text
    api.close()
    done = all_jobs(url)
    assert [(j.state, j.attempts) for j in done] == [(DONE, 1)] * 4
    log = (tmp_path / "service.log").read_text()
    assert "waits, no attempt used" in log
    assert "; resumed after waiting (" in log
    assert ("resumes (it waited: " in log) == inside  # the watermark is seen to be clear
