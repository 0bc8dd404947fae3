"""Our own results coming back are recognised and never fed on (design convention 14).

A PACS auto-forwarding a study with our SR and heat-map SC in it, or a batch running again over
a study we processed, must make no new job and send nothing. Tested over real associations
(dcmtk storescu), and end to end with Orthanc as the PACS and the archive (bundled model).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import UID, generate_uid
from sqlalchemy import func, select, update

from dicom_ai.batch.run import BatchQuery, BatchRunner
from dicom_ai.config import Settings, load_settings
from dicom_ai.ingest.spool import OWN_MANUFACTURER
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import batches, jobs, repository
from storage.db import Database
from storage.models import COMPLETE, Event, Instance, Job, OutboxItem, ResultObject, Series, Study
from tests.conftest import need_binary
from tests.peers import Orthanc, make_ct_series, storescu, wait_until

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
FAST = {"series_quiet_seconds": 0.3, "study_quiet_seconds": 0.3, "poll_seconds": 0.1}
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def secondary_capture(out: Path, study_uid: str, *, manufacturer: str,
                      sop_uid: str | None = None) -> Path:
    """A small Secondary Capture in a new series of `study_uid` (like our heat-map SC)."""
    [path] = make_ct_series(out, 1, size=16, study_uid=study_uid)
    ds = dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(SC_CLASS)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid or generate_uid())
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Manufacturer = manufacturer
    ds.save_as(path, enforce_file_format=True)
    return path


def record_result(db: Database, study_uid: str, sop_uid: str, *, route: str = "r",
                  version: str = "1") -> None:
    """A done job whose result object has `sop_uid` (as a worker's complete_job writes it)."""
    now = datetime.now(UTC)
    with db.write_session() as session:
        job = jobs.create_job(session, study_instance_uid=study_uid, series_instance_uids=[],
                              route=route, model_name="m", max_attempts=1, event_id=None,
                              now=now)
        assert jobs.claim_job(session, job.id, owner="t", lease_seconds=30, now=now)
        assert jobs.complete_job(session, job.id, owner="t", model_version=version, findings=[],
                                 results=[jobs.ResultToStore(
                                     kind="heatmap", sr_kind=None, study_instance_uid=study_uid,
                                     series_instance_uid=generate_uid(), sop_instance_uid=sop_uid,
                                     sop_class_uid=SC_CLASS, path="results/x.dcm")],
                                 timings={}, now=now)


def study_row(db: Database, study_uid: str) -> tuple[str, int]:
    """(state, completion_count) of a study."""
    with db.sessions() as session:
        row = session.execute(select(Study.state, Study.completion_count)
                              .where(Study.study_instance_uid == study_uid)).one()
    return str(row[0]), int(row[1])


def count(db: Database, entity: Any, *where: Any) -> int:
    """Rows of a table (optionally filtered)."""
    with db.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(entity).where(*where)) or 0)


