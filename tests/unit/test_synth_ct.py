"""Realistic synthetic chest CT volumes (``synthesize(..., chest_ct=ChestCT(...))``): geometry,
tissues in HU, lesions and their masks and labels, determinism, validity, bounded memory.

How the volume core measures these masks against ``lesions.csv`` is in ``test_volume.py``.
"""

from __future__ import annotations

import csv
import subprocess
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_ai.training.synth import (
    LABEL_COLUMNS,
    LESION_COLUMNS,
    ChestCT,
    SynthReport,
    read_lesion_masks,
    synthesize,
)
from tests.conftest import need_binary

#: Small slices for speed; the pixel spacing grows so the anatomy keeps an adult's size.
SMALL = ChestCT(matrix=64, pixel_spacing=(5.2, 6.0), slice_spacings=(5.0, 10.0),
                slices=(20, 34), lesion_diameter_mm=(12.0, 30.0))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SynthReport:
    """Six small compressed studies: every codec, both pixel representations."""
    return synthesize(tmp_path_factory.mktemp("chest-small"), studies=6, seed=3,
                      modality="CT", chest_ct=SMALL)


def test_labels_and_lesions_files_agree(small: SynthReport) -> None:
    assert small.lesions_csv == small.out / "lesions.csv"
    rows = _rows(small.labels_csv)
    assert tuple(rows[0]) == LABEL_COLUMNS
    lesions = _rows(small.lesions_csv)
    assert tuple(lesions[0]) == LESION_COLUMNS
    assert len(rows) == small.instances == len(list(small.out.rglob("*.dcm")))
    per_series = Counter(r["SeriesInstanceUID"] for r in lesions)
    for row in rows:
        assert int(row["lesion_count"]) == per_series.get(row["SeriesInstanceUID"], 0)
        assert (row["label"] == "1") == (int(row["lesion_count"]) > 0)
    assert small.positives == 3
    assert small.lesions == len(lesions)
    for lesion in lesions:
        assert lesion["location"] in ("lung", "liver")
        assert 12.0 <= float(lesion["diameter_mm"]) <= 30.0
        assert float(lesion["volume_mm3"]) > 0
        assert float(lesion["contrast_hu"]) != 0


def test_masks_lie_inside_the_volume_and_do_not_touch(small: SynthReport) -> None:
    for path in sorted((small.out / "masks").glob("*.npz")):
        masks = read_lesion_masks(path)
        count = int(masks.labels.max())
        assert count >= 1
        assert set(np.unique(masks.labels)) == set(range(count + 1))
        # Wholly inside: no lesion on the first or last slice.
        assert not masks.labels[0].any()
        assert not masks.labels[-1].any()
        assert len(masks.sop_instance_uids) == masks.labels.shape[0]


def test_dciodvfy_accepts_every_kind_of_slice(small: SynthReport) -> None:
    binary = need_binary("dciodvfy")
    samples: dict[tuple[str, int], Path] = {}
    for path in sorted(small.out.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        samples.setdefault((str(ds.file_meta.TransferSyntaxUID), int(ds.PixelRepresentation)),
                           path)
    assert len({syntax for syntax, _ in samples}) >= 3
    assert {rep for _, rep in samples} == {0, 1}
    for key, path in samples.items():
        result = subprocess.run([binary, str(path)], capture_output=True, text=True,
                                check=False, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], key
        ds = pydicom.dcmread(path)
        assert ds.Modality == "CT"
        assert ds.BodyPartExamined == "CHEST"
        for keyword in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient",
                        "PixelSpacing", "SliceLocation", "SliceThickness", "RescaleIntercept",
                        "RescaleSlope"):
            assert keyword in ds, keyword
        assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2])
        assert ds.pixel_array.shape == (64, 64)


