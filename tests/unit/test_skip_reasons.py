"""Skip notes to reason classes (issue 18): the bounded label the skip metric counts by.

The notes are made the way :func:`dicom_ai.runner.analysis.analyse` makes them: the scope gate's
own reasons (:meth:`ModelSpec.scope_problem` on headers it refuses) joined by ``_skip_note``,
so a change of the gate's wording that the classifier does not follow fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.inference.spec import ModelSpec, read_spec
from dicom_ai.runner.analysis import SKIP_REASONS, OutOfScopeError, _skip_note, skip_reasons

BUNDLED = Path(__file__).resolve().parents[2] / "dicom_ai/inference/bundled/chest-nodule/1.0.0"


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The bundled chest model with every check of the gate switched on."""
    return read_spec(BUNDLED).model_copy(update={
        "view_positions": ["PA", "AP"], "photometric_interpretations": ["MONOCHROME2"],
        "pixel_spacing_mm": (0.1, 0.5), "min_image_size": 256})


def header(**values: object) -> Dataset:
    """An in-scope chest CR header, with `values` changed."""
    ds = Dataset()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [0.2, 0.2]
    ds.Rows = ds.Columns = 1024
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(("values", "reason"), [
    ({"Modality": "MR"}, "modality"),
    ({"BodyPartExamined": "ANKLE"}, "body_part"),
    pytest.param({"BodyPartExamined": "knee (left)"}, "body_part",  # not a code string
                 marks=pytest.mark.filterwarnings("ignore:Invalid value for VR CS")),
    ({"ViewPosition": "LL"}, "view_position"),
    ({"PhotometricInterpretation": "RGB"}, "photometric"),
    ({"PixelSpacing": [0.05, 0.05]}, "pixel_spacing"),
    ({"Rows": 64}, "size"),
])
def test_each_check_of_the_gate_has_its_class(spec: ModelSpec, values: dict[str, object],
                                              reason: str) -> None:
    assert spec.scope_problem(header()) is None
    problem = spec.scope_problem(header(**values))
    assert problem is not None
    uid = generate_uid()
    whole = _skip_note(uid, 2, {problem: 2})
    part = _skip_note(uid, 3, {problem: 1})
    assert skip_reasons(whole) == skip_reasons(part) == [frozenset({reason})]
    # A job whose model took no series: the same classes behind "not applicable: ".
    assert skip_reasons(str(OutOfScopeError([whole]))) == [frozenset({reason})]


def test_no_pixel_spacing_and_several_series_and_reasons(spec: ModelSpec) -> None:
    header_only = header()
    del header_only.PixelSpacing
    no_spacing = spec.scope_problem(header_only)
    ankle = spec.scope_problem(header(BodyPartExamined="ANKLE"))
    small = spec.scope_problem(header(Rows=64))
    assert no_spacing is not None
    assert ankle is not None
    assert small is not None
    note = "; ".join([
        _skip_note(generate_uid(), 4, {ankle: 2, small: 1}),
        _skip_note(generate_uid(), 1, {no_spacing: 1}),
        # The preprocessing's refusal, with a library message that itself holds "; ".
        _skip_note(generate_uid(), 2, {"chest-nodule 1.0.0 cannot take it: bad LUT; "
                                       "photometric interpretation YBR_FULL here": 2},
                   unit="frames"),
    ])
    assert skip_reasons(note) == [frozenset({"body_part", "size"}),
                                  frozenset({"pixel_spacing"}),
                                  frozenset({"preprocessing"})]
    assert {c for classes in skip_reasons(note) for c in classes} <= set(SKIP_REASONS)


def test_anything_else_is_other_or_nothing() -> None:
    assert skip_reasons(None) == []
    assert skip_reasons("") == []
    # Not a skip note (a done job keeps nothing else there): no series counted.
    assert skip_reasons("cannot load the images: truncated") == []
    assert skip_reasons(f"series {generate_uid()} skipped: something new") == [
        frozenset({"other"})]
