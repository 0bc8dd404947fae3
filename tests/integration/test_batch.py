"""Batch query/retrieve against a real Orthanc: C-FIND, C-MOVE into our receiver and C-GET,
the model runs, and the SRs arrive back in Orthanc; an interrupted batch resumes without
fetching again what it already has.
"""

from __future__ import annotations

import csv
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_ai.batch.run import BatchQuery, BatchRunner, Counts, report_rows, write_report
from dicom_ai.config import Settings, load_settings
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import batches
from storage.db import Database
from storage.models import Instance
from tests.conftest import need_binary, needs_tuning
from tests.peers import Orthanc, storescu, wait_until

sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def archive_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic CR studies (uncompressed) with accession numbers and study dates."""
    out = tmp_path_factory.mktemp("archive")
    synthesize(out, studies=4, seed=7, modality="CR", positive_fraction=0.5, difficulty=0.3,
               compress=False)
    return out


def study_headers(folder: Path) -> list[Any]:
    """One header per study (synthetic CR: one image per study), in a fixed order."""
    files = sorted(p for p in folder.rglob("*.dcm") if "masks" not in p.parts)
    return sorted((dcmread(p, stop_before_pixels=True) for p in files),
                  key=lambda ds: str(ds.AccessionNumber))


@pytest.fixture
def loop(tmp_path: Path, db_url: str, archive_studies: Path) -> Iterator[dict[str, Any]]:
    """Our service (C-MOVE destination, model route sending SRs to Orthanc) and an Orthanc
    archive that knows our AE and holds the four studies."""
    need_binary("Orthanc")
    need_binary("storescu")
    base: dict[str, Any] = {
        "dicom": {"host": "127.0.0.1", "port": 0, "receivers": 1},
        "storage": {"root": tmp_path / "store", "database_url": db_url, "min_free_bytes": 0},
        "completion": {"series_quiet_seconds": 0.5, "study_quiet_seconds": 0.5,
                       "poll_seconds": 0.1},
        "workers": {"processes": 1, "poll_seconds": 0.2},
        "delivery": {"poll_seconds": 0.2, "retry_initial_seconds": 0.3},
        "api": {"host": "127.0.0.1", "port": 0},
    }
    # Our port must be known to Orthanc (C-MOVE destination): start the service first with
    # no source, then restart it with the source and destination once Orthanc runs.
    first = Service(load_settings(None, **base))
    first.start()
    assert first.address is not None
    port = first.address[1]
    first.stop()
    with Orthanc(tmp_path / "orthanc",
                 modalities={"dicomai": ("DICOM_AI", "127.0.0.1", port)}) as orthanc:
        files = sorted(p for p in archive_studies.rglob("*.dcm") if "masks" not in p.parts)
        sent = storescu(orthanc.port, files, aet=orthanc.aet)
        assert sent.returncode == 0, sent.stderr

        def settings(retrieve: str) -> Settings:
            return load_settings(None, **{
                **base, "dicom": {**base["dicom"], "port": port},
                "sources": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                             "port": orthanc.port, "retrieve": retrieve,
                             "max_associations": 2}],
                "destinations": [{"name": "orthanc", "ae_title": orthanc.aet,
                                  "host": "127.0.0.1", "port": orthanc.port}],
                "routes": [{"name": "chest", "match": {"Modality": "CR"},
                            "model": "chest-nodule", "destinations": ["orthanc"]}],
            })

        service = Service(settings("move"))
        service.start()
        try:
            yield {"orthanc": orthanc, "settings": settings, "db_url": db_url,
                   "headers": study_headers(archive_studies)}
        finally:
            service.stop()


def orthanc_srs(orthanc: Orthanc) -> set[str]:
    """StudyInstanceUIDs of the SRs Orthanc holds."""
    found = set()
    for instance in orthanc.rest("/instances?expand"):
        tags = orthanc.rest(f"/instances/{instance['ID']}/simplified-tags")
        if tags.get("SOPClassUID") == SR_CLASS:
            found.add(tags["StudyInstanceUID"])
    return found


@sqlite_only
def test_batch_by_accessions_with_move_and_by_date_with_get_returns_srs_to_orthanc(
    loop: dict[str, Any], tmp_path: Path
) -> None:
    orthanc, headers = loop["orthanc"], loop["headers"]
    db = Database(loop["db_url"])
    # By accession list, C-MOVE into the running service.
    csv_path = tmp_path / "accessions.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["AccessionNumber"])
        writer.writerows([[str(h.AccessionNumber)] for h in headers[:2]])
    mover = BatchRunner(loop["settings"]("move"), db, "orthanc")
    from dicom_ai.batch.run import read_accessions

    moved = mover.create(BatchQuery(accessions=read_accessions(csv_path)))
    counts = mover.run(moved, timeout=120)
    assert (counts.found, counts.retrieved, counts.processed, counts.failed) == (2, 2, 2, 0)
    # By study-date range, C-GET on the same association (received in this process).
    dates = sorted(str(h.StudyDate) for h in headers[2:])
    getter = BatchRunner(loop["settings"]("get"), db, "orthanc")
    got = getter.create(BatchQuery(study_date=f"{dates[0]}-{dates[-1]}"))
    counts = getter.run(got, timeout=120)
    expected = {str(h.StudyInstanceUID) for h in headers
                if dates[0] <= str(h.StudyDate) <= dates[-1]}
    assert counts.found == len(expected)
    assert counts.processed == counts.found
    assert counts.failed == 0
    wanted = {str(h.StudyInstanceUID) for h in headers[:2]} | expected
    wait_until(lambda: orthanc_srs(orthanc) >= wanted, 60, "the SRs back in Orthanc")

    rows = report_rows(db, moved)
    assert [r["retrieve"] for r in rows] == ["retrieved", "retrieved"]
    assert all(r["sr_delivered"] == 1 and r["processed"] == "yes" for r in rows)
    assert all(r["retrieved_instances"] == 1 for r in rows)
    html = write_report(rows, tmp_path / "report.html").read_text()
    assert str(headers[0].StudyInstanceUID) in html
    db.dispose()


@sqlite_only
def test_interrupted_batch_resumes_without_fetching_again(loop: dict[str, Any]) -> None:
    db = Database(loop["db_url"])
    runner = BatchRunner(loop["settings"]("move"), db, "orthanc")
    batch_id = runner.create(BatchQuery(study_date="19000101-29991231"))
    stop = threading.Event()

    def interrupt(counts: Counts) -> None:
        if counts.retrieved >= 1:
            stop.set()  # Ctrl-C after the first study

    first = runner.run(batch_id, progress=interrupt, stop=stop)
    assert first.found == 4
    assert 1 <= first.retrieved < 4
    with db.sessions() as session:
        assert batches.get_batch(session, batch_id).state == "interrupted"  # type: ignore[union-attr]
        done_before = {r.study_instance_uid for r in batches.studies(session, batch_id)
                       if r.state == batches.RETRIEVED}
    resumed = BatchRunner(loop["settings"]("move"), db, "orthanc").run(batch_id, timeout=120)
    assert (resumed.found, resumed.retrieved, resumed.failed) == (4, 4, 0)
    assert resumed.processed == 4
    with db.sessions() as session:
        rows = batches.studies(session, batch_id)
    assert all(r.attempts == 1 for r in rows), "no study was fetched twice"
    assert {r.study_instance_uid for r in rows} >= done_before
    db.dispose()


def _values(ds: Any) -> Iterator[str]:
    """Every element value of a dataset as text, recursively (file meta included)."""
    meta = getattr(ds, "file_meta", None)
    for elem in [*(meta or []), *ds]:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _values(item)
        elif elem.tag != 0x7FE00010:  # pixel data
            yield str(elem.value)


@sqlite_only
def test_export_is_deidentified_keeps_no_identifier_and_trains(
    loop: dict[str, Any], tmp_path: Path, archive_studies: Path
) -> None:
    from dicom_ai.batch.export import export_training_set
    from dicom_ai.inference.runtime import load_predictor
    from dicom_ai.training.train import TrainOptions, train
    from storage import jobs
    from storage.filestore import FileStore

    db = Database(loop["db_url"])
    settings = loop["settings"]("get")
    runner = BatchRunner(settings, db, "orthanc")
    batch_id = runner.create(BatchQuery(study_date="19000101-29991231"), kind="export")
    counts = runner.run(batch_id, wait_processing=False)
    assert (counts.found, counts.retrieved, counts.failed) == (4, 4, 0)
    truth: dict[str, str] = {}
    with (archive_studies / "labels.csv").open() as fh:
        for row in csv.DictReader(fh):
            truth[row["StudyInstanceUID"]] = row["label"]
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["AccessionNumber", "label"])
        writer.writerows([[str(h.AccessionNumber), truth[str(h.StudyInstanceUID)]]
                          for h in loop["headers"]])
    out, mapping = tmp_path / "export", tmp_path / "export.reidentify.json"
    report = export_training_set(db, FileStore(settings.storage.root), batch_id, labels, out,
                                 mapping)
    assert (report.studies, report.instances, report.unlabelled_studies) == (4, 4, 0)
    assert mapping.is_file()
    assert not any(p.name.endswith(".json") and "reidentify" in p.name for p in out.rglob("*"))

    identifiers: set[str] = set()
    for h in loop["headers"]:
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyID",
                        "StudyDate", "ReferringPhysicianName", "InstitutionName"):
            value = str(h.get(keyword, "") or "")
            if len(value) >= 4:
                identifiers.add(value)
    exported = sorted(out.rglob("*.dcm"))
    assert len(exported) == 4
    for path in exported:
        ds = dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        leaked = {v for text in _values(ds) for v in identifiers if v in text}
        assert not leaked, f"{path.name} keeps original identifiers {leaked}"
    # Studies retrieved for an export are never routed to a model.
    def decided() -> list[Any]:
        with db.sessions() as session:
            found = [jobs.decisions_of_study(session, str(h.StudyInstanceUID))
                     for h in loop["headers"]]
        return found if all(found) else []

    for decisions in wait_until(decided, 30, "the studies to complete and be recorded"):
        assert all(d.route is None and "export" in d.reason for d in decisions)
    with db.sessions() as session:
        assert jobs.list_jobs(session) == []
    # `dicom-ai train` reads the export directly.
    result = train(TrainOptions(data=out, labels=out / "labels.csv", arch="seed-cnn",
                                out=tmp_path / "model", epochs=1, input_size=64,
                                val_fraction=0.25, seed=1))
    predictor = load_predictor(tmp_path / "model")
    assert result.spec.name
    assert predictor.spec.input_shape[:2] == (64, 64)
    db.dispose()


@sqlite_only
def test_truncated_answers_are_split_by_date_and_present_studies_not_fetched(
    tmp_path: Path, db_url: str, archive_studies: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An archive that answers at most 2 matches per C-FIND (Orthanc LimitFindResults, which
    ends the answer with 0xFE00): the date range is halved until every study is found;
    studies the store already holds are not fetched again."""
    need_binary("Orthanc")
    headers = study_headers(archive_studies)
    files = sorted(p for p in archive_studies.rglob("*.dcm") if "masks" not in p.parts)
    with Orthanc(tmp_path / "orthanc", modalities={"me": ("DICOM_AI", "127.0.0.1", 1)},
                 extra={"LimitFindResults": 2}) as orthanc:
        assert storescu(orthanc.port, files, aet=orthanc.aet).returncode == 0
        settings = load_settings(
            None, storage={"root": tmp_path / "store", "database_url": db_url,
                           "min_free_bytes": 0},
            sources=[{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                      "port": orthanc.port, "retrieve": "get", "max_query_results": 2}])
        db = Database(db_url)
        db.upgrade()
        runner = BatchRunner(settings, db, "orthanc")
        assert len(runner.find(BatchQuery(study_date="19000101-29991231"))) == 4
        # Orthanc ends a query with more matches than its limit with 0xFE00 after 2 answers.
        from dicom_ai.batch.run import _identifier
        from dicom_ai.network.qr_scu import find

        raw = find(runner.peer, settings.dicom,
                   _identifier(BatchQuery(), study_date="19000101-29991231"))
        assert raw.truncated
        assert len(raw.matches) == 2

        first = runner.create(BatchQuery(accessions=(str(headers[0].AccessionNumber),)),
                              kind="export")
        assert runner.run(first, wait_processing=False).retrieved == 1
        caplog.set_level("INFO", logger="dicom_ai.batch.run")
        again = runner.create(BatchQuery(study_date="19000101-29991231"), kind="export")
        counts = runner.run(again, wait_processing=False)
        assert (counts.found, counts.retrieved, counts.failed) == (4, 4, 0)
        skipped = [r for r in caplog.records if "already in the store" in r.getMessage()]
        assert len(skipped) == 1
        assert str(headers[0].StudyInstanceUID) in skipped[0].getMessage()
        db.dispose()


