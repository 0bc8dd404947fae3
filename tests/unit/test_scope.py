"""The model's scope gate and input unit (issue 18): which images a model takes, why it skips
the others, and how image decisions combine into a series or study decision.

Real synthetic CR files, the bundled chest-nodule spec, and a stand-in predictor whose output is
known (no TensorFlow): what is tested is the analysis around the network.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.inference.spec import ModelSpec, ModelSpecError, read_spec
from dicom_ai.reporting import build_sr, summarize_sr
from dicom_ai.runner.analysis import OutOfScopeError, analyse
from dicom_ai.training.synth import synthesize

BUNDLED = Path(__file__).resolve().parents[2] / "dicom_ai/inference/bundled/chest-nodule/1.0.0"


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return read_spec(BUNDLED)


@pytest.fixture(scope="module")
def cr_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("cr")
    synthesize(out, studies=3, seed=1818, modality="CR", positive_fraction=0.0,
               compress=False)
    return sorted(p for p in out.rglob("*.dcm") if "masks" not in p.parts)


class Constant:
    """A predictor stand-in: probability `values[i]` for the i-th image it is given."""

    def __init__(self, spec: ModelSpec, values: Sequence[float]) -> None:
        self.spec = spec
        self.values = list(values)
        self.batches: list[int] = []

    def predict(self, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        self.batches.append(len(inputs))
        return np.array(self.values[:len(inputs)], np.float32).reshape(-1, 1)


def one_study(files: Sequence[Path], out: Path, **per_series: dict[str, Any]) -> list[Path]:
    """`files` as the series of one study (the first file's), with `per_series` values set."""
    first = dcmread(files[0])
    paths = []
    for n, (path, values) in enumerate(zip(files, per_series.values(), strict=False)):
        ds = dcmread(path)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber"):
            setattr(ds, key, first[key].value)
        if n:
            ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
            ds.SeriesNumber = n + 1
        for key, value in values.items():
            setattr(ds, key, value)
        target = out / f"{n}.dcm"
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return paths


# -- the gate -----------------------------------------------------------------------------------
def header(**values: Any) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PhotometricInterpretation, ds.Rows, ds.Columns = "MONOCHROME1", 512, 480
    ds.ImagerPixelSpacing = [0.2, 0.2]
    with warnings.catch_warnings():  # pydicom warns of the invalid values real files carry
        warnings.simplefilter("ignore")
        for key, value in values.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
    return ds


def test_gate_names_the_attribute_and_the_models_values(spec: ModelSpec) -> None:
    narrow = spec.model_copy(update={
        "view_positions": ["PA", "AP"], "photometric_interpretations": ["MONOCHROME1",
                                                                        "MONOCHROME2"],
        "pixel_spacing_mm": (0.1, 0.5), "min_image_size": 256})
    assert narrow.scope_problem(header()) is None
    assert narrow.scope_problem(header(BodyPartExamined="chest ")) is None  # lower case
    assert narrow.scope_problem(header(BodyPartExamined=None)) is None  # unknown is not wrong
    assert narrow.scope_problem(header(BodyPartExamined="ANKLE")) == (
        "body part ANKLE: chest-nodule 1.0.0 applies to CHEST")
    assert narrow.scope_problem(header(Modality="CT")) == (
        "modality CT: chest-nodule 1.0.0 applies to CR, DX")
    assert narrow.scope_problem(header(Modality=None)) == (
        "modality none: chest-nodule 1.0.0 applies to CR, DX")
    assert narrow.scope_problem(header(ViewPosition="LL")) == (
        "view position LL: chest-nodule 1.0.0 applies to PA, AP")
    assert narrow.scope_problem(header(PhotometricInterpretation="RGB")) == (
        "photometric interpretation RGB: chest-nodule 1.0.0 applies to MONOCHROME1, MONOCHROME2")
    assert narrow.scope_problem(header(Rows=200)) == (
        "image 200 x 480: chest-nodule 1.0.0 needs at least 256 pixels a side")
    assert narrow.scope_problem(header(ImagerPixelSpacing=[0.05, 0.05])) == (
        "pixel spacing 0.05 x 0.05 mm: chest-nodule 1.0.0 applies to 0.1-0.5 mm")
    assert narrow.scope_problem(header(ImagerPixelSpacing=None)) == (
        "no pixel spacing: chest-nodule 1.0.0 applies to 0.1-0.5 mm")
    # Free text in a code string is not repeated (it could be anything a modality typed).
    assert narrow.scope_problem(header(BodyPartExamined="Knöchel links")) == (
        "body part another value: chest-nodule 1.0.0 applies to CHEST")


def test_spec_without_the_new_keys_stays_valid_and_bad_ranges_are_refused(
        spec: ModelSpec, tmp_path: Path) -> None:
    raw = json.loads((BUNDLED / "spec.json").read_text())
    for key in ("input_unit", "aggregate", "view_positions", "photometric_interpretations",
                "pixel_spacing_mm", "min_image_size"):
        assert key not in raw
    assert spec.input_unit == "image"
    assert spec.aggregate == "max"
    (tmp_path / "model.keras").write_bytes(b"")
    for bad in ({"pixel_spacing_mm": [0.5, 0.1]}, {"input_unit": "frame"},
                {"aggregate": "median"}, {"min_image_size": 0}):
        (tmp_path / "spec.json").write_text(json.dumps({**raw, **bad}))
        with pytest.raises(ModelSpecError, match=next(iter(bad))):
            read_spec(tmp_path)


# -- analyse over several series ----------------------------------------------------------------
def test_two_series_run_in_one_batch_with_a_study_decision_in_one_sr(
        spec: ModelSpec, cr_files: list[Path], tmp_path: Path) -> None:
    files = one_study(cr_files[:2], tmp_path, pa={}, lateral={"ViewPosition": "LL"})
    model = Constant(spec, [0.2, 0.9])
    analysis = analyse(files, model, seed="s", explain=False)  # type: ignore[arg-type]
    assert model.batches == [2]  # one batch, both images
    assert analysis.skipped == []
    findings = analysis.run.findings
    assert [(f.scope, round(f.probability, 4), f.present) for f in findings] == [
        ("image", 0.2, False), ("image", 0.9, True), ("study", 0.9, True)]
    assert set(findings[2].sop_instance_uids) == {f.sop_instance_uids[0] for f in findings[:2]}
    sr = build_sr(analysis.run, analysis.datasets, series_instance_uid=generate_uid(),
                  sop_instance_uid=generate_uid())
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence) == 2
    assert [len(g.source_sop_instance_uids) for g in summarize_sr(sr)] == [1, 1, 2]


