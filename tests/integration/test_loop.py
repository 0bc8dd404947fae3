"""The whole loop with real peers: dcmtk storescu pushes, the service routes, runs the bundled
model in worker processes and sends SRs (and heat-map SCs) to dcmtk storescp and Orthanc.

Each test runs a real service (in this process, with its pool of spawned worker processes) on
free loopback ports; results are validated with dsrdump and dciodvfy and compared with the
synthetic ground truth.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_ai.config import Settings, load_settings
from dicom_ai.inference.registry import Registry
from dicom_ai.reporting import summarize_sr
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import jobs, outbox
from storage.db import Database
from storage.models import Job
from tests.conftest import missing, need_binary
from tests.peers import (
    ENV,
    REPO,
    Orthanc,
    StoreSCP,
    echo_ok,
    free_port,
    make_ct_series,
    port_open,
    settings_toml,
    storescu,
    wait_until,
)

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33": "comprehensive",
              "1.2.840.10008.5.1.4.1.1.88.34": "comprehensive3d"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"

sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
postgres_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


# -- helpers ------------------------------------------------------------------------------------
def loop_settings(tmp_path: Path, db_url: str, destinations: list[dict[str, Any]],
                  routes: list[dict[str, Any]] | None = None,
                  **sections: dict[str, Any]) -> Settings:
    """Settings for a loop test: loopback, short quiet periods and retry delays."""
    names = [d["name"] for d in destinations]
    base: dict[str, Any] = {
        "dicom": {"host": "127.0.0.1", "port": 0, "receivers": 1},
        "storage": {"root": tmp_path / "store", "database_url": db_url, "min_free_bytes": 0},
        "completion": {"series_quiet_seconds": 0.5, "study_quiet_seconds": 0.5,
                       "poll_seconds": 0.1},
        "workers": {"processes": 1, "poll_seconds": 0.2, "retry_backoff_seconds": 0.2,
                    "lease_seconds": 30},
        "delivery": {"poll_seconds": 0.2, "retry_initial_seconds": 0.3,
                     "retry_max_seconds": 1.0},
        "logging": {"level": "INFO", "file": tmp_path / "service.log"},
        "api": {"host": "127.0.0.1", "port": 0},
        "destinations": destinations,
        "routes": routes if routes is not None else [
            # "all": these tests count one SC per study (the positive-only default is tested in
            # test_heatmap_results).
            {"name": "chest", "match": {"Modality": ["CR", "DX"]}, "model": "chest-nodule",
             "destinations": names, "send_heatmap": True, "heatmap_for": "all"}],
    }
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return load_settings(None, **base)


def received(folder: Path) -> dict[str, list[Path]]:
    """Files in a storescp folder by kind: sr, sc, other."""
    found: dict[str, list[Path]] = {"sr": [], "sc": [], "other": []}
    for path in sorted(folder.glob("*")):
        if not path.is_file():
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:  # a file storescp is still writing
            continue
        sop_class = str(ds.SOPClassUID)
        kind = "sr" if sop_class in SR_CLASSES else "sc" if sop_class == SC_CLASS else "other"
        found[kind].append(path)
    return found


def arrived(folder: Path, srs: int, scs: int) -> Callable[[], dict[str, list[Path]] | None]:
    """A wait_until predicate: exactly `srs` SRs and `scs` SCs are in `folder`."""

    def check() -> dict[str, list[Path]] | None:
        found = received(folder)
        return found if len(found["sr"]) == srs and len(found["sc"]) == scs else None

    return check


def assert_valid_sr(path: Path) -> None:
    """dsrdump -v +Pt exits 0; dciodvfy prints no Error line."""
    dump = subprocess.run([need_binary("dsrdump"), "-v", "+Pt", str(path)],
                          capture_output=True, text=True, check=False)
    assert dump.returncode == 0, dump.stderr + dump.stdout
    assert_iod_valid(path)


def assert_iod_valid(path: Path) -> None:
    """dciodvfy reports no Error (it may exit 0 on errors: read the lines)."""
    check = subprocess.run([need_binary("dciodvfy"), str(path)], capture_output=True,
                           text=True, check=False)
    errors = [line for line in (check.stdout + check.stderr).splitlines()
              if line.startswith("Error")]
    assert not errors, f"{path.name}: {errors}"


def truth_of(folder: Path) -> dict[str, bool]:
    """StudyInstanceUID -> nodule present, from a synth labels.csv."""
    with (folder / "labels.csv").open() as fh:
        return {row["StudyInstanceUID"]: row["label"] == "1" for row in csv.DictReader(fh)}


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files a synth folder holds (not labels or masks)."""
    return sorted(p for p in folder.rglob("*.dcm") if "masks" not in p.parts)