@sqlite_only
def test_retrieve_whose_sub_operations_fail_is_recorded_and_resumable(
    tmp_path: Path, db_url: str, archive_studies: Path
) -> None:
    """Our receiver refuses every instance (no free space): Orthanc's C-MOVE fails, the study
    is recorded as failed with the archive's status, and a later resume retrieves it once
    space is back."""
    need_binary("Orthanc")
    files = sorted(p for p in archive_studies.rglob("*.dcm") if "masks" not in p.parts)[:1]
    uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    base: dict[str, Any] = {
        "dicom": {"host": "127.0.0.1", "port": 0, "receivers": 1},
        "storage": {"root": tmp_path / "store", "database_url": db_url,
                    "min_free_bytes": 1 << 62},  # more than any disk: every C-STORE refused
        "api": {"enabled": False},
    }
    full = Service(load_settings(None, **base))
    full.start()
    assert full.address is not None
    port = full.address[1]
    try:
        with Orthanc(tmp_path / "orthanc",
                     modalities={"me": ("DICOM_AI", "127.0.0.1", port)}) as orthanc:
            assert storescu(orthanc.port, files, aet=orthanc.aet).returncode == 0
            source = [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                       "port": orthanc.port}]
            settings = load_settings(None, **{**base, "dicom": {**base["dicom"], "port": port},
                                              "sources": source})
            db = Database(db_url)
            runner = BatchRunner(settings, db, "orthanc")
            batch_id = runner.create(BatchQuery(study_date="19000101-29991231"), kind="export")
            counts = runner.run(batch_id, wait_processing=False)
            assert (counts.found, counts.retrieved, counts.failed) == (1, 0, 1)
            with db.sessions() as session:
                [row] = batches.studies(session, batch_id)
            assert row.study_instance_uid == uid
            assert row.state == batches.RETRIEVE_FAILED
            assert row.error is not None
            # Orthanc (1.10) ends such a C-MOVE with 0xC000 and no sub-operation counts.
            assert row.error.startswith("retrieve status 0x")
            full.stop()
            ok = Service(load_settings(None, **{**base, "dicom": {**base["dicom"], "port": port},
                                                "storage": {**base["storage"],
                                                            "min_free_bytes": 0}}))
            ok.start()
            try:
                resumed = BatchRunner(settings, db, "orthanc").run(batch_id,
                                                                   wait_processing=False)
            finally:
                ok.stop()
            assert (resumed.retrieved, resumed.failed) == (1, 0)
            db.dispose()
    finally:
        full.stop()


