"""Synthetic phantom studies: labels, masks, learnable lesions, determinism, codecs, validity."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicom_ai.training import synth
from dicom_ai.training.synth import LABEL_COLUMNS, SOP_CLASSES, SynthReport, synthesize
from tests.conftest import need_binary

MODALITIES = ("CR", "DX", "CT", "MR")
STUDIES = {"CR": 8, "DX": 8, "CT": 3, "MR": 3}
SEED = 7


@dataclass(frozen=True)
class Run:
    out: Path
    report: SynthReport
    rows: list[dict[str, str]]


def _run(out: Path, modality: str, *, seed: int = SEED, compress: bool = True,
         studies: int | None = None) -> Run:
    report = synthesize(out, studies=studies or STUDIES[modality], seed=seed,
                        modality=modality,  # type: ignore[arg-type]
                        compress=compress)
    with report.labels_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return Run(out, report, rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """One compressed run per modality, shared by the read-only tests."""
    return {m: _run(tmp_path_factory.mktemp(f"synth-{m}"), m) for m in MODALITIES}


def _files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.dcm"))


def _volume(run: Run, series_uid: str) -> tuple[NDArray[np.float64], str]:
    """The series' display-ready pixels (MONOCHROME1 inverted), slices ordered, and its PI."""
    files = [pydicom.dcmread(p) for p in (run.out).glob(f"*/{series_uid}/*.dcm")]
    files.sort(key=lambda ds: int(ds.InstanceNumber))
    arr = np.stack([ds.pixel_array.astype(np.float64) for ds in files])
    photometric = str(files[0].PhotometricInterpretation)
    if photometric == "MONOCHROME1":
        arr = (2 ** int(files[0].BitsStored) - 1) - arr
    return (arr if len(files) > 1 else arr[0]), photometric


