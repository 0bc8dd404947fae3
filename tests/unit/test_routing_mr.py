"""Routing a multi-series MR study per series, and enhanced multi-frame MR as one volume (issue 21).

A brain-like MR study is built from synth's single-series MR by copying and retagging: a
localizer, T1, T2 and FLAIR axials with realistic sequence attributes (Scanning Sequence,
Sequence Variant, TE/TR/TI, MR Acquisition Type 2D). Routes on SeriesDescription and on sequence
attributes must pick exactly their series; a multi-valued Scanning Sequence (``SE\\IR``) matches
a route naming any one of its values. An enhanced (Legacy Converted Enhanced MR) object made
from the T1 series with highdicom is indexed as one instance, matched on attributes that live in
its functional groups, and loads as the same volume as the single-frame series.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.ingest.index import parse_received
from dicom_ai.pipeline.loading import load_volume
from dicom_ai.routing import MatchSpec, RouteMatch, evaluate, evaluate_file, header_values
from dicom_ai.training.synth import synthesize

#: Sequence attributes of each series of the study, as a 1.5/3 T brain protocol writes them.
PROTOCOL: dict[str, dict[str, Any]] = {
    "LOC": {"SeriesDescription": "LOCALIZER", "ScanningSequence": "GR",
            "SequenceVariant": "SP", "ScanOptions": "", "SequenceName": "*fl2d1",
            "EchoTime": "1.54", "RepetitionTime": "8.6", "FlipAngle": "20",
            "EchoTrainLength": "1"},
    "T1": {"SeriesDescription": "T1 AX", "ScanningSequence": "SE",
           "SequenceVariant": ["SK", "SP"], "ScanOptions": "", "SequenceName": "se2d1",
           "EchoTime": "14.000", "RepetitionTime": "550", "FlipAngle": "90",
           "EchoTrainLength": "1"},
    "T2": {"SeriesDescription": "T2 AX", "ScanningSequence": "SE",
           "SequenceVariant": ["SK", "SP", "OSP"], "ScanOptions": "",
           "SequenceName": "*tse2d1_15", "EchoTime": "95", "RepetitionTime": "4000",
           "FlipAngle": "150", "EchoTrainLength": "15"},
    "FLAIR": {"SeriesDescription": "FLAIR AX", "ScanningSequence": ["SE", "IR"],
              "SequenceVariant": ["SK", "SP", "MP", "OSP"], "ScanOptions": "IR",
              "SequenceName": "*tir2d1_16", "EchoTime": "81", "RepetitionTime": "9000",
              "InversionTime": "2500", "FlipAngle": "150", "EchoTrainLength": "16"},
}

#: Routes a user writes for such a study (see README "Routes").
ROUTES: list[tuple[str, MatchSpec]] = [
    ("t2", {"Modality": "MR", "SeriesDescription": "*T2*"}),
    ("flair", {"Modality": "MR", "ScanningSequence": "IR"}),
    ("t1", {"Modality": "MR", "ScanningSequence": "SE", "EchoTime": "14"}),
]


def mr_brain_study(source: Path, out: Path, *, localizer_slices: int = 3) -> dict[str, list[Path]]:
    """A four-series MR study (localizer, T1, T2, FLAIR) from synth's MR series in `source`.

    Each series is a copy of the synthetic slices with fresh series and instance UIDs, its
    series number and the attributes of :data:`PROTOCOL`; the localizer keeps only its first
    `localizer_slices` slices. Returns the written files by series key.
    """
    originals = sorted(source.glob("*/*/*.dcm"),
                       key=lambda p: int(dcmread(p, stop_before_pixels=True).InstanceNumber))
    written: dict[str, list[Path]] = {}
    for number, (name, values) in enumerate(PROTOCOL.items(), start=1):
        series_uid = generate_uid()
        slices = originals[:localizer_slices] if name == "LOC" else originals
        for original in slices:
            ds = dcmread(original)  # a fresh copy (copies share elements, docs/notes.md)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = number
            ds.StudyDescription = "MR BRAIN"
            ds.BodyPartExamined = "BRAIN"
            for key, value in values.items():
                setattr(ds, key, value)
            path = out / name / f"{int(ds.InstanceNumber):03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            written.setdefault(name, []).append(path)
    return written


def enhanced_from(files: list[Path], out: Path, *, series_number: int = 5,
                  description: str = "T1 AX MF") -> Path:
    """A Legacy Converted Enhanced MR Image of the single-frame `files` (one series)."""
    datasets = [dcmread(p) for p in files]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1)
    enhanced.SeriesDescription = description
    out.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The four series, plus ``"T1_MF"``: the T1 series as one enhanced multi-frame object."""
    source = tmp_path_factory.mktemp("synth-mr")
    synthesize(source, studies=1, seed=11, modality="MR", compress=False)
    out = tmp_path_factory.mktemp("mr-study")
    files = mr_brain_study(source, out)
    files["T1_MF"] = [enhanced_from(files["T1"], out / "T1_MF" / "enhanced.dcm")]
    return files


