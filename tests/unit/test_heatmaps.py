"""Heat-maps that do not mislead: a fixed colour scale, a banner with the decision, regions.

* the service's Grad-CAM scale (``scale="probability"``) keeps negatives cold, where the
  per-image peak scale paints a full-strength spot on every image;
* the heat-map SC's burned-in banner states model, version, probability and decision (also in
  Image Comments), Burned In Annotation YES;
* a present finding is located by a region (TID 1410 SCOORD POLYLINE box) that overlaps the
  lesion and validates with dsrdump and dciodvfy, not by the peak point;
* localisation hit rates against synth lesion masks, and the model card's section;
* the route's ``heatmap_for`` setting (positive by default).

The bundled chest-nodule model runs on a few synthetic CR studies (seconds on 2 CPUs).
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from dicom_ai.config import Route
from dicom_ai.inference.explain import GradCam
from dicom_ai.inference.postprocess import heat_region
from dicom_ai.inference.runtime import Predictor, load_predictor
from dicom_ai.reporting import build_heatmap_capture, build_sr, summarize_sr
from dicom_ai.runner.analysis import analyse
from dicom_ai.training.dataset import load_inputs, read_samples
from dicom_ai.training.evaluate import localisation
from dicom_ai.training.localisation import localisation_report
from dicom_ai.training.report import write_model_card
from dicom_ai.training.synth import synthesize
from dicom_ai.values import Finding, HeatMap, ModelRun, PreprocessingSpec
from tests.conftest import need_binary
from tests.peers import REPO

BUNDLED = REPO / "dicom_ai" / "inference" / "bundled" / "chest-nodule" / "1.0.0"


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return load_predictor(BUNDLED)


@pytest.fixture(scope="module")
def explainer(predictor: Predictor) -> GradCam:
    return GradCam(predictor.model, scale="probability")  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight easy synthetic CR studies, four with nodules (masks under masks/)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, studies=8, seed=4242, modality="CR", positive_fraction=0.5, difficulty=0.3,
               compress=False)
    return out


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open() as fh:
        return list(csv.DictReader(fh))


def _path_of(folder: Path, sop_instance_uid: str) -> Path:
    for path in folder.rglob("*.dcm"):
        if str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) == sop_instance_uid:
            return path
    raise AssertionError(f"{sop_instance_uid} not found")


# -- the colour scale --------------------------------------------------------------------------
def test_probability_scale_keeps_negatives_cold(studies: Path, predictor: Predictor,
                                                explainer: GradCam) -> None:
    samples = read_samples(studies, studies / "labels.csv")
    inputs = np.asarray(load_inputs(samples, predictor.spec.preprocessing))
    probs = predictor.predict(inputs)[:, 0]
    labels = np.array([s.label for s in samples])
    fixed = explainer(inputs).max(axis=(1, 2))
    peak = GradCam(predictor.model).__call__(inputs).max(axis=(1, 2))  # type: ignore[attr-defined]
    # Per-image peak scaling paints a full-strength spot on every image, negatives included.
    np.testing.assert_allclose(peak[labels == 0], 1.0, rtol=1e-5)
    # The fixed scale's top is the model's probability: the negatives stay cold...
    np.testing.assert_allclose(fixed, probs, atol=1e-4)
    assert fixed[labels == 0].max() < 0.3, fixed
    # ... and a confident positive is hot.
    assert fixed[labels == 1].max() > 0.8, fixed


# -- the banner ----------------------------------------------------------------------------------
def _run(source: Any, probability: float, present: bool) -> ModelRun:
    from dicom_ai.values import CodedConcept

    finding = Finding(label="nodule", finding=CodedConcept(value="27925004", scheme="SCT",
                                                           meaning="Nodule"),
                      probability=probability, threshold=0.515, present=present,
                      sop_instance_uids=(str(source.SOPInstanceUID),), tracking_uid="2.25.1")
    return ModelRun(model_name="chest-nodule", model_version="1.0.0", task="classification",
                    study_instance_uid=str(source.StudyInstanceUID),
                    series_instance_uid=str(source.SeriesInstanceUID), findings=[finding],
                    heatmaps=[])


def test_banner_states_model_version_probability_and_decision(studies: Path,
                                                               tmp_path: Path) -> None:
    row = _rows(studies)[0]
    source = dcmread(_path_of(studies, row["SOPInstanceUID"]))
    shape = (int(source.Rows), int(source.Columns))
    heat = HeatMap(str(source.SOPInstanceUID), np.zeros(shape, np.float32),
                   np.full(shape, 0.5, np.float32))
    for probability, present, decision in ((0.873, True, "PRESENT"), (0.02, False, "ABSENT")):
        sc = build_heatmap_capture(heat, source, _run(source, probability, present),
                                   series_instance_uid="2.25.2", sop_instance_uid="2.25.3")
        text = str(sc.ImageComments)
        for part in ("NOT FOR DIAGNOSTIC USE", "chest-nodule", "1.0.0",
                     f"Nodule {decision} p={probability:.3f}", "threshold 0.515"):
            assert part in text, text
        assert sc.BurnedInAnnotation == "YES"
        path = tmp_path / f"{decision}.dcm"
        sc.save_as(path, enforce_file_format=True)
        pixels = dcmread(path).pixel_array
        banner = pixels[: pixels.shape[0] // 4]  # four lines of text on a small image
        # White text on black, and the legend's colour ramp (a saturated red among them).
        white = (banner == 255).all(axis=-1).sum()
        assert white > 100, white
        red = ((banner[..., 0] > 200) & (banner[..., 1] < 60) & (banner[..., 2] < 60)).sum()
        assert red > 0
        # Below the banner the image stays grey: a zero heat paints nothing.
        body = pixels[pixels.shape[0] // 2 :]
        assert (body[..., 0] == body[..., 1]).all()
        assert (body[..., 1] == body[..., 2]).all()


# -- regions -------------------------------------------------------------------------------------
def test_heat_region_is_the_box_around_the_peak() -> None:
    spec = PreprocessingSpec(input_shape=(64, 64), channels=1)
    rr, cc = np.mgrid[0:64, 0:64]
    heat = np.exp(-((rr - 20.0) ** 2 + (cc - 40.0) ** 2) / (2 * 4.0**2)).astype(np.float32)
    heat[50:54, 5:9] = 0.45  # a second, weaker blob: not part of the region
    region = heat_region(heat, spec, (256, 512))
    assert region is not None
    top, left, bottom, right = region.bbox
    # Half maximum of a sigma-4 Gaussian: input pixels 16..24 x 36..44 (edges 16..25 x 36..45),
    # x4 on rows and x8 on columns in the image.
    assert region.bbox == (64.0, 288.0, 100.0, 360.0)
    assert region.peak == (82.0, 324.0)
    assert region.area_pixels == pytest.approx((bottom - top) * (right - left))
    assert heat_region(np.zeros((64, 64), np.float32), spec, (64, 64)) is None
    with pytest.raises(ValueError, match="relative"):
        heat_region(heat, spec, (64, 64), relative=0.0)
    with pytest.raises(ValueError, match="expected"):
        heat_region(np.zeros((32, 32), np.float32), spec, (64, 64))


def _dsrdump_and_dciodvfy(path: Path) -> None:
    dump = subprocess.run([need_binary("dsrdump"), "-v", "+Pt", str(path)],
                          capture_output=True, text=True, check=False)
    assert dump.returncode == 0, dump.stdout + dump.stderr
    check = subprocess.run([need_binary("dciodvfy"), str(path)], capture_output=True,
                           text=True, check=False)
    errors = [line for line in (check.stdout + check.stderr).splitlines()
              if line.startswith("Error")]
    assert not errors, errors


def test_present_finding_is_a_region_over_the_lesion_that_validates(
        studies: Path, predictor: Predictor, explainer: GradCam, tmp_path: Path) -> None:
    rows = [r for r in _rows(studies) if r["label"] == "1"]
    checked = 0
    for row in rows:
        path = _path_of(studies, row["SOPInstanceUID"])
        analysis = analyse([path], predictor, seed=row["SOPInstanceUID"], explainer=explainer)
        (finding,) = analysis.run.findings
        if not finding.present:
            continue
        location = finding.location
        assert location is not None
        assert location.kind == "bbox", location
        assert location.bbox is not None
        assert location.point is not None
        top, left, bottom, right = (round(v) for v in location.bbox)
        mask = np.load(studies / row["mask_path"]) > 0
        assert mask[top:bottom, left:right].any(), "the region misses every lesion"
        assert (bottom - top) * (right - left) < 0.4 * mask.size, "a region of the whole image"
        sr = build_sr(analysis.run, analysis.datasets, series_instance_uid="2.25.99",
                      sop_instance_uid=f"2.25.100{checked}")
        out = tmp_path / f"sr{checked}.dcm"
        sr.save_as(out, enforce_file_format=True)
        _dsrdump_and_dciodvfy(out)
        (reported,) = summarize_sr(dcmread(out))
        assert reported.present
        assert reported.location_kind == "bbox"
        checked += 1
    assert checked >= 3, "the model found too few of the easy positives"


# -- hit rates -----------------------------------------------------------------------------------
def test_localisation_report_counts_region_and_point_hits() -> None:
    spec = PreprocessingSpec(input_shape=(32, 32), channels=1)
    rr, cc = np.mgrid[0:32, 0:32]
    heat = np.exp(-((rr - 10.0) ** 2 + (cc - 10.0) ** 2) / 18.0).astype(np.float32)
    on = np.zeros((32, 32), np.uint8)
    on[9:12, 9:12] = 1  # under the peak: point and region hit
    beside = np.zeros((32, 32), np.uint8)
    beside[13:15, 10:12] = 1  # off the peak, inside the half-maximum box: the region hits
    away = np.zeros((32, 32), np.uint8)
    away[28:31, 28:31] = 1  # far off: both miss
    result = localisation_report([heat, heat, heat], [on, beside, away], spec,
                                 mm_per_pixel=[2.0, 2.0, 2.0], positives=4)
    assert result["positives"] == 4
    assert result["true_positives"] == 3
    assert result["region_hit_rate"] == pytest.approx(2 / 3)
    assert result["point_hit_rate"] == pytest.approx(1 / 3)
    assert result["point_distance_mm_median"] == pytest.approx(6.0)  # 3 pixels x 2 mm
    assert result["point_distance_mm_max"] == pytest.approx(2.0 * np.hypot(18, 18))
    assert 0.0 < result["region_area_fraction_median"] < 0.2
    assert 0.0 <= result["region_hit_rate_random"] < result["region_hit_rate"]
    with pytest.raises(ValueError, match="lesion"):
        localisation_report([heat], [np.zeros((32, 32))], spec)


def test_hit_rate_on_synth_positives_and_in_the_model_card(
        studies: Path, predictor: Predictor, tmp_path: Path) -> None:
    samples = read_samples(studies, studies / "labels.csv")
    inputs = np.asarray(load_inputs(samples, predictor.spec.preprocessing))
    probs = predictor.predict(inputs)
    result = localisation(predictor, samples, inputs, probs)
    assert result is not None
    assert result["positives"] == 4
    assert result["true_positives"] >= 3
    assert result["region_hit_rate"] >= 0.75
    assert result["region_hit_rate"] >= result["point_hit_rate"]
    assert result["point_distance_mm_median"] is not None
    card = write_model_card(tmp_path, name="m", version="1", task="classification",
                            description="", intended_use="", training_data="",
                            metrics={"n": 8}, limitations=[], synthetic_only=True,
                            localisation=result)
    text = card.read_text()
    assert "## Localisation" in text
    assert f"| Region hit rate (box overlaps a lesion) | {100 * result['region_hit_rate']:.1f}%" \
        in text


def test_bundled_model_card_reports_localisation() -> None:
    card = (BUNDLED / "report" / "test" / "model_card.md").read_text()
    assert "## Localisation" in card
    assert "Peak-point hit rate" in card


# -- the route setting ---------------------------------------------------------------------------
def test_route_sends_heatmaps_for_positive_findings_by_default() -> None:
    route = Route(name="r", model="m", send_heatmap=True)
    assert route.heatmap_for == "positive"
    assert Route(name="r", model="m", heatmap_for="all").heatmap_for == "all"
    with pytest.raises(ValueError, match="heatmap_for"):
        Route(name="r", model="m", heatmap_for="absent")  # type: ignore[arg-type]
