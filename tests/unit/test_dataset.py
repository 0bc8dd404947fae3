"""Training data: labels joined with DICOM files, patient-level split, serving-identical inputs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_ai.pipeline.preview import model_inputs
from dicom_ai.training.dataset import (
    DatasetError,
    Sample,
    load_inputs,
    load_masks,
    read_samples,
    split_by_patient,
)
from dicom_ai.training.synth import synthesize
from dicom_ai.values import PreprocessingSpec


@pytest.fixture(scope="module")
def cr_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cr")
    synthesize(out, studies=8, seed=21, modality="CR", positive_fraction=0.5)
    return out


def test_read_samples_joins_labels_with_files(cr_set: Path) -> None:
    samples = read_samples(cr_set, cr_set / "labels.csv")
    assert len(samples) == 8
    assert sum(s.label for s in samples) == 4
    for sample in samples:
        ds = pydicom.dcmread(sample.path, stop_before_pixels=True)
        assert sample.sop_instance_uid == ds.SOPInstanceUID
        assert sample.patient_key == ds.PatientID
        assert sample.modality == "CR"
        assert (sample.mask_path is not None) == bool(sample.label)


def write_labels(path: Path, rows: list[dict[str, str]], fields: list[str]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_bad_labels_are_refused_with_the_reason(cr_set: Path, tmp_path: Path) -> None:
    with open(cr_set / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    uid = rows[0]["SOPInstanceUID"]
    with pytest.raises(DatasetError, match="lacks column"):
        read_samples(cr_set, write_labels(tmp_path / "a.csv", [{"SOPInstanceUID": uid}],
                                          ["SOPInstanceUID"]))
    with pytest.raises(DatasetError, match="label must be 0 or 1"):
        read_samples(cr_set, write_labels(tmp_path / "b.csv",
                                          [{"SOPInstanceUID": uid, "label": "yes"}],
                                          ["SOPInstanceUID", "label"]))
    with pytest.raises(DatasetError, match="1 of 1 labelled instances are not under"):
        read_samples(cr_set, write_labels(tmp_path / "c.csv",
                                          [{"SOPInstanceUID": "1.2.3", "label": "1"}],
                                          ["SOPInstanceUID", "label"]))
    with pytest.raises(DatasetError, match="does not exist"):
        read_samples(cr_set, tmp_path / "missing.csv")


def fake(patient: str, label: int, n: int = 1) -> list[Sample]:
    return [Sample(Path(f"/x/{patient}-{i}"), f"{patient}.{i}", f"s.{patient}", "se", patient,
                   label, None, "CR", "CHEST") for i in range(n)]


def test_split_never_puts_a_patient_on_both_sides() -> None:
    samples = [s for p in range(30) for s in fake(f"p{p}", p % 2, n=1 + p % 3)]
    train, val = split_by_patient(samples, val_fraction=0.25, seed=4)
    assert {s.patient_key for s in train}.isdisjoint({s.patient_key for s in val})
    assert len(train) + len(val) == len(samples)
    assert {s.label for s in val} == {0, 1}
    assert {s.label for s in train} == {0, 1}
    assert 0.15 < len(val) / len(samples) < 0.4
    again = split_by_patient(samples, val_fraction=0.25, seed=4)
    assert [s.sop_instance_uid for s in again[1]] == [s.sop_instance_uid for s in val]
    with pytest.raises(DatasetError, match="at least two patients"):
        split_by_patient(fake("only", 1, n=5))


def test_training_inputs_are_bit_identical_to_serving_inputs(cr_set: Path,
                                                             tmp_path: Path) -> None:
    """The same file gives the same bytes through training (cached) and serving."""
    spec = PreprocessingSpec(input_shape=(64, 64), channels=1)
    samples = read_samples(cr_set, cr_set / "labels.csv")
    trained = load_inputs(samples, spec, cache=tmp_path / "cache")
    again = load_inputs(samples, spec, cache=tmp_path / "cache")  # read back from the cache
    for i, sample in enumerate(samples):
        served, _ = model_inputs([sample.path], spec)
        assert served[0].dtype == np.float32
        assert trained[i].tobytes() == served[0].tobytes()
        assert again[i].tobytes() == served[0].tobytes()
    # A whole series folder through serving gives the same arrays as file by file.
    series = sorted(samples[0].path.parent.glob("*.dcm"))
    served_series, _ = model_inputs(series, spec)
    assert served_series[0].tobytes() == trained[0].tobytes()


def test_masks_follow_the_image_geometry(cr_set: Path) -> None:
    spec = PreprocessingSpec(input_shape=(64, 64), channels=1)
    samples = read_samples(cr_set, cr_set / "labels.csv")
    masks = load_masks(samples, spec)
    assert masks.shape == (8, 64, 64, 1)
    assert set(np.unique(masks).tolist()) <= {0.0, 1.0}
    for sample, mask in zip(samples, masks, strict=True):
        assert bool(mask.any()) == bool(sample.label)