@sqlite_only
def test_cancelled_batch_stops_stays_cancelled_and_cannot_resume(loop: dict[str, Any]) -> None:
    from datetime import UTC, datetime

    from dicom_ai.exceptions import ConfigError

    db = Database(loop["db_url"])
    settings = loop["settings"]("move")
    runner = BatchRunner(settings, db, "orthanc")
    batch_id = runner.create(BatchQuery(study_date="19000101-29991231"))

    def cancel_after_first(counts: Counts) -> None:
        if counts.retrieved >= 1:  # what POST /api/batches/{id}/cancel does
            with db.write_session() as session:
                batches.set_state(session, batch_id, batches.CANCELLED, datetime.now(UTC))

    counts = runner.run(batch_id, progress=cancel_after_first)
    assert counts.found == 4
    assert 1 <= counts.retrieved < 4, "retrievals stopped after the cancel"
    with db.sessions() as session:
        assert batches.get_batch(session, batch_id).state == "cancelled"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="cancelled"):
        BatchRunner(settings, db, "orthanc").run(batch_id)
    db.dispose()


def _delete_study(orthanc: Orthanc, study_instance_uid: str) -> None:
    """Remove a study from Orthanc (REST), as an archive's retention or an operator would."""
    for study in orthanc.rest("/studies?expand"):
        if study["MainDicomTags"].get("StudyInstanceUID") == study_instance_uid:
            request = urllib.request.Request(
                f"http://127.0.0.1:{orthanc.http_port}/studies/{study['ID']}", method="DELETE")
            with urllib.request.urlopen(request, timeout=30):
                return
    raise AssertionError("study not in Orthanc")