def db_jobs(db_url: str) -> list[Job]:
    """Every job row, oldest first."""
    db = Database(db_url)
    try:
        with db.sessions() as session:
            return list(reversed(jobs.list_jobs(session, limit=1000)))
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def cr_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic CR studies, two with nodules (easy enough for the bundled model)."""
    out = tmp_path_factory.mktemp("cr")
    # Uncompressed: dcmtk storescu cannot send compressed files without a flag per syntax (the
    # receiver prefers uncompressed); compressed receiving is covered in test_receive.
    synthesize(out, studies=4, seed=7, modality="CR", positive_fraction=0.5, difficulty=0.3,
               compress=False)
    return out


def push(service: Service, files: list[Path], calling: str = "MODALITY") -> None:
    """dcmtk storescu sends the files to the service."""
    assert service.address is not None
    result = storescu(service.address[1], files, calling=calling)
    assert result.returncode == 0, result.stderr


# -- the loop ---------------------------------------------------------------------------------
@sqlite_only
def test_results_reach_storescp_and_orthanc_and_match_the_truth(
    tmp_path: Path, db_url: str, cr_studies: Path, start_service: Callable[[Settings], Service]
) -> None:
    need_binary("storescu")
    need_binary("Orthanc")
    with StoreSCP(tmp_path / "scp") as scp, Orthanc(tmp_path / "orthanc") as orthanc:
        settings = loop_settings(tmp_path, db_url, [
            {"name": "dcmtk", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port},
            {"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
             "port": orthanc.port, "sr_kind": "comprehensive3d"},
        ])
        service = start_service(settings)
        ct = make_ct_series(tmp_path / "ct", 2, size=64)
        push(service, [*dicom_files(cr_studies), *ct])
        truth = truth_of(cr_studies)

        got = wait_until(arrived(scp.folder, 4, 4), 120, "4 SRs and 4 SCs at storescp")
        wait_until(lambda: orthanc.rest("/statistics")["CountInstances"] == 8, 60,
                   "4 SRs and 4 SCs in Orthanc")

    for path in got["sr"]:
        assert_valid_sr(path)
        ds = dcmread(path)
        assert SR_CLASSES[str(ds.SOPClassUID)] == "comprehensive"
        study = str(ds.StudyInstanceUID)
        assert study in truth, "the SR belongs to the source study"
        findings = summarize_sr(ds)
        assert [f.algorithm_name for f in findings] == ["chest-nodule"]
        assert findings[0].present == truth[study], f"decision differs from truth for {study}"
    for path in got["sc"]:
        assert_iod_valid(path)
        sc = dcmread(path)
        assert sc.BurnedInAnnotation == "YES"
        assert str(sc.StudyInstanceUID) in truth

    # Orthanc received Comprehensive 3D SRs (its destination's choice), also valid.
    db = Database(db_url)
    with db.sessions() as session:
        orthanc_srs = [r for job_id in range(1, 10) for r in jobs.results_of_job(session, job_id)
                       if r.kind == "sr" and r.sr_kind == "comprehensive3d"]
        assert len(orthanc_srs) == 4
        assert outbox.outbox_counts(session) == {"sent": 16}
        for study, present in truth.items():
            rows = jobs.findings_of_study(session, study)
            assert [r.present for r in rows] == [present]
            assert rows[0].model_name == "chest-nodule"
            assert rows[0].model_version == "1.0.0"
            assert rows[0].heatmap_path is not None
            assert (rows[0].location_kind == "bbox") == present
        ct_study = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
        decisions = jobs.decisions_of_study(session, ct_study)
        assert [d.route for d in decisions] == [None]
        assert "unrouted" in decisions[0].reason
        assert "Modality" in decisions[0].reason
    db.dispose()
    assert_valid_sr(settings.storage.root / orthanc_srs[0].path)
    assert all(j.state == "done" and j.attempts == 1 for j in db_jobs(db_url))
    # The worker processes' log lines reach [logging] file (which the privacy test greps).
    assert settings.logging.file is not None
    logged = settings.logging.file.read_text()
    assert re.search(r"\[\d+\] dicom_ai\.runner\.run: job \d+ done", logged), logged[-2000:]


@sqlite_only
def test_destination_down_then_service_restart_then_up_loses_nothing(
    tmp_path: Path, db_url: str, cr_studies: Path, start_service: Callable[[Settings], Service]
) -> None:
    need_binary("storescp")
    port = free_port()  # nothing listens here yet: the destination is down
    settings = loop_settings(tmp_path, db_url, [
        {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}])
    first = start_service(settings)
    push(first, dicom_files(cr_studies)[:2])

    def retried() -> bool:
        db = Database(db_url)
        with db.sessions() as session:
            rows = [item for item, _ in outbox.list_outbox(session)]
            ok = len(rows) == 4 and all(r.attempts >= 2 and r.state == "pending" for r in rows)
        db.dispose()
        return ok

    wait_until(retried, 90, "4 outbox rows failing at least twice")
    first.stop()  # a restart while results wait: they are rows, not memory
    second = start_service(settings)
    scp = StoreSCP(tmp_path / "scp")
    scp.port = port
    with scp:
        got = wait_until(arrived(scp.folder, 2, 2), 60, "2 SRs and 2 SCs delivered")
    assert second.address is not None
    for path in got["sr"]:
        assert_valid_sr(path)
    db = Database(db_url)
    with db.sessions() as session:
        assert outbox.outbox_counts(session) == {"sent": 4}
    db.dispose()


def _big_series(cr_studies: Path, out: Path, count: int) -> list[Path]:
    """`count` images in one new study and series (copies of a synthetic CR image)."""
    source = dcmread(dicom_files(cr_studies)[0])
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        source.StudyInstanceUID, source.SeriesInstanceUID = study, series
        source.SOPInstanceUID = generate_uid()
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        source.InstanceNumber = i + 1
        path = out / f"{i:03d}.dcm"
        source.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@sqlite_only
def test_worker_killed_mid_job_loses_nothing_and_receiver_survives(
    tmp_path: Path, db_url: str, cr_studies: Path, start_service: Callable[[Settings], Service]
) -> None:
    need_binary("storescp")
    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(tmp_path, db_url, [
            {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}])
        service = start_service(settings)
        assert service.pool is not None
        files = _big_series(cr_studies, tmp_path / "big", 40)
        push(service, files)
        victim = service.pool.pids()[0]
        wait_until(lambda: any(j.state == "running" for j in db_jobs(db_url)), 60,
                   "the job to be running")
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        got = wait_until(arrived(scp.folder, 1, 40), 120, "the SR and 40 SCs")
        time.sleep(1.0)  # anything sent twice would arrive now
        assert service.address is not None
        assert echo_ok(service.address[1]), "the receiver survived the worker's death"
        assert service.pool.pids()[0] != victim, "the pool restarted the worker"
    [job] = db_jobs(db_url)
    assert job.state == "done"
    assert job.attempts == 2, "the killed attempt counts"
    assert len(received(scp.folder)["sr"]) == 1
    db = Database(db_url)
    with db.sessions() as session:
        assert outbox.outbox_counts(session) == {"sent": 41}
        assert len(jobs.findings_of_study(session, job.study_instance_uid)) == 40
    db.dispose()
    assert_valid_sr(got["sr"][0])


@sqlite_only
def test_late_image_reruns_the_job_and_the_new_sr_replaces_the_old(
    tmp_path: Path, db_url: str, cr_studies: Path, start_service: Callable[[Settings], Service]
) -> None:
    need_binary("storescp")
    files = _big_series(cr_studies, tmp_path / "study", 2)
    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(tmp_path, db_url, [
            {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}])
        service = start_service(settings)
        push(service, files[:1])
        [first] = wait_until(arrived(scp.folder, 1, 1), 90, "the first SR and SC")["sr"]
        push(service, files[1:])  # a late image of the same series
        second = wait_until(lambda: [p for p in received(scp.folder)["sr"] if p != first] or None,
                            90, "the replacing SR")[0]
    old, new = dcmread(first), dcmread(second)
    assert new.StudyInstanceUID == old.StudyInstanceUID
    [ref] = new.PredecessorDocumentsSequence
    assert ref.StudyInstanceUID == old.StudyInstanceUID
    predecessor = ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert len(summarize_sr(new)) == 2
    assert len(summarize_sr(old)) == 1
    assert_valid_sr(second)
    first_job, second_job = db_jobs(db_url)
    assert second_job.supersedes_job_id == first_job.id
    db = Database(db_url)
    with db.sessions() as session:
        current = jobs.findings_of_study(session, str(new.StudyInstanceUID))
        everything = jobs.findings_of_study(session, str(new.StudyInstanceUID),
                                            current_only=False)
    db.dispose()
    assert {f.job_id for f in current} == {second_job.id}
    assert len(current) == 2
    assert [f.superseded_by_job_id for f in everything if f.job_id == first_job.id] == [
        second_job.id]


@sqlite_only
def test_failing_model_is_retried_then_stays_failed_and_unknown_model_fails_at_once(
    tmp_path: Path, db_url: str, cr_studies: Path, start_service: Callable[[Settings], Service]
) -> None:
    # A registered model whose network file is damaged: loading fails (retryable) every time.
    registry = Registry(tmp_path / "store" / "models")
    broken = tmp_path / "broken"
    shutil.copytree(registry.get("chest-nodule").path, broken)
    spec = json.loads((broken / "spec.json").read_text())
    spec.update(name="broken-model", version="1.0.0")
    (broken / "spec.json").write_text(json.dumps(spec))
    (broken / "model.keras").write_bytes(b"not a keras archive")
    registry.add(broken)
    settings = loop_settings(
        tmp_path, db_url, [], routes=[
            {"name": "broken", "match": {"Modality": "CR"}, "model": "broken-model"},
            {"name": "unknown", "match": {"Modality": "CR"}, "model": "no-such-model"}],
        workers={"max_attempts": 3})
    service = start_service(settings)
    push(service, dicom_files(cr_studies)[:1])

    def settled() -> list[Job] | None:
        rows = db_jobs(db_url)
        return rows if len(rows) == 2 and all(j.state == "failed" for j in rows) else None

    rows = {j.route: j for j in wait_until(settled, 90, "both jobs failed for good")}
    assert rows["broken"].attempts == 3, "retried per policy, then stopped"
    assert "cannot load broken-model 1.0.0" in (rows["broken"].error or "")
    assert rows["unknown"].attempts == 1, "no retry can find an unknown model"
    assert "no-such-model" in (rows["unknown"].error or "")
    assert service.address is not None
    assert echo_ok(service.address[1])


# -- Celery workers ---------------------------------------------------------------------------
@postgres_only
@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/15",
                                    "amqp://guest:guest@127.0.0.1:5672//"])
def test_celery_workers_on_redis_and_rabbitmq_with_postgresql(
    tmp_path: Path, db_url: str, broker: str, cr_studies: Path,
    start_service: Callable[[Settings], Service]
) -> None:
    need_binary("storescp")
    port = 6379 if broker.startswith("redis") else 5672
    if not port_open(port):
        missing(f"broker {broker.split('@')[-1]} not reachable")
    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(
            tmp_path, db_url,
            [{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
            workers={"backend": "celery", "broker_url": broker,
                     "queue": f"dicom-ai-test-{uuid.uuid4().hex[:8]}"})
        service = start_service(settings)  # routes and publishes; runs no model itself
        config = tmp_path / "worker.toml"
        config.write_text(settings_toml(settings))
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "dicom_ai.cli", "worker", "--config", str(config),
             "--concurrency", "1"], cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            push(service, dicom_files(cr_studies)[:2])
            def delivered() -> bool:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                return len(received(scp.folder)["sr"]) == 2

            wait_until(delivered, 120, "2 SRs via Celery")
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
            log.close()
    truth = truth_of(cr_studies)
    for path in received(scp.folder)["sr"]:
        assert_valid_sr(path)
        ds = dcmread(path)
        assert summarize_sr(ds)[0].present == truth[str(ds.StudyInstanceUID)]
    assert [j.state for j in db_jobs(db_url)] == ["done", "done"]
    assert "dicom_ai.run_job" in (tmp_path / "worker.log").read_text()


def _celery_worker(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``dicom-ai worker`` (Celery, one prefork child) in a process group of its own."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "dicom_ai.cli", "worker", "--config", str(config),
             "--concurrency", "1"], cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)


@postgres_only
def test_celery_worker_killed_mid_job_is_recovered_by_its_lease(
    tmp_path: Path, db_url: str, cr_studies: Path, start_service: Callable[[Settings], Service]
) -> None:
    """SIGKILL of a whole Celery worker (main process and child) mid-job: its message is never
    acknowledged and Redis would re-deliver it only after the visibility timeout, so the job
    lease is what recovers it: once it expires the scheduler hands the job out again and
    another worker finishes it; the results are sent once."""
    need_binary("storescp")
    if not port_open(6379):
        missing("broker 127.0.0.1:6379 not reachable")
    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(
            tmp_path, db_url,
            [{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
            workers={"backend": "celery", "broker_url": "redis://127.0.0.1:6379/15",
                     "queue": f"dicom-ai-test-{uuid.uuid4().hex[:8]}", "lease_seconds": 4})
        service = start_service(settings)
        config = tmp_path / "worker.toml"
        config.write_text(settings_toml(settings))
        first = _celery_worker(config, tmp_path / "worker-1.log")
        second: subprocess.Popen[bytes] | None = None
        try:
            push(service, _big_series(cr_studies, tmp_path / "big", 40))
            wait_until(lambda: any(j.state == "running" for j in db_jobs(db_url)), 120,
                       "the job to be running on the first worker")
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
            killed_at = time.monotonic()
            second = _celery_worker(config, tmp_path / "worker-2.log")
            got = wait_until(arrived(scp.folder, 1, 40), 180, "the SR and 40 SCs")
            recovered = time.monotonic() - killed_at
            time.sleep(1.0)  # anything sent twice would arrive now
        finally:
            for worker in (first, second):
                if worker is not None and worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGTERM)
                    try:
                        worker.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(worker.pid, signal.SIGKILL)
    [job] = db_jobs(db_url)
    assert job.state == "done"
    assert job.attempts == 2, "the killed attempt counts"
    assert len(received(scp.folder)["sr"]) == 1
    assert recovered < 120, f"recovery took {recovered:.0f} s"
    assert "dicom_ai.run_job" in (tmp_path / "worker-2.log").read_text()
    assert_valid_sr(got["sr"][0])


@sqlite_only
def test_segmentation_route_sends_seg_and_sr_referencing_its_segments(
    tmp_path: Path, db_url: str, cr_studies: Path, start_service: Callable[[Settings], Service]
) -> None:
    need_binary("storescp")
    truth = truth_of(cr_studies)
    positive = [p for p in dicom_files(cr_studies)
                if truth[str(dcmread(p, stop_before_pixels=True).StudyInstanceUID)]][:1]
    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(tmp_path, db_url, [
            {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
            routes=[{"name": "nodule-seg", "match": {"Modality": "CR"},
                     "model": "chest-nodule-seg", "destinations": ["pacs"], "send_seg": True}])
        service = start_service(settings)
        push(service, positive)
        got = wait_until(lambda: (r := received(scp.folder)) and len(r["sr"]) == 1
                         and len(r["other"]) == 1 and r, 90, "the SR and the SEG")
    seg_path, sr_path = got["other"][0], got["sr"][0]
    seg = dcmread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == dcmread(positive[0], stop_before_pixels=True).StudyInstanceUID
    assert_iod_valid(seg_path)
    assert_valid_sr(sr_path)
    findings = summarize_sr(dcmread(sr_path))
    assert findings, "a segmentation of a nodule image reports at least one nodule"
    assert all(f.present and f.location_kind == "segment" for f in findings)
    assert len(seg.SegmentSequence) == len(findings)