def route_hits(path: Path, routes: list[tuple[str, MatchSpec]] = ROUTES) -> list[str]:
    """The names of the routes whose match a file's header satisfies."""
    return [r.route for r in evaluate_file(routes, path) if r.matched]


def result_of(results: list[RouteMatch], name: str) -> RouteMatch:
    """One route's result."""
    (found,) = [r for r in results if r.route == name]
    return found


# -- single-frame series -------------------------------------------------------------------------
def test_each_series_goes_to_exactly_its_route(study: dict[str, list[Path]]) -> None:
    hits = {name: route_hits(files[0]) for name, files in study.items() if name != "T1_MF"}
    assert hits == {"LOC": [], "T1": ["t1"], "T2": ["t2"], "FLAIR": ["flair"]}
    # Every slice of a series answers the same (routing reads one file per series).
    for name in ("T1", "T2", "FLAIR"):
        assert {tuple(route_hits(p)) for p in study[name]} == {(name.lower(),)}


def test_unrouted_localizer_reason_names_each_failing_key(study: dict[str, list[Path]]) -> None:
    results = evaluate_file(ROUTES, study["LOC"][0])
    assert not any(r.matched for r in results)
    assert result_of(results, "t2").reason.startswith(
        "SeriesDescription 'LOCALIZER' ~ '*T2*': no")
    assert result_of(results, "flair").reason.startswith("ScanningSequence 'GR' ~ 'IR': no")
    t1 = result_of(results, "t1").reason
    assert "ScanningSequence 'GR' ~ 'SE': no" in t1
    assert "EchoTime '1.54' ~ '14': no" in t1
    assert t1.endswith("Modality 'MR' ~ 'MR': yes")


def test_multi_valued_scanning_sequence_matches_any_of_its_values(
    study: dict[str, list[Path]],
) -> None:
    flair = dcmread(study["FLAIR"][0], stop_before_pixels=True)
    values = header_values(flair, ["ScanningSequence", "SequenceVariant"])
    assert values["ScanningSequence"] == ["SE", "IR", "SE\\IR"]

    def hit(match: MatchSpec) -> bool:
        (result,) = evaluate([("r", match)], header_values(flair, match.keys()))
        return result.matched

    assert hit({"ScanningSequence": "IR"})
    assert hit({"ScanningSequence": "SE"})  # any value: a FLAIR is also a spin echo
    assert hit({"ScanningSequence": "SE\\IR"})  # the whole value
    assert hit({"SequenceVariant": "MP"})
    assert not hit({"ScanningSequence": "GR"})
    assert not hit({"ScanningSequence": "IR\\SE"})  # the whole value keeps its order


def test_numeric_attributes_match_by_value(study: dict[str, list[Path]]) -> None:
    t1 = dcmread(study["T1"][0], stop_before_pixels=True)
    assert t1["EchoTime"].value == 14.0
    assert str(t1["EchoTime"].value) == "14.000"

    def hit(match: MatchSpec) -> bool:
        (result,) = evaluate([("r", match)], header_values(t1, match.keys()))
        return result.matched

    assert hit({"EchoTime": "14"})  # written 14.000 by the scanner
    assert hit({"EchoTime": "1.4E1"})
    assert hit({"EchoTime": ["95", "14.0"]})
    assert hit({"RepetitionTime": "550.0"})
    assert hit({"EchoTrainLength": "01"})  # IS
    assert not hit({"EchoTime": "14.5"})
    assert not hit({"EchoTime": "1_4"})  # Python's float() would read 14: not a DICOM number
    # Text forms still work as before: exact text, wildcard, and a regex as a range stand-in.
    assert hit({"EchoTime": "14.000"})
    assert hit({"EchoTime": "14*"})
    assert hit({"EchoTime": r"/(1[0-9]|2[0-9])(\.[0-9]*)?/"})  # 10 <= TE < 30
    # A text attribute that holds a number stays a text comparison.
    text = _header(SeriesDescription="14.000")
    (result,) = evaluate([("r", {"SeriesDescription": "14"})],
                         header_values(text, ["SeriesDescription"]))
    assert not result.matched


