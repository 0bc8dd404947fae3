"""PS3.15 Annex E Basic Profile de-identification on real files: nothing identifying survives."""

from __future__ import annotations

import copy
import datetime as dt
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.batch.deidentify import DeidentificationRefused, Deidentifier, burned_in_risk
from dicom_ai.batch.profile_basic import BASIC_PROFILE, action_for_tag
from dicom_ai.training.synth import synthesize
from tests.conftest import need_binary

SALT = b"test-salt-0123456789abcdef"
#: pydicom test files: private tags (CT_small, examples_overlay), overlays (examples_overlay),
#: SR with a deep content tree (test-SR), SEG with references (liver_1frame), RT (rtplan).
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "test-SR.dcm",
                 "liver_1frame.dcm", "rtplan.dcm")
#: Identifying attributes whose original values must not appear anywhere in the output.
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
               "InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber",
               "StudyID", "OtherPatientIDs", "InstitutionalDepartmentName")
#: UIDs of classes, syntaxes and schemes: not identifying, legitimately kept.
CLASS_UIDS = {"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID",
              "TransferSyntaxUID", "ImplementationClassUID", "CodingSchemeUID",
              "ReferencedSOPClassUIDInFile"}
CODE_VERSION_DATES = {"ContextGroupVersion", "ContextGroupLocalVersion"}


def _testfile(name: str) -> Path:
    return Path(str(get_testdata_file(name)))


