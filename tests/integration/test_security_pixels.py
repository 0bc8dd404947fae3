"""Pixel-decode bombs against a real ``dicom-ai serve`` (worker process, HTTP API) and dcmtk.

Three RLE Lossless CR images are sent with dcmtk ``dcmsend`` (which proposes each file's own
transfer syntax) to a service that runs the bundled chest-nodule model with heat-map captures
sent to a dcmtk ``storescp``:

* 1 KB declaring 23170 x 23170 pixels: before the fix the worker's decoder allocated 512 MB,
  then the job failed with a pydicom message; now the job fails at once (one attempt, not
  retried) with an error naming the declared sizes and the ``[limits]`` setting.
* a valid 2 MB image of 8192 x 8192: before, the worker peaked 4.3 GB above its resting size
  and sent a 200 MB Secondary Capture; now its job stays within a few hundred MB and the capture
  is 1024 x 1024 (3 MB). Its dashboard thumbnails then cost the serve process (API thread) about
  the decoded frame (before: 900 MB).

Memory is the peak RSS of the serve process tree (serve, receiver, worker) read from ``/proc``;
each process's peak is reset through ``clear_refs`` before the step, so start-up peaks (the
model's load) do not hide anything.
"""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from storage import apikeys, jobs
from storage.db import Database
from storage.models import Job
from tests.conftest import need_binary
from tests.integration.test_loop import assert_iod_valid, db_jobs, received
from tests.peers import ENV, DicomAIServe, PeakGrowth, StoreSCP, free_port, wait_until
from tests.unit.test_pixel_limits import BIG_SIDE, BOMB_SIDE, write_rle, write_rle_bomb

MIB = 1024 * 1024
MAX_FRAME_PIXELS = 80_000_000  # set in the config: the worker must apply the admin's value
DECODED = BIG_SIDE * BIG_SIDE * 2  # 128 MiB: the 8192^2 16-bit frame once decoded


# -- memory of the serve process tree --------------------------------------------------------------
# -- the service ----------------------------------------------------------------------------------
def _config(tmp_path: Path, db_url: str, port: int, scp_port: int) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[dicom]\nhost = "127.0.0.1"\nport = {port}\nreceivers = 1\n'
        f'[storage]\nroot = "{tmp_path / "store"}"\ndatabase_url = "{db_url}"\n'
        "min_free_bytes = 0\n"
        "[completion]\nseries_quiet_seconds = 0.5\nstudy_quiet_seconds = 0.5\n"
        "poll_seconds = 0.1\n"
        "[workers]\nprocesses = 1\npoll_seconds = 0.2\nretry_backoff_seconds = 0.2\n"
        "lease_seconds = 30\nmax_attempts = 3\n"
        "[delivery]\npoll_seconds = 0.2\nretry_initial_seconds = 0.3\nretry_max_seconds = 1.0\n"
        f"[limits]\nmax_frame_pixels = {MAX_FRAME_PIXELS}\n"
        '[logging]\nlevel = "INFO"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "STORESCP"\nhost = "127.0.0.1"\n'
        f"port = {scp_port}\n"
        '[[routes]]\nname = "chest"\nmatch = { Modality = ["CR"] }\nmodel = "chest-nodule"\n'
        'destinations = ["pacs"]\nsend_heatmap = true\nheatmap_for = "all"\n'
    )
    return config


def _send(port: int, path: Path) -> None:
    """dcmtk dcmsend, as RLE: by default it decompresses lossless data when it may (and its
    RLE decoder fills the bomb's declared 512 MB); it exits 0 even when refused."""
    done = subprocess.run(
        [need_binary("dcmsend"), "-v", "--decompress-never", "-aet", "MODALITY", "-aec",
         "DICOM_AI", "127.0.0.1", str(port), str(path)],
        env=ENV, capture_output=True, text=True, check=False)
    assert "with status SUCCESS" in done.stdout + done.stderr, done.stdout + done.stderr


