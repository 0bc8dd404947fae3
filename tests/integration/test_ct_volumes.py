"""CT volumes through the whole loop with real peers (issue 21, "Done when").

One synthetic positive chest CT (:class:`~dicom_ai.training.synth.ChestCT` at a 128 matrix, its
lesions in ``lesions.csv`` and ``masks/<series>.npz``) is pushed to one service per module in
four forms, each as a study of its own (fresh Study, Series and SOP Instance UIDs; pixels and
geometry untouched, so the ground truth holds for all of them):

1. dcmtk ``storescu`` and ``dcmsend`` push the slices in shuffled order, a third of them JPEG-LS
   Lossless and RLE Lossless (``dcmcjpls``/``dcmcrle``, sent by ``dcmsend`` in their own
   syntax), the rest uncompressed;
2. the same slices with one slice in the middle missing (uneven spacing): still one volume;
3. the slices as one Legacy Converted Enhanced CT Image (highdicom.legacy);
4. all slices but one, then the held-back slice late: the study completes again and a
   superseding run sends a new SEG and SR whose lesions keep their tracking UIDs.

The route (Modality CT, BodyPartExamined CHEST) runs the bundled ``chest-ct-nodule`` model and
sends a SEG and an SR to dcmtk ``storescp`` (Comprehensive SR) and to Orthanc (Comprehensive 3D
SR). The test reads back what both PACS stored and compares it with the ground truth.

Matching rule: :func:`dicom_ai.training.volume_metrics.match_lesions`, the rule of the model's
own report. The SEG is painted back onto the source slices (each frame by its Image Position
(Patient)) as a label volume of segment numbers; a segment hits a ground-truth lesion when they
share a voxel or its centroid lies within the lesion's equivalent-sphere radius of the lesion's
centroid. A lesion is found when a segment hits it (several count once; their SR volumes add
up); a segment that hits none is a false positive. Tolerances are the model's measured accuracy
on its held-out studies (``report/test/metrics.json``, read at run time, never tightened here):
found lesions at least the sensitivity's CI lower bound times the lesion count (rounded down),
false positives at most the upper bound of false positives per volume (rounded up), and the mean
absolute volume error (relative) and longest-diameter error (mm) of the found lesions at most
the upper bounds of those errors' CIs (:class:`Tolerance`).
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.config import Settings
from dicom_ai.inference.registry import BUNDLED_ROOT
from dicom_ai.reporting import summarize_sr
from dicom_ai.service import Service
from dicom_ai.training.synth import ChestCT, LesionMasks, read_lesion_masks, synthesize
from dicom_ai.training.volume_metrics import CaseMatch, match_lesions
from storage.models import Job
from tests.conftest import need_binary
from tests.integration.test_loop import assert_iod_valid, assert_valid_sr, db_jobs, loop_settings
from tests.peers import ENV, Orthanc, StoreSCP, storescu, wait_until

MODEL = "chest-ct-nodule"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33": "comprehensive",
              "1.2.840.10008.5.1.4.1.1.88.34": "comprehensive3d"}
#: A 128 matrix (3.6-4.0 mm pixels: the anatomy of a 512 study) and 3 mm slices: about 110
#: slices, 3-4 lesions of 12-30 mm (lungs or liver, as the phantom places them; seed 2121: two
#: solid lung nodules of 28 and 15 mm, two hypodense liver lesions of 15 and 30 mm).
PHANTOM = replace(ChestCT.for_matrix(128), slices=(60, 120), slice_spacings=(3.0,),
                  lesions=(3, 4), lesion_diameter_mm=(12.0, 30.0))
SEED = 2121
ROUTE = {"name": "chest-ct", "match": {"Modality": "CT", "BodyPartExamined": "CHEST"},
         "model": MODEL, "destinations": ["dcmtk", "orthanc"], "send_seg": True}




# -- the study and its ground truth ---------------------------------------------------------------
@dataclass(frozen=True)
class Truth:
    """The synthetic study: its slices in order along the normal, lesions and their masks."""

    files: list[Path]
    rows: list[dict[str, str]]
    masks: LesionMasks

    @property
    def z(self) -> NDArray[np.float64]:
        """The slices' positions along the normal (axial: z), in mask order."""
        return np.asarray(self.masks.origin[2] + np.arange(len(self.files))
                          * self.masks.spacing[0])

    def lesion_slices(self) -> set[int]:
        """The slice indices any lesion touches."""
        return {int(k) for k in np.flatnonzero(self.masks.labels.any(axis=(1, 2)))}