def test_same_seed_same_bytes_other_seed_other_uids(tmp_path: Path) -> None:
    options = ChestCT(matrix=48, pixel_spacing=(7.0, 8.0), slice_spacings=(10.0,),
                      slices=(20, 24), lesion_diameter_mm=(16.0, 30.0))
    runs = [synthesize(tmp_path / name, studies=2, seed=seed, modality="CT",
                       positive_fraction=1.0, chest_ct=options)
            for name, seed in (("a", 5), ("b", 5), ("c", 6))]
    first, again, other = (_tree(r.out) for r in runs)
    assert first == again
    assert any(name.endswith(".npz") for name in first)
    assert not set(first) & set(other) - {"labels.csv", "lesions.csv"}
    # The small abdominal CT of the same seed shares no UID with the chest CT.
    abdomen = synthesize(tmp_path / "abdomen", studies=2, seed=5, modality="CT",
                         positive_fraction=1.0)
    chest_uids = {r["SOPInstanceUID"] for r in _rows(runs[0].labels_csv)}
    assert not chest_uids & {r["SOPInstanceUID"] for r in _rows(abdomen.labels_csv)}
    assert abdomen.lesions_csv is None


def test_default_slices_and_spacings_are_a_clinical_chest_ct(tmp_path: Path) -> None:
    # The default slice count and spacing ranges, on small slices.
    report = synthesize(tmp_path / "z", studies=2, seed=2, modality="CT", compress=False,
                        positive_fraction=0.0,
                        chest_ct=ChestCT.for_matrix(32))
    for series in {r["SeriesInstanceUID"] for r in _rows(report.labels_csv)}:
        files = sorted(report.out.glob(f"*/{series}/*.dcm"))
        assert 100 <= len(files) <= 300
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert 1.0 <= float(ds.SliceThickness) <= 5.0
        assert 0.6 * 16 <= float(ds.PixelSpacing[0]) <= 1.0 * 16  # for_matrix keeps the FOV
    # The default in-plane geometry: 512 x 512 at 0.6-1 mm, with air, lung, soft tissue,
    # fat and bone in Hounsfield units (a few slices only).
    out = tmp_path / "xy"
    synthesize(out, studies=1, seed=2, modality="CT", compress=False,
               chest_ct=ChestCT(slices=(6, 6), slice_spacings=(40.0,)))
    files = sorted(out.rglob("*.dcm"), key=lambda p: int(pydicom.dcmread(
        p, stop_before_pixels=True).InstanceNumber))
    ds = pydicom.dcmread(files[2])  # 80 mm below the top: through the lungs
    assert (ds.Rows, ds.Columns) == (512, 512)
    assert 0.6 <= float(ds.PixelSpacing[0]) <= 1.0
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert abs(float(np.median(hu[:20, :20])) + 1000.0) < 10.0  # air in the corner
    classes = {"lung": (-950, -750), "fat": (-150, -50), "soft tissue": (0, 80),
               "bone": (300, 1500)}
    for name, (lo, hi) in classes.items():
        share = float(((hu >= lo) & (hu <= hi)).mean())
        assert share > 0.003, name


def test_memory_does_not_grow_with_the_slice_count(tmp_path: Path) -> None:
    """Written slice by slice: four times the slices, about the same peak, and less than an
    int16 copy of the volume."""
    peaks = []
    for slices in (20, 80):
        options = ChestCT(matrix=96, pixel_spacing=(3.5, 4.0), slice_spacings=(2.5,),
                          slices=(slices, slices))
        tracemalloc.start()
        try:
            synthesize(tmp_path / str(slices), studies=1, seed=1, modality="CT",
                       compress=False, positive_fraction=1.0, chest_ct=options)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0]
    assert peaks[1] < 96 * 96 * 80 * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "MR", "chest_ct": ChestCT()}, "chest_ct needs modality CT"),
        ({"chest_ct": ChestCT(matrix=16)}, "matrix"),
        ({"chest_ct": ChestCT(slices=(1, 5))}, "slices"),
        ({"chest_ct": ChestCT(lesions=(0, 2))}, "lesions"),
        ({"chest_ct": ChestCT(pixel_spacing=(1.0, 0.5))}, "spacings"),
    ],
)
def test_bad_chest_options_are_refused(tmp_path: Path, kwargs: dict[str, object],
                                       message: str) -> None:
    args: dict[str, object] = {"studies": 1, "seed": 0, "modality": "CT", **kwargs}
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path, **args)  # type: ignore[arg-type]
