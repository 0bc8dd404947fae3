"""Result objects (TID 1500 SR, SEG, heat-map SC) built from synthetic sources, checked by dcmtk
and dicom3tools validators and read back with summarize_sr. No mocks: real highdicom objects.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.inference.spec import FINDING_SITE_LUNG, NODULE
from dicom_ai.reporting import (
    PriorReport,
    SRKind,
    build_heatmap_capture,
    build_seg,
    build_sr,
    procedure_reported,
    summarize_sr,
    to_code,
)
from dicom_ai.reporting.capture import colorize
from dicom_ai.reporting.sr import device_observer_uid
from dicom_ai.training.synth import synthesize
from dicom_ai.values import CodedConcept, Finding, HeatMap, Location, ModelRun
from tests.conftest import need_binary

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MODEL, VERSION = "chest-nodule", "1.2.0"
# Instance-creation and content timestamps are the only things allowed to differ between builds.
TIMESTAMPS = frozenset({
    "ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
    "ContributionDateTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture",
    "SeriesDate", "SeriesTime",
})


# --------------------------------------------------------------------------- fixture helper


@dataclass(frozen=True)
class Sources:
    """Synthetic source studies: paths and headers per study (sorted by instance number)."""

    paths: dict[str, list[Path]]

    def headers(self, study: int = 0, *, pixels: bool = False) -> list[Dataset]:
        uid = sorted(self.paths)[study]
        return [dcmread(p, stop_before_pixels=not pixels) for p in self.paths[uid]]

    def files(self, study: int = 0) -> list[Path]:
        return self.paths[sorted(self.paths)[study]]


def _synth(out: Path, modality: str, studies: int) -> Sources:
    synthesize(out, studies=studies, seed=23, modality=modality,  # type: ignore[arg-type]
               positive_fraction=1.0, compress=False)
    paths: dict[str, list[Path]] = {}
    for path in sorted(out.glob("*/*/*.dcm")):
        paths.setdefault(path.parts[-3], []).append(path)
    for files in paths.values():
        files.sort(key=lambda p: int(dcmread(p, stop_before_pixels=True).InstanceNumber))
    return Sources(paths)


@pytest.fixture(scope="module")
def cr(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return _synth(tmp_path_factory.mktemp("cr"), "CR", 2)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return _synth(tmp_path_factory.mktemp("ct"), "CT", 1)


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["test_reporting", *map(str, parts)]))


def _finding(image: Dataset, n: int, probability: float, location: Location | None = None,
             site: CodedConcept | None = FINDING_SITE_LUNG) -> Finding:
    return Finding(
        label="nodule", finding=NODULE, probability=probability, threshold=0.5,
        present=probability >= 0.5, sop_instance_uids=(str(image.SOPInstanceUID),),
        tracking_uid=_uid("finding", image.SOPInstanceUID, n), finding_site=site,
        location=location,
    )


def _run(image: Dataset, findings: list[Finding], task: str = "classification") -> ModelRun:
    return ModelRun(
        model_name=MODEL, model_version=VERSION, task=task,  # type: ignore[arg-type]
        study_instance_uid=str(image.StudyInstanceUID),
        series_instance_uid=str(image.SeriesInstanceUID), findings=findings,
        parameters={"threshold": 0.5, "input_size": 256},
    )


def _mask(image: Dataset, r0: int, c0: int, size: int = 12) -> NDArray[np.bool_]:
    mask = np.zeros((int(image.Rows), int(image.Columns)), dtype=bool)
    mask[r0:r0 + size, c0:c0 + size] = True
    return mask


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


def check_sr(path: Path) -> None:
    """dsrdump -v +Pt: exit 0 and not a single error or warning (the docs/notes.md recipe)."""
    result = subprocess.run([need_binary("dsrdump"), "-v", "+Pt", str(path)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in _lines(result) if "Error" in line or "Warning" in line]
    assert result.returncode == 0, _lines(result)
    assert problems == []


def check_iod(path: Path, allow: Sequence[str] = ()) -> None:
    """dciodvfy: no line starting with Error (its exit code is 0 on errors) nor Warning.

    ``allow`` names warnings a test expects (substrings of the line).
    """
    result = subprocess.run([need_binary("dciodvfy"), str(path)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in _lines(result) if line.startswith(("Error", "Warning"))
                and not (line.startswith("Warning") and any(a in line for a in allow))]
    assert problems == []


def check_entities(paths: Sequence[Path]) -> None:
    """dcentvfy: patient/study/series attributes consistent between results and sources."""
    result = subprocess.run([need_binary("dcentvfy"), *map(str, paths)],
                            capture_output=True, text=True, timeout=60)
    # dicom3tools files Accession Number of SR under the Series IE: a warning of its own.
    problems = [line for line in _lines(result) if line.startswith("Error")
                or (line.startswith("Warning") and "<AccessionNumber> IE <Series>" not in line)]
    assert problems == []


def _strip_timestamps(ds: Dataset) -> Dataset:
    for elem in list(ds):
        if elem.keyword in TIMESTAMPS:
            del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                _strip_timestamps(item)
    return ds


def _walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _scoords(ds: Dataset) -> list[tuple[str, list[float]]]:
    return [(str(i.GraphicType), [float(v) for v in i.GraphicData])
            for i in _walk(ds.ContentSequence) if i.ValueType == "SCOORD"]


# --------------------------------------------------------------------------- SR


def test_classification_sr_round_trips_present_and_absent(cr: Sources, tmp_path: Path) -> None:
    image = cr.headers(0)[0]  # stop_before_pixels=True
    findings = [_finding(image, 1, 0.87), _finding(image, 2, 0.12, site=None)]
    sr = build_sr(_run(image, findings), [image], series_instance_uid=_uid("series"),
                  sop_instance_uid=_uid("sr"), software_version="0.9.1")
    path = _save(sr, tmp_path / "sr.dcm")
    check_sr(path)
    check_iod(path)
    check_entities([*cr.files(0), path])

    back = dcmread(path)
    assert back.SOPClassUID == COMPREHENSIVE_SR
    assert back.StudyInstanceUID == image.StudyInstanceUID
    assert back.SeriesInstanceUID != image.SeriesInstanceUID
    assert (back.CompletionFlag, back.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert back.Manufacturer == "dicom-ai"
    assert back.SoftwareVersions == "0.9.1"
    assert back.SeriesNumber == 9901
    values = {str(i.ConceptNameCodeSequence[0].CodeValue): i for i in back.ContentSequence}
    observer_uid = str(values["121012"].UID)  # Device Observer UID
    assert observer_uid == device_observer_uid(MODEL)
    assert device_observer_uid("another-model") != device_observer_uid(MODEL)
    assert values["121013"].TextValue == MODEL  # Device Observer Name
    assert values["121058"].ConceptCodeSequence[0].CodeValue == "399208008"  # chest X-ray

    reported = summarize_sr(back)
    assert [r.present for r in reported] == [True, False]
    assert [r.probability for r in reported] == pytest.approx([0.87, 0.12])
    assert [r.tracking_uid for r in reported] == [f.tracking_uid for f in findings]
    for r in reported:
        assert r.finding == ("27925004", "SCT", "Nodule")
        assert (r.algorithm_name, r.algorithm_version) == (MODEL, VERSION)
        assert r.source_sop_instance_uids == (image.SOPInstanceUID,)
        assert r.location_kind is None
    texts = [str(i.TextValue) for i in _walk(back.ContentSequence)
             if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert "threshold=0.5" in texts
    assert "input_size=256" in texts


@pytest.mark.parametrize("kind", ["comprehensive", "comprehensive3d"])
def test_point_and_bbox_locations_become_planar_rois(kind: SRKind, cr: Sources,
                                                     tmp_path: Path) -> None:
    image = cr.headers(1)[0]
    point = Location("point", str(image.SOPInstanceUID), point=(40.5, 100.5))
    box = Location("bbox", str(image.SOPInstanceUID), bbox=(10.0, 20.0, 30.0, 60.0))
    findings = [_finding(image, 1, 0.91, point), _finding(image, 2, 0.2, box),
                _finding(image, 3, 0.7)]
    sr = build_sr(_run(image, findings), [image], kind=kind, series_instance_uid=_uid(kind),
                  sop_instance_uid=_uid(kind, "sr"))
    path = _save(sr, tmp_path / f"{kind}.dcm")
    check_sr(path)
    check_iod(path)

    back = dcmread(path)
    assert back.SOPClassUID == (COMPREHENSIVE_3D_SR if kind == "comprehensive3d"
                                else COMPREHENSIVE_SR)
    # SCOORD is (column, row): ours (row, column) swapped; the box is a closed polyline.
    assert _scoords(back) == [
        ("POINT", [100.5, 40.5]),
        ("POLYLINE", [20.0, 10.0, 60.0, 10.0, 60.0, 30.0, 20.0, 30.0, 20.0, 10.0]),
    ]
    reported = summarize_sr(back)
    assert [r.location_kind for r in reported] == ["point", "bbox", None]
    assert [r.present for r in reported] == [True, False, True]
    assert [r.probability for r in reported] == pytest.approx([0.91, 0.2, 0.7])
    assert all(r.source_sop_instance_uids == (image.SOPInstanceUID,) for r in reported)


def test_predecessor_is_referenced(cr: Sources, tmp_path: Path) -> None:
    image = cr.headers(0)[0]
    run = _run(image, [_finding(image, 1, 0.6)])
    first = build_sr(run, [image], series_instance_uid=_uid("s"), sop_instance_uid=_uid("v1"))
    prior = PriorReport(str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                        str(first.SOPClassUID), str(first.SOPInstanceUID))
    second = build_sr(run, [image], series_instance_uid=_uid("s"), sop_instance_uid=_uid("v2"),
                      instance_number=2, predecessor=prior)
    path = _save(second, tmp_path / "v2.dcm")
    check_sr(path)
    check_iod(path)

    back = dcmread(path)
    study = back.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == prior.study_instance_uid
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == prior.series_instance_uid
    ref = series.ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        prior.sop_class_uid, prior.sop_instance_uid)
    assert "PredecessorDocumentsSequence" not in first
    assert [r.tracking_uid for r in summarize_sr(back)] == [run.findings[0].tracking_uid]


def test_missing_type2_attributes_are_filled_on_a_copy(cr: Sources, tmp_path: Path) -> None:
    image = cr.headers(0, pixels=True)[0]  # read with pixel data this time
    for keyword in ("PatientBirthDate", "AccessionNumber", "PatientSex", "StudyID",
                    "ReferringPhysicianName"):
        delattr(image, keyword)
    uid = str(image.SOPInstanceUID)
    located = _finding(image, 2, 0.8, Location("segment", uid, segment_number=1,
                                                mask=_mask(image, 50, 60)))
    run = _run(image, [_finding(image, 1, 0.3), located], task="segmentation")
    seg = build_seg(run, [image], series_instance_uid=_uid("seg"), sop_instance_uid=_uid("seg", 1))
    sr = build_sr(run, [image], series_instance_uid=_uid("sr"), sop_instance_uid=_uid("sr", 1),
                  segmentation=seg)
    heat = HeatMap(uid, np.zeros((image.Rows, image.Columns), np.float32),
                   np.full((image.Rows, image.Columns), 0.5, np.float32))
    sc = build_heatmap_capture(heat, image, run, series_instance_uid=_uid("sc"),
                               sop_instance_uid=_uid("sc", 1))
    paths = [_save(ds, tmp_path / f"{name}.dcm") for name, ds in
             (("sr", sr), ("seg", seg), ("sc", sc))]
    check_sr(paths[0])
    for path in paths:
        # An empty Study ID (type 2) is valid; dciodvfy only notes that a DICOMDIR needs one.
        check_iod(path, allow=["needed to build DICOMDIR - Study ID"])
        back = dcmread(path)
        assert back.PatientBirthDate == ""
        assert back.AccessionNumber == ""
    assert "PatientBirthDate" not in image  # the caller's dataset is untouched
    assert "PixelData" in image


# --------------------------------------------------------------------------- SEG + SR segment


def test_seg_and_tid1411_groups_from_a_cr(cr: Sources, tmp_path: Path) -> None:
    image = cr.headers(0)[0]
    uid = str(image.SOPInstanceUID)
    masks = [_mask(image, 40, 50), _mask(image, 120, 90, size=20)]
    findings = [
        _finding(image, 1, 0.95, Location("segment", uid, segment_number=1, mask=masks[0])),
        _finding(image, 2, 0.66, Location("segment", uid, segment_number=2, mask=masks[1]),
                 site=None),
        _finding(image, 3, 0.1),
    ]
    run = _run(image, findings, task="segmentation")
    seg = build_seg(run, [image], series_instance_uid=_uid("seg"), sop_instance_uid=_uid("seg", 1),
                    software_version="0.9.1")
    seg_path = _save(seg, tmp_path / "seg.dcm")
    check_iod(seg_path)

    back_seg = dcmread(seg_path)
    assert back_seg.SOPClassUID == SEGMENTATION
    assert back_seg.SegmentationType == "BINARY"
    assert back_seg.StudyInstanceUID == image.StudyInstanceUID
    assert back_seg.PatientOrientation == image.PatientOrientation
    segments = back_seg.SegmentSequence
    assert [int(s.SegmentNumber) for s in segments] == [1, 2]
    for segment, finding in zip(segments, findings, strict=False):
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == NODULE.value
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert segment.TrackingUID == finding.tracking_uid
        assert segment.SegmentAlgorithmName == MODEL
    frames = np.asarray(back_seg.pixel_array, dtype=bool).reshape(-1, *masks[0].shape)
    assert [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            for f in back_seg.PerFrameFunctionalGroupsSequence] == [1, 2]
    assert np.array_equal(frames[0], masks[0])
    assert np.array_equal(frames[1], masks[1])

    sr = build_sr(run, [image], series_instance_uid=_uid("sr"), sop_instance_uid=_uid("sr", 1),
                  segmentation=seg)
    sr_path = _save(sr, tmp_path / "sr.dcm")
    check_sr(sr_path)
    check_iod(sr_path)
    check_entities([*cr.files(0), seg_path, sr_path])

    back = dcmread(sr_path)
    refs = [i for i in _walk(back.ContentSequence)
            if i.ValueType == "IMAGE" and i.ConceptNameCodeSequence[0].CodeValue == "121191"]
    assert [int(r.ReferencedSOPSequence[0].ReferencedSegmentNumber) for r in refs] == [1, 2]
    assert all(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
               for r in refs)
    evidence = {str(s.ReferencedSOPInstanceUID) for item in
                back.CurrentRequestedProcedureEvidenceSequence
                for series in item.ReferencedSeriesSequence
                for s in series.ReferencedSOPSequence}
    assert evidence == {uid, str(seg.SOPInstanceUID)}
    reported = summarize_sr(back)
    assert [r.location_kind for r in reported] == ["segment", "segment", None]
    assert [r.probability for r in reported] == pytest.approx([0.95, 0.66, 0.1])
    assert all(r.source_sop_instance_uids == (uid,) for r in reported)


def test_ct_slice_segment_in_a_3d_sr(ct: Sources, tmp_path: Path) -> None:
    slices = ct.headers(0)  # the whole series, headers only
    image = slices[len(slices) // 2]
    uid = str(image.SOPInstanceUID)
    finding = _finding(image, 1, 0.83, Location("segment", uid, segment_number=1,
                                                mask=_mask(image, 60, 70, size=10)), site=None)
    whole = Finding(label="lesion", finding=NODULE, probability=0.83, threshold=0.5,
                    present=True, sop_instance_uids=tuple(str(s.SOPInstanceUID) for s in slices),
                    tracking_uid=_uid("series-level"))
    run = _run(image, [finding, whole], task="segmentation")
    seg = build_seg(run, slices, series_instance_uid=_uid("ctseg"),
                    sop_instance_uid=_uid("ctseg", 1))
    sr = build_sr(run, slices, kind="comprehensive3d", series_instance_uid=_uid("ctsr"),
                  sop_instance_uid=_uid("ctsr", 1), segmentation=seg)
    seg_path, sr_path = _save(seg, tmp_path / "seg.dcm"), _save(sr, tmp_path / "sr.dcm")
    check_iod(seg_path)
    check_sr(sr_path)
    check_iod(sr_path)
    check_entities([*ct.files(0), seg_path, sr_path])

    back = dcmread(sr_path)
    assert back.SOPClassUID == COMPREHENSIVE_3D_SR
    reported = summarize_sr(back)
    assert reported[0].location_kind == "segment"
    assert reported[0].source_sop_instance_uids == (uid,)
    assert reported[1].source_sop_instance_uids == whole.sop_instance_uids
    assert dcmread(seg_path).NumberOfFrames == 1
    procedure = [i for i in back.ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "77477000"


def test_builds_are_deterministic_except_timestamps(cr: Sources) -> None:
    image = cr.headers(0)[0]
    uid = str(image.SOPInstanceUID)
    run = _run(image, [
        _finding(image, 1, 0.9, Location("segment", uid, segment_number=1,
                                         mask=_mask(image, 30, 30))),
        _finding(image, 2, 0.4, Location("point", uid, point=(5.5, 6.5))),
    ], task="segmentation")

    def build() -> list[Dataset]:
        seg = build_seg(run, [image], series_instance_uid="1.2.3.1", sop_instance_uid="1.2.3.2")
        sr = build_sr(run, [image], series_instance_uid="1.2.3.3", sop_instance_uid="1.2.3.4",
                      segmentation=seg)
        heat = HeatMap(uid, np.full(_mask(image, 0, 0).shape, 0.7, np.float32),
                       np.full(_mask(image, 0, 0).shape, 0.3, np.float32))
        sc = build_heatmap_capture(heat, image, run, series_instance_uid="1.2.3.5",
                                   sop_instance_uid="1.2.3.6")
        return [_strip_timestamps(ds) for ds in (seg, sr, sc)]

    assert build() == build()


# --------------------------------------------------------------------------- heat-map SC


def test_heatmap_capture(cr: Sources, tmp_path: Path) -> None:
    image = cr.headers(1)[0]
    rows, cols = int(image.Rows), int(image.Columns)
    heat = np.zeros((rows, cols), np.float32)
    heat[rows // 2 - 20:rows // 2 + 20, cols // 2 - 20:cols // 2 + 20] = 1.0
    display = np.tile(np.linspace(0, 1, cols, dtype=np.float32), (rows, 1))
    run = _run(image, [])
    sc = build_heatmap_capture(HeatMap(str(image.SOPInstanceUID), heat, display), image, run,
                               series_instance_uid=_uid("sc"), sop_instance_uid=_uid("sc", 1),
                               software_version="0.9.1")
    path = _save(sc, tmp_path / "sc.dcm")
    check_iod(path)
    check_entities([*cr.files(1), path])

    back = dcmread(path)
    assert back.SOPClassUID == SECONDARY_CAPTURE
    assert back.StudyInstanceUID == image.StudyInstanceUID
    assert back.BurnedInAnnotation == "YES"
    assert list(back.ImageType) == ["DERIVED", "SECONDARY"]
    assert back.SeriesDescription == f"AI heat-map ({MODEL})"
    assert back.BodyPartExamined == image.BodyPartExamined
    assert back.PatientOrientation == image.PatientOrientation
    source = back.SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert source.ReferencedSOPClassUID == image.SOPClassUID
    pixels = back.pixel_array
    assert back.PhotometricInterpretation == "RGB"
    assert pixels.shape == (rows, cols, 3)
    # Banner: white text on black across the top rows.
    assert pixels[:8].max() == 255
    assert (pixels[:8] == 0).all(axis=2).mean() > 0.5
    # Cold areas are the plain grey display; the hot square is coloured (channels differ).
    cold = pixels[rows - 5, 5:cols - 5]
    assert (cold[:, 0] == cold[:, 1]).all()
    assert (cold[:, 1] == cold[:, 2]).all()
    assert np.abs(cold[:, 0].astype(int) - np.round(display[rows - 5, 5:cols - 5] * 255)).max() <= 1
    hot = pixels[rows // 2, cols // 2].astype(int)
    assert hot[0] > hot[2] + 50  # red dominates where the heat is 1


def test_colorize_alpha_follows_heat() -> None:
    display = np.full((2, 3), 0.5, np.float32)
    heat = np.array([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]], np.float32)
    rgb = colorize(display, heat)
    assert rgb.dtype == np.uint8
    assert (rgb[1] == 128).all()
    assert (rgb[0, 0] == 128).all()
    assert len(set(rgb[0, 2].tolist())) > 1


# --------------------------------------------------------------------------- errors and codes


def test_bad_inputs_are_refused(cr: Sources) -> None:
    image = cr.headers(0)[0]
    other = cr.headers(1)[0]
    uid = str(image.SOPInstanceUID)
    plain = _run(image, [_finding(image, 1, 0.9)])
    with pytest.raises(ValueError, match="no finding located by a segment"):
        build_seg(plain, [image], series_instance_uid="1.2.3", sop_instance_uid="1.2.4")
    with pytest.raises(ValueError, match="not one of the source images"):
        build_sr(plain, [other], series_instance_uid="1.2.3", sop_instance_uid="1.2.4")
    located = _run(image, [_finding(image, 1, 0.9, Location(
        "segment", uid, segment_number=1, mask=_mask(image, 0, 0)))])
    with pytest.raises(ValueError, match="no segmentation"):
        build_sr(located, [image], series_instance_uid="1.2.3", sop_instance_uid="1.2.4")
    gap = _run(image, [_finding(image, 1, 0.9, Location(
        "segment", uid, segment_number=2, mask=_mask(image, 0, 0)))])
    with pytest.raises(ValueError, match="segment numbers"):
        build_seg(gap, [image], series_instance_uid="1.2.3", sop_instance_uid="1.2.4")
    small = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="shape"):
        build_heatmap_capture(HeatMap(uid, small, small), image, plain,
                              series_instance_uid="1.2.3", sop_instance_uid="1.2.4")
    with pytest.raises(ValueError, match="not a TID 1500"):
        summarize_sr(image)


@pytest.mark.parametrize(("modality", "body_part", "code"), [
    ("CR", "CHEST", "399208008"), ("DX", "CHEST", "399208008"), ("DX", "HAND", "168537006"),
    ("CT", "ABDOMEN", "77477000"), ("MR", "", "113091000"), ("US", "", "363679005"),
])
def test_procedure_reported(modality: str, body_part: str, code: str) -> None:
    ds = Dataset()
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    assert procedure_reported(ds).value == code


def test_to_code() -> None:
    code = to_code(NODULE)
    assert (code.value, code.scheme_designator, code.meaning) == ("27925004", "SCT", "Nodule")


def test_warm_up_builds_each_sr_kind_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker-start warm-up runs the real builders (an error would surface here, not as a
    slow first job) and leaves no file behind."""
    from dicom_ai.runner.warmup import warm_up_reports

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert warm_up_reports(["comprehensive", "comprehensive3d"]) > 0
    assert list(tmp_path.iterdir()) == []