@pytest.fixture(scope="module")
def truth(tmp_path_factory: pytest.TempPathFactory) -> Truth:
    out = tmp_path_factory.mktemp("chest-ct")
    synthesize(out, studies=1, seed=SEED, modality="CT", positive_fraction=1.0,
               compress=False, chest_ct=PHANTOM)
    with (out / "lesions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    masks = read_lesion_masks(out / rows[0]["mask_path"])
    by_uid = {p.stem: p for p in out.glob(f"*/{rows[0]['SeriesInstanceUID']}/*.dcm")}
    files = [by_uid[uid] for uid in masks.sop_instance_uids]
    return Truth(files, rows, masks)


def variant(truth: Truth, out: Path, *, drop: tuple[int, ...] = ()) -> list[Path]:
    """The study as a new one (fresh study, series and instance UIDs), minus slices `drop`.

    Returned in slice order (a dropped slice is left out).
    """
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for k, path in enumerate(truth.files):
        if k in drop:
            continue
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out / f"{k:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        copies.append(target)
    return copies


def study_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# -- the loop -------------------------------------------------------------------------------------
@dataclass
class Loop:
    service: Service
    settings: Settings
    db_url: str
    scp: StoreSCP
    orthanc: Orthanc

    @property
    def port(self) -> int:
        assert self.service.address is not None
        return self.service.address[1]


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    """One service (SQLite, one worker) whose CT route sends to storescp and Orthanc."""
    for name in ("storescu", "storescp", "dcmsend", "Orthanc"):
        need_binary(name)
    base = tmp_path_factory.mktemp("ct-loop")
    db_url = f"sqlite:///{base / 'index.sqlite3'}"
    with StoreSCP(base / "scp") as scp, Orthanc(base / "orthanc") as orthanc:
        settings = loop_settings(base, db_url, [
            {"name": "dcmtk", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port},
            {"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
             "port": orthanc.port, "sr_kind": "comprehensive3d"},
        ], routes=[ROUTE],
            # Two senders (storescu, dcmsend) push one series: a quiet period longer than the
            # gap between their associations, so the series completes once.
            completion={"series_quiet_seconds": 2.0, "study_quiet_seconds": 2.0})
        service = Service(settings)
        service.start()
        try:
            yield Loop(service, settings, db_url, scp, orthanc)
        finally:
            service.stop()


def dcmsend(port: int, files: list[Path]) -> None:
    """dcmtk ``dcmsend`` in the files' own transfer syntaxes, over one association."""
    done = subprocess.run(
        [need_binary("dcmsend"), "-v", "--decompress-never", "-aet", "CT_SCANNER", "-aec",
         "DICOM_AI", "127.0.0.1", str(port), *map(str, files)],
        env=ENV, capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    # dcmsend exits 0 even when a file was not sent: read its summary.
    assert f"with status SUCCESS  : {len(files)}" in text, text


def push(loop: Loop, files: list[Path], *, extra: list[str] | None = None) -> None:
    sent = storescu(loop.port, files, calling="CT_SCANNER", extra=extra or [])
    assert sent.returncode == 0, sent.stderr


def kind_of(ds: Dataset) -> str:
    sop_class = str(ds.SOPClassUID)
    return "seg" if sop_class == SEG_CLASS else SR_CLASSES.get(sop_class, "other")


def at_scp(loop: Loop, study_uid: str) -> list[tuple[Path, Dataset]]:
    """What storescp stored for a study (files it is still writing are left out)."""
    found: list[tuple[Path, Dataset]] = []
    for path in sorted(loop.scp.folder.glob("*")):
        try:
            ds = dcmread(path)
        except Exception:
            continue
        if str(ds.StudyInstanceUID) == study_uid:
            found.append((path, ds))
    return found


def at_orthanc(loop: Loop, study_uid: str) -> list[Dataset]:
    """What Orthanc stored for a study, read back over its REST API."""
    return [dcmread(io.BytesIO(data)) for data in loop.orthanc.study_files(study_uid)]


def results(loop: Loop, study_uid: str, *, segs: int, srs: int,
            timeout: float = 150) -> tuple[list[tuple[Path, Dataset]], list[Dataset]]:
    """Wait until both PACS hold `segs` SEGs and `srs` SRs of the study; both lists."""

    done: dict[str, float] = {}

    def counts(kinds: list[str]) -> tuple[int, int]:
        return kinds.count("seg"), sum(k in SR_CLASSES.values() for k in kinds)

    def check() -> tuple[list[tuple[Path, Dataset]], list[Dataset]] | None:
        runs = study_jobs(loop, study_uid)
        failed = [(j.id, j.error) for j in runs if j.state == "failed"]
        assert not failed, failed  # no need to wait out the timeout
        if len(runs) == srs and all(j.state == "done" for j in runs):
            # Done: delivery takes a second or two; no SEG at all means no lesion was found.
            done.setdefault("at", time.monotonic())
            assert time.monotonic() - done["at"] < 30, (
                f"jobs done, but storescp has {[kind_of(ds) for _, ds in at_scp(loop, study_uid)]}")
        scp = at_scp(loop, study_uid)
        if counts([kind_of(ds) for _, ds in scp]) != (segs, srs):
            return None
        pacs = at_orthanc(loop, study_uid)
        if counts([kind_of(ds) for ds in pacs]) != (segs, srs):
            return None
        return scp, pacs

    got: tuple[list[tuple[Path, Dataset]], list[Dataset]] = wait_until(
        check, timeout, f"{segs} SEG and {srs} SR of the study at storescp and Orthanc",
        interval=0.5)
    return got


def study_jobs(loop: Loop, study_uid: str) -> list[Job]:
    return [j for j in db_jobs(loop.db_url) if j.study_instance_uid == study_uid]


# -- reading the results back ---------------------------------------------------------------------
@dataclass(frozen=True)
class Segments:
    """A SEG painted back onto the truth's slices: a label volume of its segment numbers."""

    labels: NDArray[np.int32]
    numbers: list[int]
    referenced: set[tuple[str, int | None]]  # (source SOP Instance UID, frame) per frame


def read_seg(seg: Dataset, truth: Truth) -> Segments:
    """Each SEG frame put back on its slice of the truth grid by its plane position."""
    assert kind_of(seg) == "seg"
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns).astype(bool)
    z = truth.z
    labels = np.zeros(truth.masks.labels.shape, np.int32)
    referenced: set[tuple[str, int | None]] = set()
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        (k,) = np.flatnonzero(np.abs(z - position[2]) < 0.01)  # exactly one slice
        assert not (labels[k][pixels[i]] > 0).any(), "segments overlap"
        labels[k][pixels[i]] = number
        for derivation in frame.DerivationImageSequence:
            for source in derivation.SourceImageSequence:
                frames = source.get("ReferencedFrameNumber")
                referenced.add((str(source.ReferencedSOPInstanceUID),
                                None if frames is None else int(frames)))
    return Segments(labels, numbers, referenced)


@dataclass(frozen=True)
class Tolerance:
    """The model's measured accuracy on its held-out studies (``report/test/metrics.json``).

    The bounds are the far ends of the report's bootstrap 95% CIs: the lower bound of the
    sensitivity, the upper bounds of the false positives per volume and of the mean absolute
    volume (relative) and longest-diameter (mm) errors of the detected lesions.
    """

    sensitivity: float
    fp_per_volume: float
    volume_error: float
    diameter_error_mm: float

    @classmethod
    def of_model(cls) -> Tolerance:
        """The bounds from the bundled model's report."""
        report = BUNDLED_ROOT / MODEL / "1.0.0" / "report" / "test" / "metrics.json"
        metrics: dict[str, Any] = json.loads(report.read_text())
        return cls(sensitivity=metrics["operating"]["sensitivity"]["ci_low"],
                   fp_per_volume=metrics["operating"]["fp_per_volume"]["ci_high"],
                   volume_error=metrics["volume_error"]["abs_mean"]["ci_high"],
                   diameter_error_mm=metrics["diameter_error_mm"]["abs_mean"]["ci_high"])


def check_study(truth: Truth, seg: Dataset, sr: Dataset, *, sources: set[str],
                what: str) -> CaseMatch:
    """The SEG and SR one PACS holds for a study against the truth (module docstring).

    The SR must report exactly the SEG's segments, each with the volume of its voxels; the
    lesions the SEG finds, the false positives and the errors of the SR's volumes and
    diameters must be within the model's measured accuracy (:class:`Tolerance`).
    """
    segments = read_seg(seg, truth)
    assert {uid for uid, _ in segments.referenced} <= sources, what
    groups = {g.segment_number: g for g in summarize_sr(sr) if g.present}
    assert all(g.algorithm_name == MODEL for g in groups.values())
    # Every present group references its segment of this SEG; every segment has its group.
    assert {g.segmentation_sop_instance_uid for g in groups.values()} <= {
        str(seg.SOPInstanceUID)}
    assert sorted(n or 0 for n in groups) == sorted(segments.numbers), what
    voxel = float(np.prod(truth.masks.spacing))
    for number, group in groups.items():
        # The SR's volume is its segment's voxels (the same mask on the same slices).
        assert group.volume_mm3 == pytest.approx(
            float((segments.labels == number).sum()) * voxel, rel=0.02), (what, number)
        assert group.longest_axial_diameter_mm is not None
    case = match_lesions(truth.masks.labels, segments.labels, truth.masks.spacing)
    rows = {int(r["lesion"]): r for r in truth.rows}
    found = [t for t in case.truth if t.detected]
    fps = sum(d.false_positive for d in case.detections)
    volume_errors, diameter_errors = [], []
    for lesion in found:
        reported = [groups[j] for j in lesion.detections]
        volume = sum(g.volume_mm3 or 0.0 for g in reported)
        volume_errors.append(abs(volume - lesion.volume_mm3) / lesion.volume_mm3)
        diameter = max(g.longest_axial_diameter_mm or 0.0 for g in reported)
        diameter_errors.append(
            abs(diameter - float(rows[lesion.label]["longest_axial_diameter_mm"])))
    print(f"{what}: {len(case.truth)} lesions, {len(found)} found, {fps} false positives; "
          f"volume errors {', '.join(f'{e:.1%}' for e in volume_errors)}; diameter errors "
          f"{', '.join(f'{e:.1f}' for e in diameter_errors)} mm")
    tolerance = Tolerance.of_model()
    assert len(found) >= np.floor(tolerance.sensitivity * len(case.truth)), (what, case)
    assert fps <= np.ceil(tolerance.fp_per_volume), (what, case)
    assert np.mean(volume_errors) <= tolerance.volume_error, (what, volume_errors)
    assert np.mean(diameter_errors) <= tolerance.diameter_error_mm, (what, diameter_errors)
    return case


# -- scenarios ------------------------------------------------------------------------------------
def test_shuffled_mixed_syntax_ct_gets_a_seg_and_sr_at_storescp_and_orthanc(
        truth: Truth, loop: Loop, tmp_path: Path) -> None:
    files = variant(truth, tmp_path / "study")
    uid = study_of(files[0])
    order = list(files)
    random.Random(SEED).shuffle(order)
    # A third compressed in place (JPEG-LS and RLE, lossless): dcmsend sends them as they are.
    compressed = order[::3]
    for n, path in enumerate(compressed):
        tool = "dcmcjpls" if n % 2 == 0 else "dcmcrle"
        subprocess.run([need_binary(tool), str(path), str(path)], check=True,
                       capture_output=True)
    plain = [p for p in order if p not in compressed]
    half = len(plain) // 2
    push(loop, plain[:half])
    dcmsend(loop.port, compressed)
    push(loop, plain[half:])

    scp, pacs = results(loop, uid, segs=1, srs=1)
    (job,) = study_jobs(loop, uid)
    assert (job.state, job.error) == ("done", None)
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    by_kind = {kind_of(ds): (path, ds) for path, ds in scp}
    seg_path, seg = by_kind["seg"]
    sr_path, sr = by_kind["comprehensive"]
    # The SEG references every slice of the series (its frames: the lesions' slices).
    assert referenced_instances(seg) == sources
    case = check_study(truth, seg, sr, sources=sources, what="storescp")
    assert_iod_valid(seg_path)
    assert_valid_sr(sr_path)

    # Orthanc got the same SEG and a Comprehensive 3D SR of the same lesions, with centroids.
    pacs_kinds = {kind_of(ds): ds for ds in pacs}
    assert set(pacs_kinds) == {"seg", "comprehensive3d"}
    assert pacs_kinds["seg"].SOPInstanceUID == seg.SOPInstanceUID
    sr3d = pacs_kinds["comprehensive3d"]
    case3d = check_study(truth, pacs_kinds["seg"], sr3d, sources=sources, what="orthanc")
    assert [t.detections for t in case3d.truth] == [t.detections for t in case.truth]
    rows = {int(r["lesion"]): r for r in truth.rows}
    groups = {g.segment_number: g for g in summarize_sr(sr3d) if g.present}
    for lesion in case3d.truth:
        if len(lesion.detections) != 1:
            continue
        centroid = groups[lesion.detections[0]].centroid
        assert centroid is not None
        want = np.array([float(rows[lesion.label][f"centroid_{a}_mm"]) for a in "xyz"])
        # The matching rule's reach: within the truth lesion's equivalent-sphere radius.
        radius = (3 * lesion.volume_mm3 / (4 * np.pi)) ** (1 / 3)
        assert np.linalg.norm(np.array(centroid) - want) <= radius, (lesion, centroid)
    copy = tmp_path / "orthanc-sr.dcm"
    sr3d.save_as(copy)
    assert_valid_sr(copy)


def test_a_missing_slice_in_the_middle_is_still_one_volume(
        truth: Truth, loop: Loop, tmp_path: Path) -> None:
    # A slice no lesion touches, near the middle: the truth's volumes stay what they are.
    middle = len(truth.files) // 2
    gap = min((k for k in range(len(truth.files)) if k not in truth.lesion_slices()),
              key=lambda k: abs(k - middle))
    files = variant(truth, tmp_path / "study", drop=(gap,))
    uid = study_of(files[0])
    push(loop, files)
    scp, _ = results(loop, uid, segs=1, srs=1)
    (job,) = study_jobs(loop, uid)
    assert (job.state, job.error) == ("done", None)
    by_kind = {kind_of(ds): ds for _, ds in scp}
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert referenced_instances(by_kind["seg"]) == sources  # one volume, every slice
    check_study(truth, by_kind["seg"], by_kind["comprehensive"], sources=sources, what="gap")


def test_an_enhanced_multiframe_ct_is_one_volume_with_the_same_lesions(
        truth: Truth, loop: Loop, tmp_path: Path) -> None:
    files = variant(truth, tmp_path / "slices")
    datasets = [dcmread(p) for p in files]
    # Frames out of slice order: the SEG must follow the frames' positions, not their order.
    random.Random(SEED).shuffle(datasets)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1)
    # highdicom keeps Body Part Examined only as Frame Anatomy's coded region (Chest): the
    # route's BodyPartExamined = CHEST must match it.
    assert "BodyPartExamined" not in enhanced
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    uid = str(enhanced.StudyInstanceUID)
    push(loop, [path], extra=["-R"])  # -R: propose the file's own SOP class
    scp, pacs = results(loop, uid, segs=1, srs=1)
    (job,) = study_jobs(loop, uid)
    assert (job.state, job.error) == ("done", None)
    by_kind = {kind_of(ds): (p, ds) for p, ds in scp}
    seg_path, seg = by_kind["seg"]
    sr_path, sr = by_kind["comprehensive"]
    mf = str(enhanced.SOPInstanceUID)
    check_study(truth, seg, sr, sources={mf}, what="enhanced")
    # The SEG references the one enhanced instance, each frame by its frame number.
    assert referenced_instances(seg) == {mf}
    referenced = read_seg(seg, truth).referenced
    assert {u for u, _ in referenced} == {mf}
    assert all(frame is not None and 1 <= frame <= len(files) for _, frame in referenced)
    assert_iod_valid(seg_path)
    assert_valid_sr(sr_path)
    assert {kind_of(ds) for ds in pacs} == {"seg", "comprehensive3d"}


