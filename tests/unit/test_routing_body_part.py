"""Body Part Examined of enhanced objects, for routes and the model scope gate (issue 21).

A Legacy Converted Enhanced CT Image made by highdicom from a synthetic chest CT series whose
slices say ``BodyPartExamined = CHEST`` keeps no Body Part Examined: only the anatomic region
code of its Frame Anatomy functional group (SCT 816094009 "Chest"). A route on
``BodyPartExamined`` and a model's ``body_parts`` must treat it as its slices are treated.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.inference.spec import ModelSpec, OutputLabel
from dicom_ai.routing import (
    BODY_PART_CODES,
    MatchSpec,
    body_parts_examined,
    evaluate_file,
    header_values,
)
from dicom_ai.training.synth import ChestCT, synthesize
from dicom_ai.values import CodedConcept, PreprocessingSpec

#: A small chest CT: 32 x 32 slices, 10 mm apart.
SMALL = replace(ChestCT.for_matrix(32), pixel_spacing=(10.0, 10.0), slice_spacings=(10.0,),
                slices=(20, 24), lesions=(1, 1), lesion_diameter_mm=(20.0, 30.0))
ROUTES: list[tuple[str, MatchSpec]] = [
    ("chest-ct", {"Modality": "CT", "BodyPartExamined": "CHEST"}),
    ("abdomen-ct", {"Modality": "CT", "BodyPartExamined": ["ABDOMEN", "ABDOMENPELVIS"]}),
]


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("chest-ct")
    synthesize(out, studies=1, seed=3, modality="CT", positive_fraction=1.0, compress=False,
               chest_ct=SMALL)
    return sorted(out.glob("*/*/*.dcm"))


def converted(files: list[Path], out: Path, body_part: str | None = None) -> Path:
    """A Legacy Converted Enhanced CT of `files` (with their BodyPartExamined replaced)."""
    datasets = [dcmread(p) for p in files]
    for ds in datasets:
        if body_part is not None:
            ds.BodyPartExamined = body_part
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=generate_uid(), series_number=7,
        sop_instance_uid=generate_uid(), instance_number=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(out, enforce_file_format=True)
    return out


def ct_spec(*body_parts: str) -> ModelSpec:
    prep = PreprocessingSpec(input_shape=(32, 32), channels=1, input_kind="volume",
                             target_spacing=(3.0, 3.0, 3.0), patch_size=(16, 32, 32))
    return ModelSpec(name="ct-model", version="1.0.0", task="segmentation",
                     outputs=[OutputLabel(name="nodule", finding=CodedConcept(
                         value="27925004", scheme="SCT", meaning="Nodule"))],
                     modalities=["CT"], body_parts=list(body_parts), preprocessing=prep)


def test_highdicom_keeps_the_body_part_only_as_a_frame_anatomy_code(
        slices: list[Path], tmp_path: Path) -> None:
    """What the rule reads: no Body Part Examined anywhere, SCT 816094009 in Frame Anatomy."""
    assert dcmread(slices[0], stop_before_pixels=True).BodyPartExamined == "CHEST"
    ds = dcmread(converted(slices, tmp_path / "mf.dcm"), stop_before_pixels=True)
    assert "BodyPartExamined" not in ds
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert all("BodyPartExamined" not in item for macro in shared if macro.VR == "SQ"
               for item in macro.value)
    code = shared.FrameAnatomySequence[0].AnatomicRegionSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("816094009", "SCT")
    assert BODY_PART_CODES[code.CodeValue] == "CHEST"
    assert body_parts_examined(ds) == ["CHEST"]


def test_a_route_on_body_part_matches_the_converted_object(
        slices: list[Path], tmp_path: Path) -> None:
    chest = converted(slices, tmp_path / "chest.dcm")
    abdomen = converted(slices, tmp_path / "abdomen.dcm", body_part="ABDOMEN")
    for path, expected in ((slices[0], "chest-ct"), (chest, "chest-ct"),
                           (abdomen, "abdomen-ct")):
        results = evaluate_file(ROUTES, path)
        assert [r.route for r in results if r.matched] == [expected], path.name
    reason = next(r for r in evaluate_file(ROUTES, chest) if r.route == "abdomen-ct").reason
    assert reason.startswith("BodyPartExamined 'CHEST' ~ ['ABDOMEN', 'ABDOMENPELVIS']: no")


def test_the_scope_gate_reads_the_code_too(slices: list[Path], tmp_path: Path) -> None:
    chest = dcmread(converted(slices, tmp_path / "chest.dcm"), stop_before_pixels=True)
    head = dcmread(converted(slices, tmp_path / "head.dcm", body_part="HEAD"),
                   stop_before_pixels=True)
    assert ct_spec("CHEST").scope_problem(chest) is None
    assert ct_spec("chest", "LUNG").scope_problem(chest) is None  # case-insensitive, as before
    # A head CT converted the same way is refused by a chest model, as its slices are.
    problem = ct_spec("CHEST").scope_problem(head)
    assert problem == "body part HEAD: ct-model 1.0.0 applies to CHEST"
    assert ct_spec("CHEST").scope_problem(dcmread(slices[0], stop_before_pixels=True)) is None
    assert ct_spec().scope_problem(head) is None  # no body_parts: any


def test_codes_of_older_tables_and_unknown_codes() -> None:
    """An older converter's SRT 51185008 "Thorax" is CHEST; a code outside the table names no
    body part (not held against the image, never matching a route); the top level wins."""
    def coded(value: str, scheme: str, *, frame: bool = False) -> Dataset:
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator = value, scheme
        region.CodeMeaning = "x"
        anatomy = Dataset()
        anatomy.AnatomicRegionSequence = [region]
        group = Dataset()
        group.FrameAnatomySequence = [anatomy]
        ds = Dataset()
        ds.Modality = "CT"
        if frame:
            ds.PerFrameFunctionalGroupsSequence = [group, group]
        else:
            ds.SharedFunctionalGroupsSequence = [group]
        return ds

    assert body_parts_examined(coded("51185008", "SRT")) == ["CHEST"]
    assert body_parts_examined(coded("816092008", "SCT", frame=True)) == ["PELVIS"]
    assert body_parts_examined(coded("816094009", "LN")) == []  # not SNOMED: another code
    unknown = coded("123456789", "SCT")
    assert body_parts_examined(unknown) == []
    assert header_values(unknown, ["BodyPartExamined"]) == {"BodyPartExamined": None}
    assert ct_spec("CHEST").scope_problem(unknown) is None
    written = coded("816092008", "SCT")
    written.BodyPartExamined = "CHEST"
    assert body_parts_examined(written) == ["CHEST"]
    written.BodyPartExamined = ""  # an empty written value: the code speaks
    assert header_values(written, ["BodyPartExamined"]) == {"BodyPartExamined": ["PELVIS"]}
    assert header_values(Dataset(), ["BodyPartExamined"]) == {"BodyPartExamined": None}
    empty = Dataset()
    empty.BodyPartExamined = ""
    assert header_values(empty, ["BodyPartExamined"]) == {"BodyPartExamined": [""]}