@pytest.mark.parametrize(("unit", "aggregate", "series", "expected"), [
    ("series", "max", 2, [("series", 0.2), ("series", 0.9), ("study", 0.9)]),
    ("study", "mean", 2, [("study", 0.55)]),
    ("image", "mean", 2, [("image", 0.2), ("image", 0.9), ("study", 0.55)]),
    ("image", "max", 1, [("image", 0.2), ("image", 0.9)]),  # one series: its images only
    ("series", "max", 1, [("series", 0.9)]),
])
def test_input_unit_and_aggregate(spec: ModelSpec, cr_files: list[Path], tmp_path: Path,
                                  unit: str, aggregate: str, series: int,
                                  expected: list[tuple[str, float]]) -> None:
    same = {"SeriesInstanceUID": str(dcmread(cr_files[0]).SeriesInstanceUID)}
    files = one_study(cr_files[:2], tmp_path, pa={}, lateral={} if series == 2 else same)
    model_spec = spec.model_copy(update={"input_unit": unit, "aggregate": aggregate})
    analysis = analyse(files, Constant(model_spec, [0.2, 0.9]),  # type: ignore[arg-type]
                       seed="s", explain=False)
    got = [(f.scope, round(f.probability, 4)) for f in analysis.run.findings]
    assert got == expected


def test_out_of_scope_series_is_skipped_and_a_study_of_none_is_not_applicable(
        spec: ModelSpec, cr_files: list[Path], tmp_path: Path) -> None:
    files = one_study(cr_files, tmp_path, chest={}, ankle={"BodyPartExamined": "ANKLE"},
                      tiny={})
    ankle_series = str(dcmread(files[1]).SeriesInstanceUID)
    model = Constant(spec, [0.7])
    analysis = analyse(files[:2], model, seed="s", explain=False)  # type: ignore[arg-type]
    assert model.batches == [1]  # the ankle never reached the network
    assert [f.sop_instance_uids for f in analysis.run.findings] == [
        (str(dcmread(files[0]).SOPInstanceUID),)]
    assert analysis.skipped == [f"series {ankle_series} skipped: body part ANKLE: "
                                "chest-nodule 1.0.0 applies to CHEST"]
    with pytest.raises(OutOfScopeError) as raised:
        analyse(files[1:2], model, seed="s", explain=False)  # type: ignore[arg-type]
    assert str(raised.value) == ("not applicable: " + analysis.skipped[0])