@pytest.mark.parametrize("own_results", ["store", "drop"])
def test_own_results_never_reopen_a_study_stored_or_dropped(
    tmp_path: Path, make_settings: Callable[..., Settings],
    start_service: Callable[[Settings], Service], own_results: str,
) -> None:
    need_binary("storescu")
    settings = make_settings(completion=FAST, storage={"own_results": own_results})
    service = start_service(settings)
    assert service.address is not None
    port = service.address[1]
    [image] = make_ct_series(tmp_path / "ct", 1, size=16)
    study_uid = str(dcmread(image, stop_before_pixels=True).StudyInstanceUID)
    assert storescu(port, [image]).returncode == 0
    db = Database(settings.storage.url)
    try:
        wait_until(lambda: study_row(db, study_uid) == (COMPLETE, 1), 20, "the study completes")
        # Ours by its SOP Instance UID (another vendor's Manufacturer), and by our
        # Manufacturer alone (an object of an earlier database).
        by_uid = generate_uid()
        record_result(db, study_uid, by_uid)
        ours = [secondary_capture(tmp_path / "a", study_uid, manufacturer="OTHER", sop_uid=by_uid),
                secondary_capture(tmp_path / "b", study_uid, manufacturer=OWN_MANUFACTURER)]
        sent = storescu(port, ours, calling="PACS")
        assert sent.returncode == 0, sent.stderr
        time.sleep(1.5)  # several quiet periods and completion polls
        assert study_row(db, study_uid) == (COMPLETE, 1), "our results re-opened the study"
        assert count(db, Event) == 2  # the image's series.complete and study.complete only
        held = count(db, Instance)
        if own_results == "store":
            assert held == 3
            assert count(db, Series, Series.own_results.is_(True)) == 2
            with db.sessions() as session:
                routable = jobs.series_of_study(session, study_uid)
            assert len(routable) == 1, "our own series are never routed"
        else:
            assert held == 1
            assert len(list((settings.storage.root / "instances" / study_uid).glob("*/*"))) == 1
        # Someone else's Secondary Capture is an ordinary instance: it re-opens the study.
        other = secondary_capture(tmp_path / "c", study_uid, manufacturer="OTHER")
        assert storescu(port, [other], calling="PACS").returncode == 0
        wait_until(lambda: study_row(db, study_uid) == (COMPLETE, 2), 20,
                   "another vendor's SC completes the study again")
    finally:
        db.dispose()


def test_a_batch_counts_a_study_processed_only_with_results_of_the_active_version(
    db_url: str,
) -> None:
    db = Database(db_url)
    db.upgrade()
    now = datetime.now(UTC)
    try:
        with db.write_session() as session:
            repository.index_instance(
                session, repository.InstanceRecord(
                    "1.2.3", "1.2.3.1", "1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.1",
                    "1.2.840.10008.1.2"),
                path="x.dcm", size_bytes=1, calling_ae_title="PACS", now=now, replace=False)
            repository.complete_quiet(session, now=now + timedelta(seconds=9), series_quiet=1,
                                      study_quiet=1)
        record_result(db, "1.2.3", generate_uid(), route="chest", version="1.0.0")
        with db.write_session() as session:
            session.execute(update(Event).values(consumed_at=now))  # routed
            batch = batches.create_batch(session, kind="run", source="s", route=None,
                                         query={}, now=now)
            batches.add_found(session, batch.id, [batches.FoundStudy("1.2.3")])
            [row] = batches.studies(session, batch.id)
            batches.mark_retrieved(session, row.id, instances=1, failed=0, now=now)
        current, newer = {"chest": "1.0.0"}, {"chest": "2.0.0"}
        with db.write_session() as session:
            assert batches.has_current_results(session, "1.2.3", current)
            assert not batches.has_current_results(session, "1.2.3", newer)
            assert not batches.has_current_results(session, "1.2.3", {"other": "1.0.0"})
            assert not batches.has_stale_results(session, "1.2.3", current)
            assert batches.has_stale_results(session, "1.2.3", newer)
            [done] = batches.progress(session, batch.id, None, current)
            [stale] = batches.progress(session, batch.id, None, newer)
            assert done.processed
            assert not stale.processed
            assert stale.stale
            # Results of an older version: the complete study is routed again, once.
            assert batches.request_routing(session, "1.2.3", now)
        with db.write_session() as session:
            assert not batches.request_routing(session, "1.2.3", now)
            assert count(db, Event, Event.consumed_at.is_(None)) == 1
    finally:
        db.dispose()