def _walk(ds: Dataset) -> Iterator[DataElement]:
    """Every element of ``ds``, its file meta and, recursively, its sequences' items."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from meta
    yield from _walk_items(ds)


def _walk_items(ds: Dataset) -> Iterator[DataElement]:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk_items(item)


def _strings(elem: DataElement) -> list[str]:
    if elem.value is None or isinstance(elem.value, bytes | Dataset) or elem.VR == "SQ":
        return []
    values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) \
        else [elem.value]
    return [str(v).strip() for v in values if str(v).strip()]


def _identifying_values(ds: Dataset) -> tuple[set[str], set[str]]:
    """(values of identifying attributes, values of attributes the profile keeps).

    A value in both is no leak (the synthetic Station Name "SYNTH" is also its Window
    Explanation; MR_small's Institution Name "TOSHIBA" is in its Manufacturer).
    """
    found: set[str] = set()
    benign: set[str] = set()
    for elem in _walk(ds):
        if elem.keyword in IDENTIFYING or elem.VR == "PN":
            found.update(_strings(elem))
        elif action_for_tag(int(elem.tag)) is None and not elem.tag.is_private:
            benign.update(_strings(elem))
    return found - benign, benign


def _original_uids(ds: Dataset) -> set[str]:
    return {v for elem in _walk(ds) if elem.VR == "UI" and elem.keyword not in CLASS_UIDS
            for v in _strings(elem) if not v.startswith("1.2.840.10008.")}


def _dates(ds: Dataset) -> set[str]:
    """Every DA value and DT date part (the patient's calendar) in ``ds``."""
    return {v[:8] for elem in _walk(ds) if elem.VR in ("DA", "DT")
            and elem.keyword not in CODE_VERSION_DATES for v in _strings(elem) if len(v) >= 8}


def _dciodvfy_errors(path: Path) -> int:
    result = subprocess.run([need_binary("dciodvfy"), str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    return sum(1 for line in (result.stdout + result.stderr).splitlines()
               if line.startswith("Error"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Synthetic CR (2 studies) and CT (3 slices of one study) plus pydicom's test files."""
    root = tmp_path_factory.mktemp("synth")
    synthesize(root / "cr", studies=2, seed=11, modality="CR")
    synthesize(root / "ct", studies=1, seed=11, modality="CT")
    files = sorted((root / "cr").rglob("*.dcm")) + sorted((root / "ct").rglob("*.dcm"))[:3]
    files += [_testfile(name) for name in PYDICOM_FILES]
    return files


@pytest.fixture(scope="module")
def exported(inputs: list[Path], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Deidentifier, list[tuple[Path, Dataset, Path]]]:
    """One export: (input path, input dataset, output path) per file, one Deidentifier."""
    out_dir = tmp_path_factory.mktemp("export")
    deid = Deidentifier(salt=SALT)
    results: list[tuple[Path, Dataset, Path]] = []
    for index, path in enumerate(inputs):
        ds = pydicom.dcmread(path)
        out = deid.deidentify(ds)
        target = out_dir / f"{index:02d}.dcm"
        out.save_as(target, enforce_file_format=True)
        results.append((path, ds, target))
    return deid, results


def test_table_covers_basic_profile() -> None:
    assert len(BASIC_PROFILE) >= 450
    assert set(BASIC_PROFILE.values()) <= {"X", "Z", "D", "U", "X/Z", "X/D", "Z/D", "X/Z/D",
                                           "X/Z/U*"}
    assert action_for_tag(0x00100010) == "Z"  # Patient's Name
    assert action_for_tag(0x00080080) == "D"  # Institution Name, X/Z/D
    assert action_for_tag(0x00081140) == "U"  # Referenced Image Sequence, X/Z/U*
    assert action_for_tag(0x60023000) == "X"  # Overlay Data, group 6002
    assert action_for_tag(0x60020010) == "X"  # Overlay Rows: the whole overlay goes
    assert action_for_tag(0x00280030) is None  # Pixel Spacing: no row, kept


def test_no_identifying_value_survives(
        exported: tuple[Deidentifier, list[tuple[Path, Dataset, Path]]]) -> None:
    _, results = exported
    for path, original, target in results:
        out = pydicom.dcmread(target)
        identifying, benign = _identifying_values(original)
        uids = _original_uids(original)
        dates = _dates(original)
        raw = target.read_bytes()
        for elem in _walk(out):
            assert not elem.tag.is_private, (path.name, elem.tag)
            assert not 0x6000 <= elem.tag.group <= 0x601E, (path.name, elem.tag)
            values = set(_strings(elem))
            assert not values & identifying, (path.name, elem.keyword)
            if elem.VR == "UI":
                assert not values & uids, (path.name, elem.keyword)
            if elem.VR in ("DA", "DT") and elem.keyword not in CODE_VERSION_DATES:
                assert not {v[:8] for v in values} & dates, (path.name, elem.keyword)
        for value in identifying:
            if len(value) >= 5 and not any(value in kept for kept in benign):
                assert value.encode() not in raw, path.name
        assert out.PatientIdentityRemoved == "YES"
        assert out.LongitudinalTemporalInformationModified == "MODIFIED"
        codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
        assert {"113100", "113107"} <= codes
        assert "113108" not in codes
        assert str(out.PatientName) == out.PatientID
        assert out.PatientID.startswith("ANON-")
        assert len(out.PatientID) == 15
        assert out.get("PatientBirthDate", "") == ""
        assert "PatientAge" not in out


def test_model_inputs_kept_and_pixels_identical(
        exported: tuple[Deidentifier, list[tuple[Path, Dataset, Path]]]) -> None:
    _, results = exported
    kept = ("Modality", "BodyPartExamined", "PhotometricInterpretation", "PixelSpacing",
            "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope",
            "RescaleIntercept", "WindowCenter", "WindowWidth", "Rows", "Columns",
            "BitsStored", "PixelRepresentation", "SOPClassUID", "Manufacturer")
    for path, original, target in results:
        out = pydicom.dcmread(target)
        for keyword in kept:
            assert out.get(keyword) == original.get(keyword), (path.name, keyword)
        assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        if "PixelData" in original:
            assert out.PixelData == original.PixelData, path.name
            np.testing.assert_array_equal(out.pixel_array, original.pixel_array)


def test_input_untouched() -> None:
    path = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    before = copy.deepcopy(ds)
    Deidentifier(salt=SALT).deidentify(ds)
    assert ds == before
    assert ds.file_meta == before.file_meta


def test_uids_consistent_within_export_and_salted(
        exported: tuple[Deidentifier, list[tuple[Path, Dataset, Path]]]) -> None:
    deid, results = exported
    ct = [(orig, pydicom.dcmread(target)) for path, orig, target in results
          if path.parent.parent.parent.name == "ct"]
    assert len(ct) == 3
    studies = {str(out.StudyInstanceUID) for _, out in ct}
    series = {str(out.SeriesInstanceUID) for _, out in ct}
    frames = {str(out.FrameOfReferenceUID) for _, out in ct}
    assert len(studies) == len(series) == len(frames) == 1
    assert len({str(out.SOPInstanceUID) for _, out in ct}) == 3
    original, out = ct[0]
    assert deid.map_uid(original.StudyInstanceUID) == out.StudyInstanceUID
    assert deid.mapping["uids"][original.SOPInstanceUID] == out.SOPInstanceUID
    assert out.StudyInstanceUID.startswith("2.25.")
    assert len(out.StudyInstanceUID) <= 64
    assert pydicom.uid.UID(out.StudyInstanceUID).is_valid
    other = Deidentifier(salt=b"another-salt-0123456789")
    assert other.map_uid(original.StudyInstanceUID) != out.StudyInstanceUID
    assert other.pseudonym(original.PatientID) != out.PatientID
    # References inside sequences follow the instances they point to (SEG -> source images).
    seg_path, seg, seg_target = next(r for r in results if r[0].name == "liver_1frame.dcm")
    seg_out = pydicom.dcmread(seg_target)
    before = {e.value for e in _walk_items(seg) if e.keyword == "ReferencedSOPInstanceUID"}
    after = {e.value for e in _walk_items(seg_out) if e.keyword == "ReferencedSOPInstanceUID"}
    assert before, seg_path.name
    assert {deid.map_uid(uid) for uid in before} == after, seg_path.name


def test_dates_shifted_per_patient_intervals_kept() -> None:
    path = _testfile("CT_small.dcm")
    first = pydicom.dcmread(path)
    later = pydicom.dcmread(path)
    later.StudyInstanceUID = generate_uid()
    day = dt.datetime.strptime(first.StudyDate, "%Y%m%d").date()
    later.StudyDate = (day + dt.timedelta(days=40)).strftime("%Y%m%d")
    deid = Deidentifier(salt=SALT, max_shift_days=30)
    shift = deid.date_shift_days(first.PatientID)
    assert -30 <= shift <= -1
    assert deid.date_shift_days(first.PatientID) == shift
    out1, out2 = deid.deidentify(first), deid.deidentify(later)
    got1 = dt.datetime.strptime(out1.StudyDate, "%Y%m%d").date()
    got2 = dt.datetime.strptime(out2.StudyDate, "%Y%m%d").date()
    assert (got2 - got1).days == 40
    assert (got1 - day).days == shift
    assert out1.PatientID == out2.PatientID
    assert out1.StudyInstanceUID != out2.StudyInstanceUID
    assert out1.StudyTime == first.StudyTime  # times are kept
    entry = deid.mapping["patients"][out1.PatientID]
    assert entry == {"patient_id": first.PatientID, "issuer": "", "date_shift_days": shift}
    assert "salt" not in repr(deid)
    assert first.PatientID not in repr(deid)


def test_sr_content_cleaned_structure_kept(
        exported: tuple[Deidentifier, list[tuple[Path, Dataset, Path]]]) -> None:
    _, results = exported
    _, original, target = next(r for r in results if r[0].name == "test-SR.dcm")
    out = pydicom.dcmread(target)
    texts = {v for e in _walk_items(out) if e.keyword == "TextValue" for v in _strings(e)}
    assert texts == {"ANONYMIZED"}
    def meanings(ds: Dataset) -> list[str]:
        return [e.value for item in ds.ContentSequence for e in _walk_items(item)
                if e.keyword == "CodeMeaning"]

    assert meanings(out) == meanings(original)
    assert str(out.VerifyingObserverSequence[0].VerifyingObserverName) == "ANONYMOUS"


def test_output_passes_dciodvfy_no_new_errors(
        exported: tuple[Deidentifier, list[tuple[Path, Dataset, Path]]]) -> None:
    _, results = exported
    for path, _, target in results:
        assert _dciodvfy_errors(target) <= _dciodvfy_errors(path), path.name


def test_burned_in_annotation_refused() -> None:
    deid = Deidentifier(salt=SALT)
    ct = pydicom.dcmread(_testfile("CT_small.dcm"))
    assert burned_in_risk(ct) is None
    ct.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationRefused, match="Burned In Annotation"):
        deid.deidentify(ct)
    assert deid.mapping["uids"] == {}
    us = pydicom.dcmread(_testfile("US1_UNCR.dcm"))
    assert "BurnedInAnnotation" not in us
    with pytest.raises(DeidentificationRefused, match="Ultrasound"):
        deid.deidentify(us)
    us.BurnedInAnnotation = "NO"
    assert burned_in_risk(us) is None
    sc = pydicom.dcmread(_testfile("SC_rgb.dcm"))
    with pytest.raises(DeidentificationRefused, match="Secondary Capture"):
        deid.deidentify(sc)
    mr = pydicom.dcmread(_testfile("MR_small.dcm"))
    mr.RecognizableVisualFeatures = "YES"
    assert burned_in_risk(mr) == "Recognizable Visual Features (0028,0302) is YES"
    assert keyword_for_tag(0x00280301) == "BurnedInAnnotation"


def test_rows_of_the_generated_edition_applied() -> None:
    """Rows of the 2026c table that the hand-transcribed one lacked or had otherwise."""
    ds = pydicom.dcmread(_testfile("waveform_ecg.dcm"))
    ds.RetrieveAETitle = "ARCHIVE_7"  # (0008,0054) X
    ds.StationAETitle = "ECG_ROOM_3"  # (0008,0055) X
    beam = Dataset()
    beam.TreatmentMachineName = "LINAC 3"  # (300A,00B2) X/Z: Type 2 in RT Beams
    ds.BeamSequence = [beam]
    labels = {item.MultiplexGroupLabel for item in ds.WaveformSequence}
    assert labels == {"RHYTHM", "MEDIAN BEAT"}
    out = Deidentifier(salt=SALT).deidentify(ds)
    assert "RetrieveAETitle" not in out
    assert "StationAETitle" not in out
    assert out.BeamSequence[0].TreatmentMachineName == ""
    # Multiplex Group Label (003A,0020) X; Unformatted Text Value (0070,0006) D.
    assert all("MultiplexGroupLabel" not in item for item in out.WaveformSequence)
    texts = {str(item.UnformattedTextValue) for item in out.WaveformAnnotationSequence
             if "UnformattedTextValue" in item}
    assert texts == {"ANONYMIZED"}
    codes = [item.ConceptNameCodeSequence[0].CodeValue for item in out.WaveformAnnotationSequence
             if "ConceptNameCodeSequence" in item]
    assert codes == [item.ConceptNameCodeSequence[0].CodeValue
                     for item in ds.WaveformAnnotationSequence if "ConceptNameCodeSequence" in item]
