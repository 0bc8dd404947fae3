"""Declarative routing: matcher semantics, route validation, evaluate_file and `routes test`."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from dicom_ai.cli import app
from dicom_ai.config import Route, load_settings
from dicom_ai.exceptions import ConfigError, DicomReadError
from dicom_ai.routing import (
    CALLING_AE_TITLE,
    MatchSpec,
    check_match,
    evaluate,
    evaluate_file,
    header_values,
)
from dicom_ai.training.synth import synthesize


# -- helpers ----------------------------------------------------------------------------------
def header(**elements: Any) -> Dataset:
    """A dataset holding the given keywords (no pixel data)."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def matches(ds: Dataset, match: MatchSpec, calling: Sequence[str] = ()) -> bool:
    """Whether a single route with `match` matches `ds`."""
    values = header_values(ds, match.keys(), calling)
    (result,) = evaluate([("r", match)], values)
    return result.matched


def one_file(folder: Path) -> Path:
    """The first DICOM file synthesize() wrote under `folder`."""
    return sorted(folder.glob("*/*/*.dcm"))[0]


@pytest.fixture(scope="module")
def cr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic CR instance (CHEST, PA, ImageType ORIGINAL\\PRIMARY)."""
    out = tmp_path_factory.mktemp("cr")
    synthesize(out, studies=1, seed=11, modality="CR", compress=False)
    return one_file(out)


# -- value forms ------------------------------------------------------------------------------
def test_exact_value_is_trimmed_and_case_sensitive() -> None:
    ds = header(Modality="CR")
    assert matches(ds, {"Modality": "CR"})
    assert matches(ds, {"Modality": " CR "})  # the expected value is trimmed too
    assert not matches(ds, {"Modality": "cr"})
    assert not matches(ds, {"Modality": "C"})
    assert not matches(ds, {"Modality": "CRX"})


def test_header_value_is_trimmed() -> None:
    ds = header(StationName="  SCANNER1  ")
    assert header_values(ds, ["StationName"]) == {"StationName": ["SCANNER1"]}
    assert matches(ds, {"StationName": "SCANNER1"})


def test_list_matches_any_of_its_values() -> None:
    ds = header(Modality="DX")
    assert matches(ds, {"Modality": ["CR", "DX"]})
    assert not matches(ds, {"Modality": ["CR", "CT"]})
    assert matches(ds, {"Modality": ["CT", "/D./"]})  # forms mix within a list


def test_star_wildcard() -> None:
    ds = header(StudyDescription="CHEST PA AND LATERAL")
    assert matches(ds, {"StudyDescription": "CHEST*"})
    assert matches(ds, {"StudyDescription": "*PA*"})
    assert matches(ds, {"StudyDescription": "*"})
    assert not matches(ds, {"StudyDescription": "chest*"})  # case-sensitive
    assert not matches(ds, {"StudyDescription": "*PA"})  # anchored at both ends


def test_question_mark_matches_exactly_one_character() -> None:
    ds = header(Modality="CR")
    assert matches(ds, {"Modality": "C?"})
    assert matches(ds, {"Modality": "??"})
    assert not matches(ds, {"Modality": "?"})
    assert not matches(ds, {"Modality": "???"})


def test_brackets_are_literal_in_wildcard_patterns() -> None:
    ds = header(SeriesDescription="AX [1] T1")
    assert matches(ds, {"SeriesDescription": "AX [1]*"})
    assert matches(ds, {"SeriesDescription": "*[1]*"})
    assert matches(ds, {"SeriesDescription": "AX [?] T1"})
    # As fnmatch syntax "[1]" would be a one-character set matching "1".
    assert not matches(header(SeriesDescription="AX 1 T1"), {"SeriesDescription": "AX [1]*"})
    # Without a wildcard, brackets compare literally too.
    assert matches(ds, {"SeriesDescription": "AX [1] T1"})
    assert not matches(ds, {"SeriesDescription": "AX [!1] T1"})


def test_regex_must_match_the_whole_value() -> None:
    ds = header(BodyPartExamined="CHEST")
    assert matches(ds, {"BodyPartExamined": "/CH.*/"})
    assert matches(ds, {"BodyPartExamined": "/(CHEST|THORAX)/"})
    assert not matches(ds, {"BodyPartExamined": "/CH/"})  # a prefix is not a full match
    assert not matches(ds, {"BodyPartExamined": "/HES/"})  # nor a substring
    assert not matches(ds, {"BodyPartExamined": "/chest/"})
    assert matches(ds, {"BodyPartExamined": "/(?i)chest/"})


def test_multi_valued_attribute_matches_by_item_and_joined() -> None:
    ds = header(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert header_values(ds, ["ImageType"]) == {
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL", "ORIGINAL\\PRIMARY\\AXIAL"]
    }
    assert matches(ds, {"ImageType": "PRIMARY"})
    assert matches(ds, {"ImageType": "AXIAL"})
    assert matches(ds, {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"})
    assert matches(ds, {"ImageType": "ORIGINAL\\PRIMARY*"})
    assert matches(ds, {"ImageType": "/ORIGINAL\\\\.*/"})
    assert not matches(ds, {"ImageType": "DERIVED"})
    assert not matches(ds, {"ImageType": "ORIGINAL\\PRIMARY"})  # not the whole joined text
    assert not matches(ds, {"ImageType": "PRIMARY\\AXIAL"})


def test_single_item_multi_valued_attribute_has_no_joined_duplicate() -> None:
    ds = header(ImageType=["DERIVED"])
    assert header_values(ds, ["ImageType"]) == {"ImageType": ["DERIVED"]}


def test_numeric_values_compare_as_text() -> None:
    ds = header(SeriesNumber=3, ImagerPixelSpacing=[0.5, 0.5])
    assert matches(ds, {"SeriesNumber": "3"})
    assert matches(ds, {"SeriesNumber": "/[0-9]/"})
    assert matches(ds, {"ImagerPixelSpacing": "0.5"})
    assert matches(ds, {"ImagerPixelSpacing": "0.5\\0.5"})


def test_absent_attribute_never_matches() -> None:
    ds = header(Modality="CR")
    assert header_values(ds, ["BodyPartExamined"]) == {"BodyPartExamined": None}
    for pattern in ("CHEST", "*", "/.*/", "", ["", "*"]):
        assert not matches(ds, {"BodyPartExamined": pattern}), pattern
    # One absent key fails the whole route even when the others match.
    assert not matches(ds, {"Modality": "CR", "BodyPartExamined": "*"})


def test_empty_value_matches_only_the_empty_string() -> None:
    ds = header(BodyPartExamined="")
    assert header_values(ds, ["BodyPartExamined"]) == {"BodyPartExamined": [""]}
    assert matches(ds, {"BodyPartExamined": ""})
    assert matches(ds, {"BodyPartExamined": "//"})
    assert not matches(ds, {"BodyPartExamined": "CHEST"})
    assert not matches(ds, {"BodyPartExamined": "?"})
    # A value of None (e.g. an empty IS) is an empty value, not an absent one.
    none_valued = header(SeriesNumber=None)
    assert header_values(none_valued, ["SeriesNumber"]) == {"SeriesNumber": [""]}
    assert matches(none_valued, {"SeriesNumber": ""})
    assert not matches(none_valued, {"SeriesNumber": "1"})


def test_calling_ae_title_pseudo_key() -> None:
    ds = header(Modality="CR")
    assert matches(ds, {CALLING_AE_TITLE: "MODALITY1"}, ["MODALITY1"])
    assert matches(ds, {CALLING_AE_TITLE: "MODALITY1"}, [" MODALITY1 "])  # AE padding
    assert matches(ds, {CALLING_AE_TITLE: "MOD*"}, ["OTHER", "MODALITY2"])  # any sender
    assert not matches(ds, {CALLING_AE_TITLE: "MODALITY1"}, ["MODALITY2"])
    # No known sender: the key is absent and never matches, whatever the pattern.
    assert header_values(ds, [CALLING_AE_TITLE]) == {CALLING_AE_TITLE: None}
    assert not matches(ds, {CALLING_AE_TITLE: "*"})
    # A dataset element cannot stand in for the pseudo-key.
    assert not matches(header(Modality="CR"), {"Modality": "CR", CALLING_AE_TITLE: "CR"})


def test_every_key_must_match_and_results_keep_route_order() -> None:
    ds = header(Modality="CR", BodyPartExamined="CHEST")
    values = header_values(ds, ["Modality", "BodyPartExamined"])
    routes: list[tuple[str, MatchSpec]] = [
        ("knee", {"Modality": "CR", "BodyPartExamined": "KNEE"}),
        ("chest", {"Modality": ["CR", "DX"], "BodyPartExamined": "CHEST"}),
        ("all", {}),
    ]
    results = evaluate(routes, values)
    assert [(r.route, r.matched) for r in results] == [
        ("knee", False), ("chest", True), ("all", True)]
    knee = results[0]
    assert [(k.key, k.matched) for k in knee.keys] == [
        ("Modality", True), ("BodyPartExamined", False)]
    assert knee.keys[1].actual == ["CHEST"]
    # A miss lists its failing keys first.
    assert knee.reason == (
        "BodyPartExamined 'CHEST' ~ 'KNEE': no; Modality 'CR' ~ 'CR': yes")
    assert results[1].reason == (
        "Modality 'CR' ~ ['CR', 'DX']: yes; BodyPartExamined 'CHEST' ~ 'CHEST': yes")
    assert results[2].keys == ()
    assert results[2].reason == "no conditions (matches everything)"


def test_reason_names_absent_values() -> None:
    (result,) = evaluate([("r", {"BodyPartExamined": "CHEST"})], {"BodyPartExamined": None})
    assert not result.matched
    assert result.reason == "BodyPartExamined absent ~ 'CHEST': no"


# -- validation -------------------------------------------------------------------------------
def test_check_match_accepts_valid_tables() -> None:
    check_match({})
    check_match({"Modality": ["CR", "DX"], "ImageType": "*PRIMARY*", "StudyDescription": "/.+/",
                 CALLING_AE_TITLE: "MOD?"})


@pytest.mark.parametrize(
    ("match", "words"),
    [
        ({"Modalty": "CR"}, ["'Modalty'", "not a DICOM keyword"]),
        ({"modality": "CR"}, ["'modality'", "not a DICOM keyword"]),
        ({"Modality": "/(CR/"}, ["Modality", "bad regular expression", "'/(CR/'"]),
        ({"Modality": ["CR", "/[/"]}, ["Modality", "bad regular expression"]),
        ({"Modality": []}, ["Modality", "empty list"]),
    ],
)
def test_check_match_refuses_bad_tables(match: MatchSpec, words: list[str]) -> None:
    with pytest.raises(ValueError, match=re.escape(words[0])) as caught:
        check_match(match)
    for word in words[1:]:
        assert word in str(caught.value)


def test_route_model_validates_match() -> None:
    route = Route(name="chest", model="m", match={"Modality": ["CR", "DX"]})
    assert route.match == {"Modality": ["CR", "DX"]}
    with pytest.raises(ValueError, match="Modalty"):
        Route(name="chest", model="m", match={"Modalty": "CR"})


@pytest.mark.parametrize(
    ("match", "detail"),
    [
        ({"Modalty": "CR"}, "'Modalty' is not a DICOM keyword"),
        ({"Modality": "/(/"}, "bad regular expression"),
    ],
)
def test_load_settings_names_the_bad_route(match: dict[str, Any], detail: str) -> None:
    routes = [{"name": "ok", "model": "m", "match": {"Modality": "CR"}},
              {"name": "bad", "model": "m", "match": match}]
    with pytest.raises(ConfigError) as caught:
        load_settings(None, routes=routes)
    message = str(caught.value)
    assert "routes.1.match" in message
    assert detail in message
    assert "routes.0" not in message


def test_load_settings_keeps_valid_routes_in_order() -> None:
    settings = load_settings(None, routes=[
        {"name": "b", "model": "m1", "match": {"Modality": "CR"}},
        {"name": "a", "model": "m2", "match": {CALLING_AE_TITLE: ["X", "Y*"]}},
    ])
    assert [r.name for r in settings.routes] == ["b", "a"]
    assert settings.routes[1].match == {CALLING_AE_TITLE: ["X", "Y*"]}


# -- on a real file ---------------------------------------------------------------------------
def test_evaluate_file_on_synthetic_cr(cr_file: Path) -> None:
    routes: list[tuple[str, MatchSpec]] = [
        ("chest-cr", {"Modality": ["CR", "DX"], "BodyPartExamined": "CHEST",
                      "ImageType": "PRIMARY", "ViewPosition": "/(PA|AP)/"}),
        ("ct", {"Modality": "CT"}),
        ("from-mod1", {"Modality": "CR", CALLING_AE_TITLE: "MOD1"}),
        ("station", {"StationName": "SYN*", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1"}),
        ("absent", {"Laterality": "*"}),
    ]
    results = evaluate_file(routes, cr_file, ["MOD1"])
    assert [(r.route, r.matched) for r in results] == [
        ("chest-cr", True), ("ct", False), ("from-mod1", True), ("station", True),
        ("absent", False)]
    assert results[1].reason == "Modality 'CR' ~ 'CT': no"
    assert results[4].reason == "Laterality absent ~ '*': no"
    # Without the sender, the CallingAETitle route misses.
    without = evaluate_file(routes, cr_file)
    assert [r.matched for r in without] == [True, False, False, True, False]
    assert "CallingAETitle absent ~ 'MOD1': no" in without[2].reason


def test_evaluate_file_refuses_non_dicom(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(DicomReadError, match="not a readable DICOM file"):
        evaluate_file([("r", {"Modality": "CR"})], junk)
    with pytest.raises(DicomReadError, match="not a readable DICOM file"):
        evaluate_file([("r", {"Modality": "CR"})], tmp_path / "missing.dcm")


# -- the `routes test` command ----------------------------------------------------------------
CONFIG = """
[[routes]]
name = "chest-xray"
model = "chest-model"
match = { Modality = ["CR", "DX"], BodyPartExamined = "CHEST" }