def _job_of(db_url: str, study_uid: str, states: tuple[str, ...]) -> Job | None:
    return next((j for j in db_jobs(db_url)
                 if j.study_instance_uid == study_uid and j.state in states), None)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pixel_bombs_fail_their_job_and_large_images_stay_bounded(tmp_path: Path, db_url: str
                                                                  ) -> None:
    need_binary("storescp")
    bomb = write_rle_bomb(tmp_path / "bomb.dcm", patient=("Bomb^Pixel", "BOMB-PX"))
    big = write_rle(tmp_path / "big.dcm", BIG_SIDE, BIG_SIDE, patient=("Big^Pixel", "BIG-PX"))
    assert (tmp_path / "bomb.dcm").stat().st_size < 2048
    assert (tmp_path / "big.dcm").stat().st_size < 3 * MIB

    with StoreSCP(tmp_path / "scp") as scp:
        port = free_port()
        server = DicomAIServe(_config(tmp_path, db_url, port, scp.port), port)
        server.start()
        try:
            assert server.process is not None
            pid = server.process.pid
            server.wait_for_log("report builders warmed up")  # the worker's preload is over
            api = re.search(r"HTTP API on (http://[\d.]+:\d+)", server.log_path.read_text())
            assert api is not None

            # 1. The bomb: refused before decoding, one attempt, the sizes in the error.
            with PeakGrowth(pid) as bomb_growth:
                _send(port, tmp_path / "bomb.dcm")
                failed = wait_until(
                    lambda: _job_of(db_url, str(bomb.StudyInstanceUID), ("failed",)), 60,
                    "the bomb's job to fail")
            error = failed.error or ""
            assert failed.attempts == 1, "not retried: no attempt can decode it"
            assert f"{BOMB_SIDE} x {BOMB_SIDE} pixels per frame" in error
            assert f"limits.max_frame_pixels ({MAX_FRAME_PIXELS:,})" in error
            assert "Bomb^Pixel" not in error
            assert bomb_growth.growth < 64 * MIB, str(bomb_growth)  # before: 512 MB

            # 2. A valid 8192^2 image: done, a bounded capture, bounded memory.
            with PeakGrowth(pid) as big_growth:
                _send(port, tmp_path / "big.dcm")
                done = wait_until(
                    lambda: _job_of(db_url, str(big.StudyInstanceUID), ("done", "failed")), 90,
                    "the large image's job")
                assert done.state == "done", done.error
                found = wait_until(
                    lambda: (lambda f: f if f["sc"] and f["sr"] else None)(received(scp.folder)),
                    30, "the SR and the heat-map capture at the PACS")
            (sc_path,) = found["sc"]
            sc = dcmread(sc_path, stop_before_pixels=True)
            assert (sc.Rows, sc.Columns) == (1024, 1024)  # before: 8192 x 8192
            assert sc_path.stat().st_size < 4 * MIB  # before: 200 MB
            assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) == big.SOPInstanceUID
            assert [float(v) for v in sc.PixelSpacing] == [0.8, 0.8]  # 0.1 mm x 8192 / 1024
            assert_iod_valid(sc_path)
            # The decoded frame and the decoder's copy of it; before: 4.3 GB.
            assert big_growth.growth < 3 * DECODED, str(big_growth)

            # 3. Its thumbnails, from the serve process's API.
            db = Database(db_url)
            try:
                with db.write_session() as session:
                    token = apikeys.create_key(session, name="viewer", role="read",
                                               now=datetime.now(UTC)).token
                with db.sessions() as session:
                    (finding,) = jobs.findings_of_study(session, str(big.StudyInstanceUID))
            finally:
                db.dispose()
            with httpx.Client(base_url=api.group(1), timeout=60,
                              headers={"X-API-Key": token}) as client, \
                    PeakGrowth(pid) as thumb_growth:
                for kind in ("source", "heatmap"):
                    answer = client.get(f"/dashboard/thumbnails/{kind}/{finding.id}.png")
                    assert answer.status_code == 200, answer.text
                    assert answer.headers["content-type"] == "image/png"
                    assert answer.content[:8] == b"\x89PNG\r\n\x1a\n"
                    assert len(answer.content) < 64 * 1024
            assert thumb_growth.growth < 3 * DECODED, str(thumb_growth)  # before: 1 GB
        finally:
            server.stop()