def test_a_late_slice_supersedes_the_results_and_lesions_keep_their_tracking_uids(
        truth: Truth, loop: Loop, tmp_path: Path) -> None:
    files = variant(truth, tmp_path / "study")
    uid = study_of(files[0])
    # The last slice (no lesion reaches the edge of the scan) arrives after the results.
    assert len(files) - 1 not in truth.lesion_slices()
    push(loop, files[:-1])
    scp, _ = results(loop, uid, segs=1, srs=1)
    first = {kind_of(ds): ds for _, ds in scp}
    push(loop, files[-1:])
    scp2, pacs2 = results(loop, uid, segs=2, srs=2)
    second = {kind_of(ds): ds for _, ds in scp2
              if ds.SOPInstanceUID not in {d.SOPInstanceUID for d in first.values()}}
    runs = study_jobs(loop, uid)
    assert [j.state for j in runs] == ["done", "done"]
    assert runs[1].supersedes_job_id == runs[0].id

    new_sr = second["comprehensive"]
    [ref] = new_sr.PredecessorDocumentsSequence
    assert (ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == first["comprehensive"].SOPInstanceUID)
    # The same lesions keep their tracking identifiers and UIDs (SR groups and SEG segments).
    before = {g.tracking_id: g.tracking_uid for g in summarize_sr(first["comprehensive"])
              if g.present}
    after = {g.tracking_id: g.tracking_uid for g in summarize_sr(new_sr) if g.present}
    assert before
    assert before == after
    assert segment_tracking(first["seg"]) == segment_tracking(second["seg"])
    assert set(segment_tracking(second["seg"]).values()) == set(after.values())
    # The new SEG covers the late slice too.
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert referenced_instances(second["seg"]) == sources
    check_study(truth, second["seg"], new_sr, sources=sources, what="late")
    # Orthanc holds both runs' SEG and SR.
    assert sorted(kind_of(ds) for ds in pacs2) == ["comprehensive3d"] * 2 + ["seg"] * 2


def referenced_instances(seg: Dataset) -> set[str]:
    """The SOP Instance UIDs a SEG's Referenced Series Sequence lists."""
    return {str(r.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
            for r in s.ReferencedInstanceSequence}


def segment_tracking(seg: Dataset) -> dict[int, str]:
    """Segment number -> Tracking UID of a SEG's segments."""
    return {int(s.SegmentNumber): str(s.TrackingUID) for s in seg.SegmentSequence}
