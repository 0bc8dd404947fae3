"""Our Query/Retrieve SCP (PS3.4 annex C) against dcmtk findscu, movescu, getscu and storescp.

A service receives a CT study (with one SR result of ours) and a CR study, then answers C-FIND in
both information models at every level, C-MOVE to a configured storescp and C-GET.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicom_ai.config import Destination, Settings
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import jobs
from storage.db import Database
from tests.conftest import need_binary
from tests.peers import ENV, StoreSCP, make_ct_series, storescu

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Stored:
    """What the service holds for a test."""

    service: Service
    port: int
    ct_study: str
    ct_series: str
    ct_files: list[Path]
    cr_study: str
    sr_series: str
    sr_sop: str
    sr_file: Path


def _retag(path: Path, **values: str) -> None:
    ds = dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _sr(study: Dataset, out: Path, description: str = "AI findings") -> Dataset:
    """A tiny Comprehensive SR in the study of `study` (header only: enough to store and send)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(COMPREHENSIVE_SR)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                    "ReferringPhysicianName"):
        setattr(ds, keyword, study.get(keyword, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = 901
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "126000", "DCM"
    code.CodeMeaning = "Imaging Measurement Report"
    ds.ConceptNameCodeSequence = [code]
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentSequence = []
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return ds


@pytest.fixture
def viewer(tmp_path: Path) -> Iterator[StoreSCP]:
    """dcmtk storescp, the C-MOVE destination ``STORESCP``."""
    need_binary("storescp")
    with StoreSCP(tmp_path / "viewer") as scp:
        yield scp


# The calling AE titles of the dcmtk tools below: allowed to query and retrieve.
QR_CALLERS = ["FINDSCU", "RETRIEVER"]


@pytest.fixture
def stored(tmp_path: Path, make_settings: Callable[..., Settings],
           start_service: Callable[[Settings], Service], db_url: str,
           viewer: StoreSCP) -> Stored:
    """A service holding a CT study (3 slices + our SR result) and a CR study."""
    settings = make_settings(query_retrieve={"allowed_calling_aets": QR_CALLERS})
    return store_studies(tmp_path, settings, start_service, db_url, viewer)


def store_studies(tmp_path: Path, settings: Settings,
                  start_service: Callable[[Settings], Service], db_url: str,
                  viewer: StoreSCP, *, sr_description: str = "AI findings") -> Stored:
    """Start a service with `settings` (STORESCP added as destination) and fill it.

    The CT study gets an SR result whose SeriesDescription (a header-only key of results,
    matched in Python) is `sr_description`.
    """
    need_binary("storescu")
    ct_files = make_ct_series(tmp_path / "ct", 3, size=64)
    for path in ct_files:
        _retag(path, PatientName="Doe^Jane", PatientID="QR-1", StudyDate="20240105",
               StudyTime="101500", AccessionNumber="ACC-CT")
    cr = synthesize(tmp_path / "cr", studies=1, seed=7, modality="CR", compress=False)
    cr_files = sorted(p for p in cr.out.rglob("*.dcm") if "masks" not in p.parts)
    for path in cr_files:
        _retag(path, StudyDate="20230310")
    # make_settings merges sections only: add the list of destinations to its result.
    settings = settings.model_copy(update={"destinations": [Destination(
        name="viewer", ae_title="STORESCP", host="127.0.0.1", port=viewer.port)]})
    service = start_service(settings)
    assert service.address is not None
    port = service.address[1]
    sent = storescu(port, [*ct_files, *cr_files])
    assert sent.returncode == 0, sent.stderr

    ct = dcmread(ct_files[0])
    relative = f"results/{ct.StudyInstanceUID}/1/sr.dcm"
    sr_file = tmp_path / "store" / relative
    sr = _sr(ct, sr_file, sr_description)
    now = datetime.now(UTC)
    db = Database(db_url)
    try:
        with db.write_session() as session:
            job = jobs.create_job(session, study_instance_uid=ct.StudyInstanceUID,
                                  series_instance_uids=[ct.SeriesInstanceUID], route="qr",
                                  model_name="none", max_attempts=1, event_id=None, now=now)
            assert jobs.claim_job(session, job.id, owner="test", lease_seconds=60, now=now)
            assert jobs.complete_job(
                session, job.id, owner="test", model_version="1", findings=[], timings={},
                now=now, results=[jobs.ResultToStore(
                    kind="sr", sr_kind="comprehensive",
                    study_instance_uid=ct.StudyInstanceUID,
                    series_instance_uid=sr.SeriesInstanceUID,
                    sop_instance_uid=sr.SOPInstanceUID, sop_class_uid=COMPREHENSIVE_SR,
                    path=relative)])
    finally:
        db.dispose()
    return Stored(service, port, ct.StudyInstanceUID, ct.SeriesInstanceUID, ct_files,
                  str(dcmread(cr_files[0]).StudyInstanceUID), sr.SeriesInstanceUID,
                  sr.SOPInstanceUID, sr_file)


def find(port: int, model: str, level: str, keys: Sequence[str], out: Path,
         extra: Sequence[str] = ()) -> tuple[list[Dataset], str]:
    """Run dcmtk findscu (``-S`` study root / ``-P`` patient root); answers and its log."""
    out.mkdir(parents=True)
    args = ["findscu", model, "-aet", "FINDSCU", "-aec", "DICOM_AI", "-X", "-od", str(out),
            "-k", f"QueryRetrieveLevel={level}", *[a for k in keys for a in ("-k", k)],
            *extra, "127.0.0.1", str(port)]
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, check=False,
                            timeout=60)
    answers: list[Dataset] = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return answers, result.stdout + result.stderr


def test_find_study_root_and_patient_root_at_every_level(stored: Stored,
                                                         tmp_path: Path) -> None:
    need_binary("findscu")
    port = stored.port
    runs = iter(range(1000))

    def q(model: str, level: str, *keys: str, extra: Sequence[str] = ()
          ) -> tuple[list[Dataset], str]:
        return find(port, model, level, keys, tmp_path / f"find{next(runs)}", extra)

    # Study root, STUDY level: wildcard on PN, return keys filled, results counted.
    answers, _ = q("-S", "STUDY", "PatientName=DOE*", "StudyInstanceUID", "PatientID",
                   "StudyDate", "AccessionNumber", "ModalitiesInStudy",
                   "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                   "StudyDescription")
    assert len(answers) == 1, "PN matching is case-insensitive"
    study = answers[0]
    assert study.QueryRetrieveLevel == "STUDY"
    assert study.StudyInstanceUID == stored.ct_study
    assert study.PatientID == "QR-1"
    assert study.StudyDate == "20240105"
    assert study.AccessionNumber == "ACC-CT"
    assert set(study.ModalitiesInStudy) == {"CT", "SR"}
    assert int(study.NumberOfStudyRelatedSeries) == 2
    assert int(study.NumberOfStudyRelatedInstances) == 4
    assert "StudyDescription" in study

    answers, _ = q("-S", "STUDY", "PatientName=SYN*", "StudyInstanceUID")
    assert [a.StudyInstanceUID for a in answers] == [stored.cr_study]
    answers, _ = q("-S", "STUDY", "PatientName=Doe^J?ne", "StudyInstanceUID")
    assert [a.StudyInstanceUID for a in answers] == [stored.ct_study]
    answers, _ = q("-S", "STUDY", "AccessionNumber=acc-ct", "StudyInstanceUID")
    assert answers == [], "non-PN matching is case-sensitive"

    # Date ranges and single dates; UID lists; ModalitiesInStudy.
    for value, expected in [("20240101-20240131", [stored.ct_study]),
                            ("-20231231", [stored.cr_study]),
                            ("20230310", [stored.cr_study]),
                            ("20230101-", [stored.cr_study, stored.ct_study]),
                            ("20250101-", [])]:
        answers, _ = q("-S", "STUDY", f"StudyDate={value}", "StudyInstanceUID")
        assert sorted(a.StudyInstanceUID for a in answers) == sorted(expected), value
    answers, _ = q("-S", "STUDY", f"StudyInstanceUID={stored.ct_study}\\{stored.cr_study}")
    assert len(answers) == 2
    answers, _ = q("-S", "STUDY", "ModalitiesInStudy=SR", "StudyInstanceUID")
    assert [a.StudyInstanceUID for a in answers] == [stored.ct_study]

    # SERIES level: the CT series and our SR series (modality and number from its file).
    answers, _ = q("-S", "SERIES", f"StudyInstanceUID={stored.ct_study}", "SeriesInstanceUID",
                   "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances")
    by_modality = {a.Modality: a for a in answers}
    assert set(by_modality) == {"CT", "SR"}
    assert by_modality["SR"].SeriesInstanceUID == stored.sr_series
    assert int(by_modality["SR"].SeriesNumber) == 901
    assert int(by_modality["CT"].NumberOfSeriesRelatedInstances) == 3
    assert all(a.StudyInstanceUID == stored.ct_study for a in answers)
    answers, _ = q("-S", "SERIES", "Modality=SR", "SeriesInstanceUID")
    assert [a.SeriesInstanceUID for a in answers] == [stored.sr_series]
    answers, _ = q("-S", "SERIES", "SeriesNumber=901", "SeriesInstanceUID")
    assert [a.SeriesInstanceUID for a in answers] == [stored.sr_series]

    # IMAGE level: our SR, then the CT instances in order.
    answers, _ = q("-S", "IMAGE", f"SeriesInstanceUID={stored.sr_series}", "SOPInstanceUID",
                   "SOPClassUID", "InstanceNumber")
    assert [(a.SOPInstanceUID, a.SOPClassUID) for a in answers] == [
        (stored.sr_sop, COMPREHENSIVE_SR)]
    answers, _ = q("-S", "IMAGE", f"SeriesInstanceUID={stored.ct_series}", "SOPInstanceUID",
                   "InstanceNumber", "SOPClassUID")
    assert [int(a.InstanceNumber) for a in answers] == [1, 2, 3]
    assert {a.SOPClassUID for a in answers} == {CT_IMAGE}

    # Patient root: PATIENT, STUDY, SERIES levels.
    answers, _ = q("-P", "PATIENT", "PatientID=QR-1", "PatientName",
                   "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances")
    assert len(answers) == 1
    assert str(answers[0].PatientName) == "Doe^Jane"
    assert int(answers[0].NumberOfPatientRelatedStudies) == 1
    assert int(answers[0].NumberOfPatientRelatedInstances) == 4
    answers, _ = q("-P", "STUDY", "PatientID=QR-1", "StudyInstanceUID")
    assert [a.StudyInstanceUID for a in answers] == [stored.ct_study]
    assert answers[0].PatientID == "QR-1"
    answers, _ = q("-P", "SERIES", "PatientID=QR-1", f"StudyInstanceUID={stored.ct_study}",
                   "SeriesInstanceUID", "Modality=SR")
    assert [a.SeriesInstanceUID for a in answers] == [stored.sr_series]

    # Refused identifiers (0xA900).
    answers, log = q("-S", "PATIENT", "PatientID", extra=["-v"])
    assert answers == []
    assert "DataSetDoesNotMatchSOPClass" in log, log
    answers, log = q("-S", "SERIES", "StudyDate=2024-01", extra=["-v"])
    assert answers == []
    assert "DataSetDoesNotMatchSOPClass" in log, log



def _retrieve(tool: str, port: int, keys: Sequence[str], extra: Sequence[str] = ()
              ) -> subprocess.CompletedProcess[str]:
    args = [tool, "-v", "-S", "-aet", "RETRIEVER", "-aec", "DICOM_AI", *extra,
            *[a for k in keys for a in ("-k", k)], "127.0.0.1", str(port)]
    return subprocess.run(args, env=ENV, capture_output=True, text=True, check=False,
                          timeout=60)


def _by_uid(folder: Path) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(dcmread, folder.iterdir())}


def test_move_to_a_configured_destination_and_get_on_the_same_association(
        stored: Stored, viewer: StoreSCP, tmp_path: Path) -> None:
    need_binary("movescu")
    need_binary("getscu")
    originals = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, stored.ct_files)}
    expected = {*originals, stored.sr_sop}

    # C-MOVE the CT study (with our SR) to storescp: every file arrives, pixels unchanged.
    moved = _retrieve("movescu", stored.port,
                      ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={stored.ct_study}"],
                      ["-aem", "STORESCP"])
    assert moved.returncode == 0, moved.stdout + moved.stderr
    received = _by_uid(viewer.folder)
    assert set(received) == expected
    for uid, original in originals.items():
        assert received[uid].PixelData == original.PixelData
    assert received[stored.sr_sop].SeriesInstanceUID == stored.sr_series

    # An AE title that is not a configured destination: 0xA801, nothing sent.
    unknown = _retrieve("movescu", stored.port,
                        ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={stored.cr_study}"],
                        ["-aem", "NOWHERE"])
    log = unknown.stdout + unknown.stderr
    assert "MoveDestinationUnknown" in log or "0xa801" in log.lower(), log
    assert set(_by_uid(viewer.folder)) == expected
    # A retrieve without the unique key of its level: 0xA900.
    bad = _retrieve("movescu", stored.port, ["QueryRetrieveLevel=SERIES"],
                    ["-aem", "STORESCP"])
    assert "DataSetDoesNotMatchSOPClass" in bad.stdout + bad.stderr, bad.stdout + bad.stderr

    # C-GET the same study into a folder, then only the SR series.
    got_dir = tmp_path / "got"
    got_dir.mkdir()
    got = _retrieve("getscu", stored.port,
                    ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={stored.ct_study}"],
                    ["-od", str(got_dir)])
    assert got.returncode == 0, got.stdout + got.stderr
    received = _by_uid(got_dir)
    assert set(received) == expected
    for uid, original in originals.items():
        assert received[uid].PixelData == original.PixelData
    assert received[stored.sr_sop] == dcmread(stored.sr_file)
    sr_dir = tmp_path / "got-sr"
    sr_dir.mkdir()
    got = _retrieve("getscu", stored.port,
                    ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={stored.ct_study}",
                     f"SeriesInstanceUID={stored.sr_series}"], ["-od", str(sr_dir)])
    assert set(_by_uid(sr_dir)) == {stored.sr_sop}, got.stdout + got.stderr