def _dilate(mask: NDArray[np.bool_], steps: int) -> NDArray[np.bool_]:
    """In-plane (last two axes) square dilation by ``steps`` pixels."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        for axis in (-1, -2):
            grown |= np.roll(out, 1, axis=axis) | np.roll(out, -1, axis=axis)
        out = grown
    return out


@pytest.mark.parametrize("modality", MODALITIES)
def test_labels_have_the_columns_and_one_row_per_instance(runs: dict[str, Run],
                                                          modality: str) -> None:
    run = runs[modality]
    header = run.report.labels_csv.read_text().splitlines()[0].split(",")
    assert tuple(header) == LABEL_COLUMNS
    files = _files(run.out)
    assert len(run.rows) == len(files) == run.report.instances
    assert {r["SOPInstanceUID"] for r in run.rows} == {p.stem for p in files}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID == SOP_CLASSES[modality]
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == path.stem
        assert path.parent.parent.name == ds.StudyInstanceUID
        assert path.parent.name == ds.SeriesInstanceUID
    if modality in ("CR", "DX"):
        assert len({r["StudyInstanceUID"] for r in run.rows}) == len(files)
    else:
        assert len(files) >= 16 * STUDIES[modality]


@pytest.mark.parametrize("modality", MODALITIES)
def test_positive_fraction_is_respected(runs: dict[str, Run], modality: str) -> None:
    run = runs[modality]
    per_study = {r["StudyInstanceUID"]: r["label"] for r in run.rows}
    assert len(per_study) == STUDIES[modality]
    positives = sum(label == "1" for label in per_study.values())
    assert abs(positives - STUDIES[modality] * 0.5) <= 1
    assert positives == run.report.positives
    assert run.report.negatives == STUDIES[modality] - positives


def test_positive_fraction_extremes(tmp_path: Path) -> None:
    report = synthesize(tmp_path / "none", studies=4, seed=1, modality="CR",
                        positive_fraction=0.0)
    assert report.positives == 0
    assert report.lesions == 0
    assert not any((tmp_path / "none" / "masks").iterdir())
    report = synthesize(tmp_path / "all", studies=4, seed=1, modality="CR",
                        positive_fraction=1.0)
    assert report.positives == 4
    assert report.lesions >= 4


@pytest.mark.parametrize("modality", MODALITIES)
def test_masks_exist_for_positives_and_contain_the_centre(runs: dict[str, Run],
                                                           modality: str) -> None:
    run = runs[modality]
    for row in run.rows:
        if row["label"] == "0":
            assert row["mask_path"] == row["lesion_center_row"] == row["lesion_radius_px"] == ""
            assert row["lesion_count"] == "0"
            continue
        assert int(row["lesion_count"]) >= 1
        mask = np.load(run.out / row["mask_path"])
        assert mask.dtype == np.uint8
        ds = pydicom.dcmread(run.out / row["StudyInstanceUID"] / row["SeriesInstanceUID"]
                             / f"{row['SOPInstanceUID']}.dcm", stop_before_pixels=True)
        r, c = int(row["lesion_center_row"]), int(row["lesion_center_col"])
        if modality in ("CR", "DX"):
            assert mask.shape == (ds.Rows, ds.Columns)
            assert row["lesion_center_slice"] == ""
            assert mask[r, c] == 1
        else:
            slices = sum(1 for _ in (run.out / row["StudyInstanceUID"]).rglob("*.dcm"))
            assert mask.shape == (slices, ds.Rows, ds.Columns)
            assert mask[int(row["lesion_center_slice"]), r, c] == 1
        assert float(row["lesion_radius_px"]) >= 2.0


@pytest.mark.parametrize("modality", MODALITIES)
def test_lesions_are_brighter_than_their_surroundings(runs: dict[str, Run],
                                                      modality: str) -> None:
    run = runs[modality]
    positives = {r["SeriesInstanceUID"]: r["mask_path"] for r in run.rows if r["label"] == "1"}
    assert positives
    for series_uid, mask_path in positives.items():
        pixels, _ = _volume(run, series_uid)
        mask = np.load(run.out / mask_path).astype(bool)
        assert pixels.shape == mask.shape
        ring = _dilate(mask, 4) & ~_dilate(mask, 1)
        assert pixels[mask].mean() - pixels[ring].mean() > 0, series_uid


@pytest.mark.parametrize("modality", MODALITIES)
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, modality: str) -> None:
    a = _run(tmp_path / "a", modality, seed=11, studies=2)
    b = _run(tmp_path / "b", modality, seed=11, studies=2)
    c = _run(tmp_path / "c", modality, seed=12, studies=2)
    files_a = [p.relative_to(a.out) for p in sorted(a.out.rglob("*")) if p.is_file()]
    files_b = [p.relative_to(b.out) for p in sorted(b.out.rglob("*")) if p.is_file()]
    assert files_a == files_b
    for rel in files_a:
        assert (a.out / rel).read_bytes() == (b.out / rel).read_bytes(), rel
    files_c = {p.relative_to(c.out) for p in c.out.rglob("*.dcm")}
    assert not files_c & set(files_a)
    first_a = pydicom.dcmread(_files(a.out)[0])
    first_c = pydicom.dcmread(_files(c.out)[0])
    assert first_a.PixelData != first_c.PixelData
    assert a.report.labels_csv.read_bytes() != c.report.labels_csv.read_bytes()


@pytest.mark.parametrize("modality", MODALITIES)
def test_compressed_files_decode_to_the_phantom(runs: dict[str, Run], tmp_path: Path,
                                                modality: str) -> None:
    run = runs[modality]
    plain = _run(tmp_path / "plain", modality, compress=False)
    assert plain.report.transfer_syntaxes == (
        (str(ExplicitVRLittleEndian), plain.report.instances),)
    assert run.report.fallbacks == ()
    compressed = 0
    for path in _files(run.out):
        ds = pydicom.dcmread(path)
        twin = pydicom.dcmread(plain.out / path.relative_to(run.out))
        if ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian:
            assert ds.PixelData == twin.PixelData
            continue
        compressed += 1
        assert not twin.file_meta.TransferSyntaxUID.is_compressed
        np.testing.assert_array_equal(ds.pixel_array, twin.pixel_array)
        for keyword in ("Rows", "Columns", "BitsStored", "PixelRepresentation",
                        "PhotometricInterpretation", "WindowCenter", "SOPInstanceUID"):
            assert ds[keyword].value == twin[keyword].value
    assert compressed > 0


def test_every_lossless_codec_is_used(runs: dict[str, Run]) -> None:
    used = {uid for run in runs.values() for uid, _ in run.report.transfer_syntaxes}
    assert {str(RLELossless), str(JPEG2000Lossless), str(JPEGLSLossless),
            str(ExplicitVRLittleEndian)} <= used


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_monochrome1_samples_exist(runs: dict[str, Run], modality: str) -> None:
    run = runs[modality]
    photometric = [str(pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation)
                   for p in _files(run.out)]
    assert run.report.monochrome1 == photometric.count("MONOCHROME1") > 0
    assert "MONOCHROME2" in photometric


def _dciodvfy_errors(binary: str, path: Path) -> list[str]:
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, check=False,
                            timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.parametrize("modality", MODALITIES)
def test_dciodvfy_accepts_each_kind_of_file(runs: dict[str, Run], modality: str) -> None:
    binary = need_binary("dciodvfy")
    run = runs[modality]
    samples: dict[tuple[str, str, int], Path] = {}
    for path in _files(run.out):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        key = (str(ds.file_meta.TransferSyntaxUID), str(ds.PhotometricInterpretation),
               int(ds.PixelRepresentation))
        samples.setdefault(key, path)
    assert len(samples) >= 2
    for key, path in samples.items():
        assert _dciodvfy_errors(binary, path) == [], key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "US"}, "modality"),
        ({"studies": -1}, "studies"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"difficulty": -0.1}, "difficulty"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, object],
                                   message: str) -> None:
    call: Callable[..., SynthReport] = synthesize
    args: dict[str, object] = {"studies": 1, "seed": 0, "modality": "CR", **kwargs}
    with pytest.raises(ValueError, match=message):
        call(tmp_path, **args)


def test_uids_of_different_parts_never_collide() -> None:
    # The parts are hashed with a separator: "1"+"14" and "11"+"4" once made the same UID.
    assert synth._uid(SEED, "CT", "instance", 1, 14) != synth._uid(SEED, "CT", "instance", 11, 4)
    uids = {synth._uid(SEED, "CT", "instance", study, k)
            for study in range(40) for k in range(25)}
    assert len(uids) == 40 * 25
