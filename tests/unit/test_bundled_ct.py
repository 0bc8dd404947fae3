"""The bundled chest CT model: its recipe end to end (tiny), and the shipped model at work."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_ai.inference.runtime import load_predictor
from dicom_ai.inference.spec import read_spec
from dicom_ai.inference.volumes import analyse_volumes
from dicom_ai.training.bundled_ct import (
    MODEL_NAME,
    MODEL_VERSION,
    TARGET_SPACING,
    Recipe,
    build_ct_model,
)
from dicom_ai.training.synth import ChestCT, read_lesion_masks, synthesize
from dicom_ai.training.volume_metrics import match_lesions

SHIPPED = (Path(__file__).resolve().parents[2] / "dicom_ai" / "inference" / "bundled"
           / MODEL_NAME / MODEL_VERSION)


def test_the_recipe_runs_end_to_end(tmp_path: Path) -> None:
    """The recipe that made the shipped model, on a tiny budget, so it cannot rot."""
    summary = build_ct_model(tmp_path / "work", tmp_path / "bundled", Recipe.tiny())
    folder = tmp_path / "bundled" / MODEL_NAME / MODEL_VERSION
    predictor = load_predictor(folder)
    prep = predictor.spec.preprocessing
    assert (prep.input_kind, prep.slices_k, prep.normalization) == ("slices", 3, "none")
    assert prep.target_spacing == TARGET_SPACING
    assert predictor.spec.input_shape == (128, 128, 3)  # trained on 64, served on 128
    metrics = json.loads((folder / "report" / "test" / "metrics.json").read_text())
    assert metrics["studies"] == 2
    assert metrics["lesions"] == summary["metrics"]["lesions"]
    assert len(metrics["froc"]["sensitivity"]) == 7
    assert set(metrics["timings_s"]) >= {"load", "resample", "inference", "post"}
    assert (folder / "report" / "test" / "froc.png").stat().st_size > 1000
    card = (folder / "report" / "test" / "model_card.md").read_text()
    assert "not for clinical use" in card
    assert "Synthetic-only" in card
    assert "synthetic phantoms only" in read_spec(folder).provenance.notes.lower()
    saved = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert saved["recipe"]["train_seed"] != saved["recipe"]["test_seed"]
    assert saved["training"]["loss"]
    assert np.isfinite(saved["training"]["loss"][0])


def test_the_shipped_model_finds_the_lung_lesions_of_a_study(tmp_path: Path) -> None:
    """One small synthetic study through the serving path: its lung lesion found with a volume
    within the accuracy measured on the held-out studies, and no false lesion.

    The study (a 128 matrix, 3 mm slices, as the CT integration tests use) also holds a liver
    lesion: the shipped 1.0.0 misses low-contrast liver lesions (see its model card), so only
    the lung lesions are required here.
    """
    metrics = json.loads((SHIPPED / "report" / "test" / "metrics.json").read_text())
    options = replace(ChestCT.for_matrix(128), slices=(60, 120), slice_spacings=(3.0,),
                      lesions=(2, 3), lesion_diameter_mm=(10.0, 25.0))
    synthesize(tmp_path, studies=1, seed=83, modality="CT", positive_fraction=1.0,
               compress=False, chest_ct=options)
    files = sorted(tmp_path.rglob("*.dcm"))
    datasets = [dcmread(f, stop_before_pixels=True) for f in files]
    result = analyse_volumes([datasets], load_predictor(SHIPPED), seed="test", skipped=[],
                             timings={})
    assert result is not None
    [masks] = list((tmp_path / "masks").glob("*.npz"))
    truth = read_lesion_masks(masks)
    with (tmp_path / "lesions.csv").open(newline="") as fh:
        locations = [row["location"] for row in csv.DictReader(fh)]
    detections = np.zeros(truth.labels.shape, dtype=np.int32)
    found = [f for f in result.findings if f.present]
    for n, finding in enumerate(found, start=1):
        region = finding.region
        assert region is not None
        assert region.shape == truth.labels.shape
        box = tuple(slice(o, o + s) for o, s in zip(region.offset, region.mask.shape,
                                                    strict=True))
        detections[box][region.mask] = n
    case = match_lesions(truth.labels, detections, truth.spacing)
    lung = [t for t, where in zip(case.truth, locations, strict=True) if where == "lung"]
    assert lung
    assert all(t.detected for t in lung)
    assert not any(d.false_positive for d in case.detections)
    # Within the measured accuracy: three times the upper CI of the mean absolute error.
    bound = 3 * metrics["volume_error"]["abs_mean"]["ci_high"]
    for lesion in lung:
        assert lesion.detected_volume_mm3 is not None
        error = abs(lesion.detected_volume_mm3 - lesion.volume_mm3) / lesion.volume_mm3
        assert error <= bound, (lesion, bound)
        assert lesion.dice is not None
        assert lesion.dice > 0.5
    # Each reported lesion's own measurement (the SR's volume) is the one matched here.
    assert sum(f.region.volume_mm3 for f in found if f.region) == pytest.approx(
        sum(d.volume_mm3 for d in case.detections), rel=1e-6)