def test_get_with_studies_in_flight_stores_each_instance_once_and_survives_a_failed_study(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six studies, three C-GET associations at once, in a process with no receiver of its
    own (a plain ``dicom-ai batch``): every instance of the five studies the archive still
    holds is stored and indexed once, the study it lost meanwhile fails alone, and the
    progress counts follow. One study holds two SOP classes (CT and MR): both are proposed
    from the C-FIND's SOPClassesInStudy."""
    need_binary("Orthanc")
    need_binary("storescu")
    from pynetdicom import _config

    from dicom_ai.network.qr_scu import get_classes
    from tests.peers import make_ct_series, sample_file

    files: list[Path] = []
    uids: list[str] = []
    for i in range(6):
        series = make_ct_series(tmp_path / "data" / f"s{i}", 5, size=64, seed=i)
        files += series
        uids.append(str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID))
    mr = dcmread(sample_file("MR_small.dcm"))
    ct = dcmread(files[0], stop_before_pixels=True)
    mr.PatientID, mr.PatientName = ct.PatientID, ct.PatientName  # Orthanc keys on both
    mr.StudyInstanceUID, mr.SeriesInstanceUID = uids[0], generate_uid()
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mr.save_as(tmp_path / "data" / "mr.dcm")
    files.append(tmp_path / "data" / "mr.dcm")
    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    with Orthanc(tmp_path / "orthanc", modalities={"me": ("DICOM_AI", "127.0.0.1", 1)}) as orthanc:
        assert storescu(orthanc.port, files, aet=orthanc.aet).returncode == 0
        settings = load_settings(
            None, storage={"root": tmp_path / "store", "database_url": db_url,
                           "min_free_bytes": 0},
            sources=[{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                      "port": orthanc.port, "retrieve": "get", "max_associations": 3}])
        db = Database(db_url)
        db.upgrade()
        runner = BatchRunner(settings, db, "orthanc")
        batch_id = runner.create(BatchQuery(study_date="19000101-29991231"), kind="export")
        found = runner.find(BatchQuery(study_date="19000101-29991231"))
        assert {s.study_instance_uid for s in found} == set(uids)
        from datetime import UTC, datetime

        with db.write_session() as session:
            batches.add_found(session, batch_id, found)
            batches.set_state(session, batch_id, "retrieving", datetime.now(UTC), found=True)
        # What the C-GETs propose: the classes each study holds (127 when unknown).
        mixed = runner._study_classes(uids[0])
        assert mixed is not None
        assert sorted(get_classes(mixed)) == sorted([str(mr.SOPClassUID), CT_CLASS])
        assert get_classes(runner._study_classes(uids[1])) == [CT_CLASS]
        assert len(get_classes(None)) == 127
        # A resumed batch (a new runner, no C-FIND of its own) asks the archive per study.
        assert BatchRunner(settings, db, "orthanc")._study_classes(uids[1]) == (CT_CLASS,)
        # The archive loses one study after the C-FIND.
        gone = uids[3]
        _delete_study(orthanc, gone)
        expected -= {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                     for p in (tmp_path / "data" / "s3").iterdir()}
        # A fresh `dicom-ai batch` process: no receiver has switched chunked receive on.
        monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
        caplog.set_level("DEBUG", logger="dicom_ai.ingest.spool")
        reported: list[Counts] = []
        counts = runner.run(batch_id, progress=reported.append, wait_processing=False)
        assert (counts.found, counts.retrieved, counts.processed, counts.failed) == (6, 5, 5, 1)

        with db.sessions() as session:
            rows = {r.study_instance_uid: r for r in batches.studies(session, batch_id)}
            indexed = list(session.scalars(select(Instance.sop_instance_uid)))
        assert sorted(indexed) == sorted(expected), "every instance indexed, and once"
        stored = sorted(p for p in (tmp_path / "store").rglob("*.dcm")
                        if "incoming" not in p.parts)
        assert len(stored) == len(expected)
        assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in stored} \
            == expected
        assert rows[gone].state == batches.RETRIEVE_FAILED
        assert (rows[gone].error or "").startswith("retrieve status")
        assert rows[uids[0]].retrieved_instances == 6
        assert all(rows[u].retrieved_instances == 5 and rows[u].failed_suboperations == 0
                   for u in uids[1:] if u != gone)
        assert all(r.attempts == 1 for r in rows.values())
        # Progress: found from the start, done never going back, every study reported.
        assert all(c.found == 6 for c in reported)
        done = [c.retrieved + c.failed for c in reported]
        assert done == sorted(done)
        assert (reported[-1].retrieved, reported[-1].failed) == (5, 1)
        # The studies were in flight together: instances stored by different batch threads
        # at overlapping times.
        spans: dict[str, list[float]] = {}
        for record in caplog.records:
            if record.getMessage().startswith("stored "):
                spans.setdefault(str(record.threadName), []).append(record.created)
        assert len(spans) >= 2
        (a_first, a_last), (b_first, b_last) = [(min(t), max(t)) for t in
                                                list(spans.values())[:2]]
        assert a_first < b_last, "two studies retrieved at once"
        assert b_first < a_last, "two studies retrieved at once"
        db.dispose()