# -- end to end with Orthanc ----------------------------------------------------------------
def orthanc_post(orthanc: Orthanc, path: str, body: Any) -> Any:
    """POST JSON (or a bare string) to Orthanc's REST API."""
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}{path}", data=data,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture
def pacs(tmp_path: Path, db_url: str) -> Iterator[dict[str, Any]]:
    """Our service (chest route, heat-maps, results to Orthanc; Orthanc as the batch source)
    and an Orthanc that knows our AE and holds one synthetic CR study."""
    need_binary("Orthanc")
    need_binary("storescu")
    study = tmp_path / "study"
    synthesize(study, studies=1, seed=7, modality="CR", positive_fraction=1.0, difficulty=0.3,
               compress=False)
    files = sorted(p for p in study.rglob("*.dcm") if "masks" not in p.parts)
    base: dict[str, Any] = {
        "dicom": {"host": "127.0.0.1", "port": 0, "receivers": 1},
        "storage": {"root": tmp_path / "store", "database_url": db_url, "min_free_bytes": 0},
        "completion": {"series_quiet_seconds": 0.5, "study_quiet_seconds": 0.5,
                       "poll_seconds": 0.1},
        "workers": {"processes": 1, "poll_seconds": 0.2},
        "delivery": {"poll_seconds": 0.2, "retry_initial_seconds": 0.3},
        "api": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "INFO", "file": tmp_path / "service.log"},
    }
    first = Service(load_settings(None, **base))  # learn a free port Orthanc can call back
    first.start()
    assert first.address is not None
    port = first.address[1]
    first.stop()
    with Orthanc(tmp_path / "orthanc",
                 modalities={"dicomai": ("DICOM_AI", "127.0.0.1", port)}) as orthanc:
        assert storescu(orthanc.port, files, aet=orthanc.aet).returncode == 0
        settings = load_settings(None, **{
            **base, "dicom": {**base["dicom"], "port": port},
            "sources": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                         "port": orthanc.port, "retrieve": "move"}],
            "destinations": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                              "port": orthanc.port}],
            "routes": [{"name": "chest", "match": {"Modality": "CR"}, "model": "chest-nodule",
                        "destinations": ["orthanc"], "send_heatmap": True}],
        })
        service = Service(settings)
        service.start()
        try:
            yield {"orthanc": orthanc, "settings": settings, "db_url": db_url,
                   "study": str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)}
        finally:
            service.stop()


@sqlite_only
def test_results_forwarded_back_and_a_second_batch_make_no_new_job_nor_object(
    pacs: dict[str, Any],
) -> None:
    orthanc, settings, study_uid = pacs["orthanc"], pacs["settings"], pacs["study"]
    db = Database(pacs["db_url"])
    try:
        runner = BatchRunner(settings, db, "orthanc")
        counts = runner.run(runner.create(BatchQuery(study_date="19000101-20991231")),
                            timeout=180)
        assert (counts.found, counts.processed, counts.failed) == (1, 1, 0)
        results = count(db, ResultObject)
        assert results >= 1
        wait_until(lambda: count(db, OutboxItem, OutboxItem.state == "sent") == results, 60,
                   "our results sent to Orthanc")
        held = orthanc.rest("/statistics")["CountInstances"]
        assert held == 1 + results, "the image and our results"

        # A second batch over the same archive (which now holds our results too).
        counts = runner.run(runner.create(BatchQuery(study_date="19000101-20991231")),
                            timeout=60)
        assert (counts.found, counts.processed, counts.failed) == (1, 1, 0)
        assert count(db, Instance) == 1, "the second batch retrieved the study again"
        time.sleep(3)  # several quiet periods and scheduler ticks
        assert study_row(db, study_uid)[1] == 1, "the second batch re-opened the study"
        assert count(db, Job) == 1, "the second batch made a new job"
        assert orthanc.rest("/statistics")["CountInstances"] == held

        # Orthanc forwards the whole study (image, SR, SC) back to us.
        [orthanc_study] = orthanc.rest("/studies")
        answer = orthanc_post(orthanc, "/modalities/dicomai/store", orthanc_study)
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        wait_until(lambda: count(db, Instance) == held, 30, "the forwarded study stored")
        time.sleep(3)  # several quiet periods and scheduler ticks
        assert study_row(db, study_uid)[1] == 1, "the forwarded study re-opened"
        assert count(db, Job) == 1, "our forwarded results made a new job"
        assert count(db, OutboxItem) == results
        assert orthanc.rest("/statistics")["CountInstances"] == held
    finally:
        db.dispose()
