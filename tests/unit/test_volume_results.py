"""Volumetric results: a multi-frame SEG and a TID 1500 SR with TID 1411 groups of volume regions.

A model run is built by hand from a synthetic chest CT's ground-truth masks (``lesions.csv``,
``masks/<series>.npz``) measured by :func:`dicom_ai.pipeline.volume.measure_lesions`; the SEG
and SR built from it are checked by dciodvfy and dsrdump and read back with highdicom. No
mocks: real files, real highdicom objects, real validators.
"""

from __future__ import annotations

import copy
import csv
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.exceptions import ReportError
from dicom_ai.inference.spec import FINDING_SITE_LUNG, NODULE
from dicom_ai.pipeline.loading import load_volume
from dicom_ai.pipeline.volume import Grid, measure_lesions, modality_volume
from dicom_ai.reporting import SRKind, build_seg, build_sr, summarize_sr
from dicom_ai.reporting.seg import has_segments
from dicom_ai.reporting.sr import source_headers
from dicom_ai.training.synth import ChestCT, read_lesion_masks, synthesize
from dicom_ai.values import Finding, ModelRun, VolumeRegion
from tests.unit.test_reporting import _strip_timestamps as strip_timestamps
from tests.unit.test_reporting import check_entities, check_iod, check_sr

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class Case:
    """One synthetic chest CT series, its truth and a model run built from the truth."""

    files: list[Path]
    headers: list[Dataset]
    labels: NDArray[np.uint8]
    rows: list[dict[str, str]]
    run: ModelRun
    pixel_mm: float


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["test_volume_results", *map(str, parts)]))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    out = tmp_path_factory.mktemp("chest")
    # 64 x 64 slices of a chest CT, 3-4 lesions large enough to measure, uncompressed.
    options = replace(ChestCT.for_matrix(64), slices=(100, 140), lesions=(3, 4),
                      lesion_diameter_mm=(10.0, 30.0))
    synthesize(out, studies=1, seed=11, modality="CT", positive_fraction=1.0, compress=False,
               chest_ct=options)
    with (out / "lesions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    series_uid = rows[0]["SeriesInstanceUID"]
    files = sorted(out.glob(f"*/{series_uid}/*.dcm"))
    volume = load_volume(files)
    masks = read_lesion_masks(out / rows[0]["mask_path"])
    assert volume.sop_instance_uids == masks.sop_instance_uids
    grid = Grid.of(volume)
    lesions = measure_lesions(masks.labels, grid, intensity=modality_volume(volume))
    uids = tuple(masks.sop_instance_uids)
    findings = []
    for lesion in lesions:
        (s0, s1), (r0, r1), (c0, c1) = lesion.bbox
        crop = masks.labels[s0:s1, r0:r1, c0:c1] == lesion.label
        region = VolumeRegion(
            series_instance_uid=series_uid, sop_instance_uids=uids, shape=grid.shape,
            offset=(s0, r0, c0), mask=crop, segment_number=lesion.label, voxels=lesion.voxels,
            volume_mm3=lesion.volume_mm3,
            longest_axial_diameter_mm=lesion.longest_axial_diameter_mm,
            centroid=lesion.centroid_patient, mean_intensity=lesion.mean_intensity,
            tracking_id=f"lesion {lesion.label}",
        )
        findings.append(Finding(
            label="lesion", finding=NODULE, probability=0.9 - 0.1 * lesion.label,
            threshold=0.5, present=True, sop_instance_uids=uids[s0:s1],
            tracking_uid=_uid("tracking", series_uid, lesion.label),
            finding_site=FINDING_SITE_LUNG, scope="series", region=region,
        ))
    run = ModelRun(
        model_name="chest-ct-lesion", model_version="0.1.0", task="segmentation",
        study_instance_uid=str(volume.datasets[0].StudyInstanceUID),
        series_instance_uid=series_uid, findings=findings, parameters={"threshold": 0.5},
    )
    headers: list[Dataset] = [dcmread(p, stop_before_pixels=True) for p in files]
    return Case(files, headers, masks.labels, rows, run, pixel_mm=volume.spacing[2])


def _seg(case: Case, run: ModelRun | None = None, name: str = "seg") -> Dataset:
    # Sources in file order, not grid order: the builder orders them by the region's grid.
    return build_seg(run or case.run, case.headers, series_instance_uid=_uid(name, "series"),
                     sop_instance_uid=_uid(name), software_version="0.9.1")


def test_multiframe_seg_holds_each_lesion_on_its_slices(case: Case, tmp_path: Path) -> None:
    assert has_segments(case.run)
    assert len(case.run.findings) >= 3
    seg = _seg(case)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    check_iod(path)
    check_entities([*case.files, path])

    back = dcmread(path)
    assert back.SOPClassUID == SEGMENTATION
    assert back.SegmentationType == "BINARY"
    assert back.SegmentsOverlap == "NO"
    slices = case.labels.shape[0]
    # Every source slice is referenced; only frames with a lesion are stored.
    derived = {str(ref.ReferencedSOPInstanceUID)
               for frame in back.PerFrameFunctionalGroupsSequence
               for image in frame.DerivationImageSequence
               for ref in image.SourceImageSequence}
    referenced = {str(ref.ReferencedSOPInstanceUID)
                  for series in back.ReferencedSeriesSequence
                  for ref in series.ReferencedInstanceSequence}
    assert referenced == {str(h.SOPInstanceUID) for h in case.headers}
    lesion_slices = sum(len(np.unique(np.nonzero(case.labels == n)[0]))
                        for n in range(1, int(case.labels.max()) + 1))
    assert int(back.NumberOfFrames) == lesion_slices < slices
    assert derived <= referenced
    # Each frame sits where its source slice is (Plane Position (Patient), C.7.6.16.2.3).
    position = {str(h.SOPInstanceUID): [float(v) for v in h.ImagePositionPatient]
                for h in case.headers}
    for frame in back.PerFrameFunctionalGroupsSequence:
        source = str(frame.DerivationImageSequence[0].SourceImageSequence[0]
                     .ReferencedSOPInstanceUID)
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == \
            pytest.approx(position[source])

    reader = hd.seg.Segmentation.from_dataset(back)
    segments = [f.region.segment_number for f in case.run.findings if f.region]
    assert list(reader.segment_numbers) == segments
    uids = next(f.region for f in case.run.findings if f.region).sop_instance_uids
    masks = reader.get_pixels_by_source_instance(
        source_sop_instance_uids=list(uids), segment_numbers=segments,
        assert_missing_frames_are_empty=True)
    for index, number in enumerate(segments):
        assert np.array_equal(masks[..., index].astype(bool), case.labels == number)
    for description, finding in zip(back.SegmentSequence, case.run.findings, strict=True):
        assert description.TrackingUID == finding.tracking_uid
        assert finding.region is not None
        assert description.TrackingID == finding.region.tracking_id


@pytest.mark.parametrize("kind", ["comprehensive", "comprehensive3d"])
def test_sr_groups_give_the_truths_volumes_and_diameters(kind: SRKind, case: Case,
                                                         tmp_path: Path) -> None:
    seg = _seg(case)
    sr = build_sr(case.run, case.headers, kind=kind, series_instance_uid=_uid("sr", kind),
                  sop_instance_uid=_uid("sr", kind, 1), segmentation=seg)
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    check_sr(sr_path)
    check_iod(sr_path)
    check_entities([*case.files, seg_path, sr_path])

    reported = summarize_sr(dcmread(sr_path))
    assert len(reported) == len(case.rows)
    for group, row, finding in zip(reported, case.rows, case.run.findings, strict=True):
        assert group.location_kind == "segment"
        assert group.tracking_id == f"lesion {row['lesion']}"
        assert group.tracking_uid == finding.tracking_uid
        assert group.segment_number == int(row["lesion"])
        assert group.segmentation_sop_instance_uid == seg.SOPInstanceUID
        assert group.present
        assert group.probability == pytest.approx(finding.probability)
        assert group.source_sop_instance_uids == finding.sop_instance_uids
        assert group.volume_mm3 == pytest.approx(float(row["volume_mm3"]), rel=1e-3)
        assert group.longest_axial_diameter_mm == pytest.approx(
            float(row["longest_axial_diameter_mm"]), abs=1.2 * case.pixel_mm)
        # CT: the mean attenuation lies on the lesion's side of its background.
        assert group.mean_attenuation_hu is not None
        contrast = float(row["contrast_hu"])
        assert (group.mean_attenuation_hu - float(row["background_hu"])) * contrast > 0
        centroid = [float(row[f"centroid_{a}_mm"]) for a in "xyz"]
        if kind == "comprehensive3d":
            assert group.centroid == pytest.approx(centroid, abs=0.01)
        else:
            assert group.centroid is None
    if kind == "comprehensive3d":
        assert dcmread(sr_path).SOPClassUID == COMPREHENSIVE_3D_SR


def test_overlapping_regions_keep_each_segment(case: Case, tmp_path: Path) -> None:
    """Two regions sharing voxels cannot be a label map: each segment still reads back whole."""
    first = case.run.findings[0]
    assert first.region is not None
    second = replace(first, tracking_uid=_uid("overlap"),
                     region=replace(first.region, segment_number=2, tracking_id="lesion 1b"))
    run = replace(case.run, findings=[first, second])
    seg = _seg(case, run, "overlap")
    path = tmp_path / "overlap.dcm"
    seg.save_as(path, enforce_file_format=True)
    check_iod(path)
    back = dcmread(path)
    assert back.SegmentsOverlap == "YES"
    reader = hd.seg.Segmentation.from_dataset(back)
    masks = reader.get_pixels_by_source_instance(
        source_sop_instance_uids=list(first.region.sop_instance_uids), segment_numbers=[1, 2])
    truth = case.labels == first.region.segment_number
    assert np.array_equal(masks[..., 0].astype(bool), truth)
    assert np.array_equal(masks[..., 1].astype(bool), truth)


def test_volume_results_refuse_what_they_cannot_build(case: Case) -> None:
    first, second = case.run.findings[:2]
    assert first.region is not None
    assert second.region is not None
    # Segment numbers must be 1..n.
    bad = replace(case.run, findings=[second])
    with pytest.raises(ReportError, match="segment numbers"):
        _seg(case, bad)
    # Every region of one SEG on one grid.
    other = replace(second, region=replace(
        second.region, sop_instance_uids=second.region.sop_instance_uids[::-1]))
    with pytest.raises(ReportError, match="same source grid"):
        _seg(case, replace(case.run, findings=[first, other]))
    # Every slice of the grid among the sources.
    with pytest.raises(ReportError, match="not among the sources"):
        build_seg(case.run, case.headers[1:], series_instance_uid=_uid("x"),
                  sop_instance_uid=_uid("x", 1))
    # The SR needs the SEG its groups reference.
    with pytest.raises(ReportError, match="no segmentation"):
        build_sr(case.run, case.headers, series_instance_uid=_uid("y"),
                 sop_instance_uid=_uid("y", 1))


def test_source_headers_share_the_series_and_keep_each_slices_own(case: Case) -> None:
    """The first slice's header is checked whole; the others take its series attributes and
    their own per-instance ones (checked too); the caller's datasets stay as they were."""
    first, second, third = (copy.deepcopy(h) for h in case.headers[:3])
    with warnings.catch_warnings():  # pydicom warns (quoting the value) as it is set
        warnings.simplefilter("ignore")
        first.PatientBirthDate = "1901-12-31"
        second.AcquisitionDate = "2020-01-02"
    first.SliceLocation = "12.5"
    if "SliceLocation" in second:
        del second.SliceLocation
    headers = source_headers([first, second, third, second])
    assert list(headers) == [str(h.SOPInstanceUID) for h in (first, second, third)]
    one, two, three = headers.values()
    # Series attributes from the first, fixed once; the sources keep their values as received.
    assert one.PatientBirthDate == two.PatientBirthDate == three.PatientBirthDate == ""
    assert first.PatientBirthDate == "1901-12-31"
    # Per-instance attributes are each slice's own, checked the same way.
    assert two.SOPInstanceUID == second.SOPInstanceUID
    assert list(two.ImagePositionPatient) == list(second.ImagePositionPatient)
    assert two.AcquisitionDate == ""
    assert second.AcquisitionDate == "2020-01-02"
    assert "SliceLocation" not in two
    assert one.SliceLocation == 12.5
    assert "PixelData" not in one
    # A header is a dataset of its own: changing it leaves the first's alone.
    two.PatientName = "OTHER"
    assert one.PatientName == first.PatientName
    with pytest.raises(ReportError, match="at least one"):
        source_headers([])


def test_volume_results_are_deterministic_except_timestamps(case: Case) -> None:
    """A retried job writes the same SEG and SR (the Dimension Organization UID derived)."""

    def build() -> list[Dataset]:
        seg = _seg(case)
        sr = build_sr(case.run, case.headers, kind="comprehensive3d",
                      series_instance_uid="1.2.3.3", sop_instance_uid="1.2.3.4",
                      segmentation=seg)
        return [strip_timestamps(ds) for ds in (seg, sr)]

    assert build() == build()