def test_long_te_regex_routes_t2_and_flair(study: dict[str, list[Path]]) -> None:
    routes: list[tuple[str, MatchSpec]] = [
        ("long-te", {"Modality": "MR", "EchoTime": r"/([89][0-9]|1[0-9][0-9])(\.[0-9]*)?/"})]
    hits = {name: route_hits(files[0], routes) for name, files in study.items()}
    assert hits == {"LOC": [], "T1": [], "T2": ["long-te"], "FLAIR": ["long-te"],
                    "T1_MF": []}


# -- enhanced multi-frame ------------------------------------------------------------------------
def test_enhanced_object_routes_on_attributes_inside_its_functional_groups(
    study: dict[str, list[Path]],
) -> None:
    (path,) = study["T1_MF"]
    ds = dcmread(path, stop_before_pixels=True)
    # A legacy conversion moves the sequence attributes out of the top level.
    assert "ScanningSequence" not in ds
    assert "EchoTime" not in ds
    assert route_hits(path) == ["t1"]
    values = header_values(ds, ["ScanningSequence", "SequenceVariant", "RepetitionTime",
                                "SliceLocation"])
    assert values["ScanningSequence"] == ["SE"]
    assert values["SequenceVariant"] == ["SK", "SP", "SK\\SP"]
    assert values["RepetitionTime"] == ["550"]
    # A per-frame attribute: every frame's value, each once.
    locations = [str(dcmread(p, stop_before_pixels=True).SliceLocation).strip()
                 for p in study["T1"]]
    assert values["SliceLocation"] is not None
    assert sorted(values["SliceLocation"]) == sorted(set(locations))
    one = locations[3]
    (result,) = evaluate([("r", {"SliceLocation": one})],
                         header_values(ds, ["SliceLocation"]))
    assert result.matched


def test_enhanced_object_is_one_instance_and_the_same_volume(
    study: dict[str, list[Path]],
) -> None:
    (path,) = study["T1_MF"]
    ds = dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.4"  # Legacy Converted Enhanced MR
    assert int(ds.NumberOfFrames) == len(study["T1"])
    record = parse_received(path, sop_class_uid=str(ds.SOPClassUID),
                            sop_instance_uid=str(ds.SOPInstanceUID))
    assert record.series_instance_uid == str(ds.SeriesInstanceUID)
    assert record.sop_instance_uid == str(ds.SOPInstanceUID)
    assert record.modality == "MR"
    assert record.series_description == "T1 AX MF"
    assert record.series_number == 5

    single = load_volume(study["T1"])
    multi = load_volume([path])
    assert multi.array.shape == single.array.shape == (len(study["T1"]), 160, 160)
    assert multi.spacing == pytest.approx(single.spacing)
    assert multi.origin == pytest.approx(single.origin)
    assert multi.orientation == pytest.approx(single.orientation)
    assert np.array_equal(multi.array, single.array)  # same slices in the same order
    assert multi.warnings == single.warnings == []
    assert set(multi.sop_instance_uids) == {str(ds.SOPInstanceUID)}
    assert sorted(multi.frame_indices) == list(range(len(study["T1"])))
    # Frame k of the enhanced object is the k-th source slice it converted (instance order).
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): i
              for i, p in enumerate(study["T1"])}
    frames = ds.PerFrameFunctionalGroupsSequence
    sources = [str(f.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)
               for f in frames]
    assert [by_uid[sources[k]] for k in multi.frame_indices] == [
        by_uid[uid] for uid in single.sop_instance_uids]


def _header(**values: Any) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def test_top_level_value_wins_over_functional_groups() -> None:
    inner = _header(EchoTime="30")
    group = _header(MREchoSequence=[inner])
    ds = _header(EchoTime="14", SharedFunctionalGroupsSequence=[group])
    assert header_values(ds, ["EchoTime"])["EchoTime"] == ["14"]
    del ds.EchoTime
    assert header_values(ds, ["EchoTime"])["EchoTime"] == ["30"]
    # Shared groups answer before per-frame ones.
    frame = _header(MREchoSequence=[_header(EchoTime="40")])
    ds.PerFrameFunctionalGroupsSequence = [frame]
    assert header_values(ds, ["EchoTime"])["EchoTime"] == ["30"]
    del ds.SharedFunctionalGroupsSequence
    assert header_values(ds, ["EchoTime"])["EchoTime"] == ["40"]
    assert header_values(ds, ["InversionTime"])["InversionTime"] is None


def test_reason_shows_a_bounded_number_of_per_frame_values(study: dict[str, list[Path]]) -> None:
    (path,) = study["T1_MF"]
    (result,) = evaluate_file([("r", {"SliceLocation": "9999"})], path)
    assert not result.matched
    assert result.reason.startswith("SliceLocation [")
    assert result.reason.endswith(f", ... ({len(study['T1'])} values)] ~ '9999': no")
    assert result.reason.count(",") == 8  # eight values shown, then the count