[[routes]]
name = "from-ct-scanner"
model = "ct-model"
match = { Modality = "CT", CallingAETitle = "CT1" }
"""


def test_routes_test_json_reports_each_series(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synthesize(data / "cr", studies=1, seed=5, modality="CR", compress=False)
    synthesize(data / "ct", studies=1, seed=5, modality="CT", compress=False)
    cr_series = str(pydicom.dcmread(one_file(data / "cr")).SeriesInstanceUID)
    ct_files = sorted((data / "ct").glob("*/*/*.dcm"))
    assert len(ct_files) > 1  # several slices, reported once
    ct_series = str(pydicom.dcmread(ct_files[0]).SeriesInstanceUID)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG, encoding="utf-8")

    result = CliRunner().invoke(app, ["routes", "test", str(data), "--config", str(config),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [item["series_instance_uid"] for item in report] == [cr_series, ct_series]
    cr, ct = report
    assert Path(cr["file"]).parent.name == cr_series
    assert cr["routes"] == [
        {"route": "chest-xray", "model": "chest-model", "matched": True,
         "reason": "Modality 'CR' ~ ['CR', 'DX']: yes; BodyPartExamined 'CHEST' ~ 'CHEST': yes"},
        {"route": "from-ct-scanner", "model": "ct-model", "matched": False,
         "reason": "Modality 'CR' ~ 'CT': no; CallingAETitle absent ~ 'CT1': no"},
    ]
    # The CT study matches nothing without the CT1 sender: unrouted.
    assert [r["matched"] for r in ct["routes"]] == [False, False]
    assert ct["routes"][1]["reason"] == (
        "CallingAETitle absent ~ 'CT1': no; Modality 'CT' ~ 'CT': yes")

    with_sender = CliRunner().invoke(app, ["routes", "test", str(data), "--config", str(config),
                                           "--json", "--calling-aet", "CT1"])
    assert with_sender.exit_code == 0, with_sender.output
    report = json.loads(with_sender.stdout)
    assert [[r["matched"] for r in item["routes"]] for item in report] == [
        [True, False], [False, True]]


def test_routes_test_refuses_a_bad_route(tmp_path: Path, cr_file: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[routes]]\nname = "x"\nmodel = "m"\nmatch = { Modalty = "CR" }\n',
                      encoding="utf-8")
    result = CliRunner().invoke(app, ["routes", "test", str(cr_file), "--config", str(config),
                                      "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "routes.0.match" in result.output


def test_reasons_withhold_the_values_of_patient_attributes() -> None:
    """A route on PatientSex stores its reason (API, dashboard): the value never appears."""
    ds = Dataset()
    ds.PatientSex = "QZCANARY"
    ds.Modality = "CR"
    [result] = evaluate([("r", {"PatientSex": "F", "Modality": "CR"})],
                        header_values(ds, ["PatientSex", "Modality"]))
    assert "QZCANARY" not in result.reason
    assert "PatientSex (value withheld)" in result.reason
    assert "Modality 'CR'" in result.reason
