"""Volume models in the job runner (issue 21): model input kinds ``volume`` (3D patches) and
``slices`` (2.5D) from the spec through :func:`dicom_ai.runner.analysis.analyse` to findings.

The fixture model is a fixed-weight Keras network built here, a "bright blob detector":
``sigmoid((v - 0.8) / 0.02)`` of the windowed input ``v`` (HU -1000..2000 to 0..1), so every
voxel above about 1400 HU is foreground. The study is a 64-matrix synthetic chest CT whose
ground-truth lesions are marked 2500 HU brighter in the pixel data (everything else is the
phantom's anatomy, bone included, all below 1000 HU): the lesions the runner finds must be the
ones ``lesions.csv`` lists, measured on the source slices.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_ai.config import Route, Settings, load_settings
from dicom_ai.inference.runtime import Predictor, load_predictor
from dicom_ai.inference.spec import ModelSpec, OutputLabel, read_spec, write_spec
from dicom_ai.ingest.spool import Ingestor, Received
from dicom_ai.pipeline.loading import Volume
from dicom_ai.pipeline.preprocessing import apply_voi, linear_window_of, normalize
from dicom_ai.pipeline.volume import (
    Grid,
    VolumeError,
    find_lesions,
    label_lesions,
    normalize_volume,
    volume_window,
    window_volume,
)
from dicom_ai.reporting import summarize_sr
from dicom_ai.runner.analysis import OutOfScopeError, analyse
from dicom_ai.runner.results import build_results, finding_row
from dicom_ai.runner.run import JobRunner
from dicom_ai.training.synth import ChestCT, read_lesion_masks, synthesize
from dicom_ai.values import CodedConcept, PreprocessingSpec
from storage import jobs
from storage.db import Database
from storage.filestore import FileStore
from storage.models import FindingRecord, Job, ResultObject

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras: Any = pytest.importorskip("keras")

BLOB = CodedConcept(value="27925004", scheme="SCT", meaning="Nodule")
#: HU added to the ground-truth lesion voxels: above any tissue of the phantom.
MARK_HU = 2500
#: The window of the fixture models: -1000..2000 HU to 0..1 (air and marked lesions saturate,
#: so the per-volume minmax normalisation keeps it as it is).
WINDOW = {"center": 500.0, "width": 3000.0}
#: sigmoid(SLOPE * v + BIAS): 0.5 at v = 0.8 (about 1400 HU).
SLOPE, BIAS = 50.0, -40.0
#: Fixed spacing for a 64-matrix phantom: 6 mm pixels, 2.5 mm slices, lesions of 15-30 mm.
CHEST = replace(ChestCT.for_matrix(64), pixel_spacing=(6.0, 6.0), slice_spacings=(2.5,),
                lesions=(2, 4), lesion_diameter_mm=(15.0, 30.0))


def _outputs(*names: str) -> list[OutputLabel]:
    return [OutputLabel(name=n, finding=BLOB) for n in names]


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict[str, str]],
                                                            Any]:
    """One positive chest CT series with its lesions marked, its lesions.csv rows and masks."""
    out = tmp_path_factory.mktemp("chest")
    synthesize(out, studies=1, seed=21, modality="CT", positive_fraction=1.0,
               compress=False, chest_ct=CHEST)
    with (out / "lesions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    masks = read_lesion_masks(out / rows[0]["mask_path"])
    files = sorted(out.glob(f"*/{rows[0]['SeriesInstanceUID']}/*.dcm"))
    slice_of = {uid: k for k, uid in enumerate(masks.sop_instance_uids)}
    for path in files:
        ds = pydicom.dcmread(path)
        inside = masks.labels[slice_of[str(ds.SOPInstanceUID)]] > 0
        if inside.any():
            arr = ds.pixel_array.astype(np.int32)
            arr[inside] += int(MARK_HU / float(ds.RescaleSlope))
            ds.PixelData = arr.astype(ds.pixel_array.dtype).tobytes()
            ds.save_as(path, enforce_file_format=True)
    return files, rows, masks


def _blob_folder(folder: Path, spec: ModelSpec) -> Path:
    """A model folder the registry loads: the detector as a 1x1(x1) convolution."""
    shape = spec.input_shape
    inputs = keras.Input(shape)
    if spec.input_kind == "volume":
        layer = keras.layers.Conv3D(len(spec.outputs), 1, activation="sigmoid")
        weights = np.zeros((1, 1, 1, 1, len(spec.outputs)), np.float32)
        weights[..., 0] = SLOPE
    else:  # 2.5D: the centre slice of the stack
        layer = keras.layers.Conv2D(len(spec.outputs), 1, activation="sigmoid")
        weights = np.zeros((1, 1, shape[-1], len(spec.outputs)), np.float32)
        weights[0, 0, shape[-1] // 2, 0] = SLOPE
    model = keras.Model(inputs, layer(inputs))
    # Output 0 is the detector; any other output stays near sigmoid(-12): never present.
    bias = np.full(len(spec.outputs), -12.0, np.float32)
    bias[0] = BIAS
    layer.set_weights([weights, bias])
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    write_spec(spec, folder)
    return folder


def _volume_spec(**changes: Any) -> ModelSpec:
    prep: dict[str, Any] = {
        "input_shape": (32, 32), "channels": 1, "window": WINDOW, "input_kind": "volume",
        "target_spacing": (3.0, 5.0, 5.0), "patch_size": (16, 32, 32), "overlap": 0.5}
    prep.update(changes.pop("preprocessing", {}))
    fields: dict[str, Any] = {"name": "blob-ct", "version": "1.0.0", "task": "segmentation",
                              "outputs": _outputs("blob", "never"), "modalities": ["CT"],
                              "preprocessing": PreprocessingSpec.model_validate(prep)}
    fields.update(changes)
    return ModelSpec(**fields)


@pytest.fixture(scope="module")
def volume_model(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    folder = _blob_folder(tmp_path_factory.mktemp("models") / "blob-ct", _volume_spec())
    return load_predictor(folder, batch_size=8)


def _match(found: Any, rows: list[dict[str, str]]) -> dict[str, str]:
    centroid = np.array(found.region.centroid)
    return min(rows, key=lambda r: float(np.linalg.norm(
        centroid - [float(r[f"centroid_{a}_mm"]) for a in "xyz"])))


# -- the spec ---------------------------------------------------------------------------------
def test_volume_specs_validate_round_trip_and_give_the_network_input(tmp_path: Path) -> None:
    spec = _volume_spec()
    assert spec.input_kind == "volume"
    assert spec.input_shape == (16, 32, 32, 1)
    assert spec.preprocessing.blend == "gaussian"
    assert spec.preprocessing.overlap == 0.5
    (tmp_path / "model.keras").write_bytes(b"")
    write_spec(spec, tmp_path)
    assert read_spec(tmp_path) == spec
    slices = _volume_spec(preprocessing={"input_kind": "slices", "patch_size": None,
                                         "slices_k": 5, "target_spacing": None})
    assert slices.input_shape == (32, 32, 5)
    image = ModelSpec(name="x", version="1", task="classification", outputs=_outputs("a"),
                      preprocessing=PreprocessingSpec(input_shape=(32, 32)))
    assert image.input_kind == "image"
    assert image.input_shape == (32, 32, 3)

    wrong: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({"input_kind": "image", "patch_size": None}, {}, "target_spacing needs input_kind"),
        ({"input_kind": "image", "target_spacing": None}, {}, "patch_size needs input_kind"),
        ({"target_spacing": None}, {}, "needs preprocessing.target_spacing"),
        ({"patch_size": None}, {}, r"needs preprocessing.patch_size"),
        ({"patch_size": (16, 32, 48)}, {}, "must end with input_shape"),
        ({"channels": 3}, {}, "needs channels = 1"),
        ({}, {"task": "classification"}, "needs task 'segmentation'"),
        ({"input_kind": "slices", "slices_k": 4}, {}, "patch_size needs input_kind 'volume'"),
        ({"input_kind": "slices", "slices_k": 4, "patch_size": None}, {}, "must be odd"),
    ]
    for prep, fields, message in wrong:
        with pytest.raises(ValidationError, match=message):
            _volume_spec(preprocessing=prep, **fields)
    for prep in ({"overlap": 1.0}, {"blend": "median"}, {"input_kind": "mesh"},
                 {"patch_size": (0, 32, 32)}):
        with pytest.raises(ValidationError):
            _volume_spec(preprocessing=prep)


# -- the runner -------------------------------------------------------------------------------
def test_a_3d_model_finds_the_phantoms_lesions_on_the_source_slices(
        chest: tuple[list[Path], list[dict[str, str]], Any], volume_model: Predictor) -> None:
    files, rows, masks = chest
    analysis = analyse(files, volume_model, seed="job-1", route="lung-ct")
    assert set(analysis.timings) >= {"load", "resample", "window", "inference", "post"}
    assert analysis.skipped == []
    assert {str(ds.SOPInstanceUID) for ds in analysis.datasets} == set(masks.sop_instance_uids)
    run = analysis.run
    present = [f for f in run.findings if f.present]
    absent = [f for f in run.findings if not f.present]
    assert len(present) == len(rows)
    # Segments 1..n largest first; the tracking identifier is the route, label and rank.
    assert [f.region.segment_number for f in present if f.region] == list(
        range(1, len(rows) + 1))
    assert [f.region.voxels for f in present if f.region] == sorted(
        (f.region.voxels for f in present if f.region), reverse=True)
    assert [f.region.tracking_id for f in present if f.region] == [
        f"lung-ct blob {n}" for n in range(1, len(rows) + 1)]
    matched = set()
    for finding in present:
        region = finding.region
        assert region is not None
        assert finding.scope == "series"
        assert finding.label == "blob"
        assert finding.probability >= 0.5
        row = _match(finding, rows)
        matched.add(row["lesion"])
        truth = masks.labels == int(row["lesion"])
        centroid = [float(row[f"centroid_{a}_mm"]) for a in "xyz"]
        assert np.linalg.norm(np.subtract(region.centroid, centroid)) < 3.0
        assert region.volume_mm3 == pytest.approx(float(row["volume_mm3"]), rel=0.25)
        assert region.longest_axial_diameter_mm == pytest.approx(
            float(row["longest_axial_diameter_mm"]), abs=2 * 6.0)
        # The mask sits on the source grid, cropped and placed by its offset.
        assert region.sop_instance_uids == tuple(masks.sop_instance_uids)
        assert region.shape == masks.labels.shape
        placed = np.zeros(region.shape, bool)
        s, r, c = region.offset
        placed[s:s + region.mask.shape[0], r:r + region.mask.shape[1],
               c:c + region.mask.shape[2]] = region.mask
        assert int(placed.sum()) == region.voxels
        dice = 2 * (placed & truth).sum() / (placed.sum() + truth.sum())
        assert dice > 0.75
        # Mean HU of the source voxels: the lesion's marked attenuation.
        assert region.mean_intensity is not None
        assert region.mean_intensity == pytest.approx(float(row["lesion_hu"]) + MARK_HU, abs=250)
        assert set(finding.sop_instance_uids) <= set(masks.sop_instance_uids)
        stored = finding_row(finding, run, {}, {})
        assert stored.location_kind == "volume"
        assert stored.present
        assert stored.segment_number == region.segment_number
        assert stored.series_instance_uid == region.series_instance_uid
        assert stored.sop_instance_uid == ""
        assert stored.location is not None
        assert stored.location["tracking_id"] == region.tracking_id
        assert stored.location["volume_mm3"] == pytest.approx(region.volume_mm3, abs=0.01)
        assert set(stored.location) >= {"longest_axial_diameter_mm", "centroid",
                                        "mean_intensity", "segment_number"}
    assert matched == {r["lesion"] for r in rows}
    # The label that found nothing: one absent study finding.
    assert [(f.label, f.scope) for f in absent] == [("never", "study")]
    assert absent[0].probability < 0.01
    assert absent[0].region is None
    assert finding_row(absent[0], run, {}, {}).location_kind is None

    # A superseding run (another job, same study and route): the same lesions keep their
    # tracking identifiers and UIDs.
    again = analyse(files, volume_model, seed="job-2", route="lung-ct").run
    assert [(f.region.tracking_id if f.region else "", f.tracking_uid)
            for f in again.findings if f.present] == [
        (f.region.tracking_id if f.region else "", f.tracking_uid) for f in present]


def test_a_2_5d_model_finds_the_same_lesions(
        chest: tuple[list[Path], list[dict[str, str]], Any], tmp_path: Path) -> None:
    files, rows, _ = chest
    spec = _volume_spec(outputs=_outputs("blob"), preprocessing={
        "input_kind": "slices", "patch_size": None, "slices_k": 3, "target_spacing": None})
    predictor = load_predictor(_blob_folder(tmp_path / "blob-25d", spec))
    analysis = analyse(files, predictor, seed="job", route="r")
    found = [f for f in analysis.run.findings if f.present]
    assert len(found) == len(rows) == len(analysis.run.findings)
    for finding in found:
        assert finding.region is not None
        row = _match(finding, rows)
        # On the series' own grid (no target_spacing): the marked voxels exactly.
        assert finding.region.voxels == int(row["voxels"])
    # The results: a multi-frame SEG with one segment per lesion and an SR whose TID 1411
    # groups give each lesion's volume and reference its segment.
    settings = Settings()
    route = Route(name="r", model="blob-ct", destinations=["pacs"], send_seg=True)
    results, heatmaps = build_results(analysis, route, settings, store_root=tmp_path, job_id=1,
                                      seed="s", previous=[])
    assert heatmaps == {}
    assert [r.kind for r in results] == ["sr", "seg"]
    seg = hd.seg.segread(tmp_path / results[1].path)
    assert len(seg.SegmentSequence) == len(found)
    reported = summarize_sr(pydicom.dcmread(tmp_path / results[0].path))
    by_segment = {r.segment_number: r for r in reported if r.segment_number is not None}
    assert sorted(by_segment) == list(range(1, len(found) + 1))
    for finding in found:
        assert finding.region is not None
        got = by_segment[finding.region.segment_number]
        assert got.segmentation_sop_instance_uid == str(seg.SOPInstanceUID)
        assert got.volume_mm3 == pytest.approx(finding.region.volume_mm3, rel=1e-3)


def test_a_series_that_is_not_a_volume_is_skipped_with_its_reason(
        chest: tuple[list[Path], list[dict[str, str]], Any], volume_model: Predictor,
        tmp_path: Path) -> None:
    """Where serving once refused every volume model, a series it cannot take is skipped."""
    files, _, _ = chest
    with pytest.raises(OutOfScopeError, match="a single slice is not a volume"):
        analyse(files[:1], volume_model, seed="s")
    flat = []
    for n, path in enumerate(files[:3]):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        flat.append(tmp_path / f"{n}.dcm")
        ds.save_as(flat[-1], enforce_file_format=True)
    with pytest.raises(OutOfScopeError, match="without Image Position"):
        analyse(flat, volume_model, seed="s")


# -- the volume core's in-place steps the runner uses -----------------------------------------
def test_window_normalise_and_label_volumes_in_place() -> None:
    rng = np.random.default_rng(5)
    hu = rng.uniform(-1200.0, 2500.0, (20, 16, 16)).astype(np.float32)
    expected = apply_voi(hu, Dataset(), window=(500.0, 3000.0))
    windowed = window_volume(hu, (500.0, 3000.0))
    assert windowed is hu  # in place: no float64 or second float32 volume
    np.testing.assert_allclose(windowed, expected, atol=1e-6)
    for mode in ("minmax", "zscore", "none"):
        values = rng.normal(40.0, 300.0, (20, 16, 16)).astype(np.float32)
        reference = normalize(values, mode)
        np.testing.assert_allclose(normalize_volume(values, mode), reference, atol=1e-5)
    # `none` maps every volume the same way: a scan with nothing bright is not stretched.
    dim = window_volume(np.full((3, 8, 8), -900.0, np.float32), (-600.0, 1500.0))
    assert float(normalize_volume(dim.copy(), "none").max()) == pytest.approx(float(dim.max()))
    assert not normalize_volume(np.full((3, 8, 8), 7.0, np.float32), "minmax").any()
    with pytest.raises(VolumeError, match="imagenet"):
        normalize_volume(values, "imagenet")

    grid = Grid((12, 12, 12), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0))
    values = np.zeros(grid.shape, np.float32)
    values[1:3, 1:3, 1:3] = 0.9    # 8 voxels
    values[5:9, 5:9, 5:9] = 0.8    # 64 voxels: the largest, label 1
    values[10, 10, 10] = 0.7       # one voxel: under min_voxels, dropped
    labels, lesions = label_lesions(values, grid, min_voxels=2)
    assert [le.voxels for le in lesions] == [64, 8]
    assert lesions == find_lesions(values, grid, min_voxels=2)
    assert labels is not None
    assert sorted(np.unique(labels)) == [0, 1, 2]
    for lesion in lesions:
        box = tuple(slice(a, b) for a, b in lesion.bbox)
        assert int((labels[box] == lesion.label).sum()) == lesion.voxels


def test_the_job_runner_stores_volume_findings_and_keeps_their_tracking_across_runs(
        chest: tuple[list[Path], list[dict[str, str]], Any], tmp_path: Path) -> None:
    """A job through :class:`JobRunner` (SQLite index, the model from the registry): one row
    per lesion with its volume location, the same tracking in a superseding job, a SEG and an SR
    stored with each job."""
    files, rows, _ = chest
    settings = load_settings(None, storage={
        "root": tmp_path / "store", "database_url": f"sqlite:///{tmp_path / 'index.sqlite3'}",
        "min_free_bytes": 0, "results_min_free_bytes": 0},
        routes=[{"name": "lung-ct", "match": {"Modality": ["CT"]}, "model": "blob-ct"}])
    store = FileStore(settings.storage.root)
    db = Database(settings.storage.url)
    db.upgrade()
    try:
        _blob_folder(settings.storage.root / "models" / "blob-ct" / "1.0.0", _volume_spec())
        ingestor = Ingestor(store, db, settings.storage)
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            incoming = store.new_incoming_path()
            shutil.copyfile(path, incoming)
            assert ingestor.ingest(Received(incoming, str(ds.SOPClassUID),
                                            str(ds.SOPInstanceUID), "CT")) == 0x0000
        runner = JobRunner(settings, owner="w", db=db)
        stored: list[list[FindingRecord]] = []
        for _ in range(2):  # the second job of the study and route supersedes the first
            with db.write_session() as session:
                job_id = jobs.create_job(
                    session, study_instance_uid=rows[0]["StudyInstanceUID"],
                    series_instance_uids=[rows[0]["SeriesInstanceUID"]], route="lung-ct",
                    model_name="blob-ct", max_attempts=1, event_id=None,
                    now=datetime.now(UTC)).id
            assert runner.run(job_id) == "done"
            with db.sessions() as session:
                job = session.get(Job, job_id)
                assert job is not None
                assert {"load", "resample", "window", "inference", "post"} <= set(job.timings)
                found = list(session.scalars(select(FindingRecord).where(
                    FindingRecord.job_id == job_id).order_by(FindingRecord.ordinal)))
                kinds = sorted(r.kind for r in session.scalars(select(ResultObject).where(
                    ResultObject.job_id == job_id)))
                assert kinds == ["seg", "sr"]
                session.expunge_all()
            stored.append(found)
    finally:
        db.dispose()
    first, second = stored
    lesions = [f for f in first if f.present]
    assert len(lesions) == len(rows)
    for n, row in enumerate(lesions, start=1):
        assert row.location_kind == "volume"
        assert row.segment_number == n
        assert row.location is not None
        assert row.location["tracking_id"] == f"lung-ct blob {n}"
        assert row.location["segment_number"] == n
        assert row.location["volume_mm3"] > 0
        assert len(row.location["centroid"]) == 3
        assert row.series_instance_uid == rows[0]["SeriesInstanceUID"]
    assert [(f.label, f.present) for f in first if not f.present] == [("never", False)]
    assert [f.tracking_uid for f in second if f.present] == [f.tracking_uid for f in lesions]


# -- the window a volume model applies (one rule with the 2D path) ----------------------------
def _header(**values: Any) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def _one_slice_volume(ds: Dataset) -> Volume:
    return Volume(array=np.zeros((2, 8, 8), np.int16), spacing=(1.0, 1.0, 1.0),
                  origin=(0.0, 0.0, 0.0), orientation=(1, 0, 0, 0, 1, 0),
                  sop_instance_uids=["1", "2"], frame_indices=[0, 0], datasets=[ds, ds])


def test_volume_and_2d_paths_read_the_dataset_window_by_one_rule() -> None:
    """:func:`linear_window_of` is the one reader of a dataset's window; the volume path differs
    only on a VOI LUT Sequence (ignored, its LINEAR window used). SIGMOID and widths below 1
    give no window on both paths (the runner's own copy used to apply them as LINEAR)."""
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]
    lut.LUTData = [0, 80, 160, 255]
    plain = _header(WindowCenter="40", WindowWidth="400")
    multi = _header(WindowCenter=["-600", "40"], WindowWidth=["1500", "400"])
    sigmoid = _header(WindowCenter="40", WindowWidth="400", VOILUTFunction="SIGMOID")
    exact = _header(WindowCenter="40", WindowWidth="400", VOILUTFunction="LINEAR_EXACT")
    narrow = _header(WindowCenter="40", WindowWidth="0.5")
    garbled = _header(WindowCenter="40", WindowWidth="")
    with_lut = _header(WindowCenter="40", WindowWidth="400", VOILUTSequence=[lut])
    only_lut = _header(VOILUTSequence=[lut])
    cases = [  # (header, 2D, volume)
        (plain, (40.0, 400.0), (40.0, 400.0)),
        (multi, (-600.0, 1500.0), (-600.0, 1500.0)),
        (sigmoid, None, None),
        (exact, None, None),
        (narrow, None, None),
        (garbled, None, None),
        (with_lut, None, (40.0, 400.0)),
        (only_lut, None, None),
        (Dataset(), None, None),
    ]
    for ds, flat, volume in cases:
        assert linear_window_of(ds) == flat, ds
        assert linear_window_of(ds, volume=True) == volume, ds
        assert volume_window(_one_slice_volume(ds), None) == volume, ds
        # The spec's window always wins.
        assert volume_window(_one_slice_volume(ds), (500.0, 3000.0)) == (500.0, 3000.0)
    assert linear_window_of(None) is None


def test_a_sigmoid_ct_window_leaves_the_volume_in_hu(
        chest: tuple[list[Path], list[dict[str, str]], Any]) -> None:
    """What the runner feeds the model when the slices' only window is SIGMOID: HU as they are
    (then the spec's normalisation), not a LINEAR reading of the sigmoid's centre and width."""
    files, _, _ = chest
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in files[:4]]
    for ds in datasets:
        ds.VOILUTFunction = "SIGMOID"
    volume = _one_slice_volume(datasets[0])
    assert volume_window(volume, None) is None
    datasets[0].VOILUTFunction = "LINEAR"
    assert volume_window(_one_slice_volume(datasets[0]), None) == (
        float(datasets[0].WindowCenter), float(datasets[0].WindowWidth))