# Tuned only in a tuned run: get_study would install the tuning for the whole process.
@pytest.mark.parametrize("tune", [
    pytest.param(True, marks=needs_tuning("answering on the reading thread"), id="tuned"),
    pytest.param(False, id="untuned")])
def test_get_answers_each_store_once_durable_and_outlasts_the_dimse_timeout(
    tmp_path: Path, db_url: str, tune: bool
) -> None:
    """A C-GET whose instances take longer to store, in all, than the DIMSE timeout: every
    instance is answered only once stored and indexed, the retrieval succeeds (the timeout
    counts from the last instance answered, not from the C-GET request), and with the tuning
    the instances are answered on the association's reading thread, without a hand-off to the
    caller's thread and back (tuning.handle_stores_in_reader); without it, on the caller's."""
    need_binary("Orthanc")
    need_binary("storescu")
    from pynetdicom.dul import DULServiceProvider

    from dicom_ai.ingest.spool import Ingestor, Received
    from dicom_ai.network.qr_scu import get_study
    from dicom_ai.network.scu import Peer
    from tests.peers import make_ct_series

    files = make_ct_series(tmp_path / "data", 4, size=64, seed=7)
    uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}

    class SlowDisk(Ingestor):
        """A real ingestor on a disk that takes 0.3 s per instance."""

        threads: list[threading.Thread] = []

        def ingest(self, received: Received) -> int:
            self.threads.append(threading.current_thread())
            time.sleep(0.3)
            status = super().ingest(received)
            # Answered only once durable and indexed: the file is in place by now.
            assert status != 0 or not received.path.exists()
            return status

    with Orthanc(tmp_path / "orthanc", modalities={"me": ("DICOM_AI", "127.0.0.1", 1)}) as orthanc:
        assert storescu(orthanc.port, files, aet=orthanc.aet).returncode == 0
        settings = load_settings(
            None, dicom={"dimse_timeout": 0.6, "tune_network": tune},
            storage={"root": tmp_path / "store", "database_url": db_url, "min_free_bytes": 0})
        db = Database(db_url)
        db.upgrade()
        ingestor = SlowDisk(settings.storage.file_store(role="batch"), db, settings.storage,
                            settings.limits)
        started = time.monotonic()
        result = get_study(Peer(orthanc.aet, "127.0.0.1", orthanc.port), settings.dicom, uid,
                           ingestor, [CT_CLASS])
        assert time.monotonic() - started > 4 * 0.3 > settings.dicom.dimse_timeout
        assert (result.ok, result.completed, result.failed) == (True, 4, 0)
        with db.sessions() as session:
            indexed = list(session.scalars(select(Instance.sop_instance_uid)))
        assert sorted(indexed) == sorted(expected)
        db.dispose()
    assert len(ingestor.threads) == 4
    if tune:
        assert all(isinstance(t, DULServiceProvider) for t in ingestor.threads)
    else:
        assert all(t is threading.current_thread() for t in ingestor.threads)
