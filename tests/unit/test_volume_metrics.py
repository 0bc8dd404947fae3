"""Per-lesion volume metrics on hand-made label volumes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_ai.training.volume_metrics import (
    FROC_RATES,
    CaseMatch,
    bootstrap_over_cases,
    froc,
    froc_curve,
    headline,
    match_lesions,
    volume_report,
)

SPACING = (1.0, 1.0, 1.0)


def _grid() -> np.ndarray:
    return np.zeros((24, 32, 32), dtype=np.int32)


def test_overlap_hits_and_a_detection_elsewhere_is_a_false_positive() -> None:
    truth, det = _grid(), _grid()
    truth[2:6, 2:6, 2:6] = 1
    truth[2:6, 20:24, 20:24] = 2
    det[5:8, 5:8, 5:8] = 1  # shares exactly one voxel (5, 5, 5) with lesion 1
    det[15:18, 10:13, 25:28] = 2  # nowhere near a lesion
    case = match_lesions(truth, det, SPACING, scores=[0.9, 0.7])
    assert [t.detections for t in case.truth] == [(1,), ()]
    assert [d.hits for d in case.detections] == [(1,), ()]
    assert [d.false_positive for d in case.detections] == [False, True]
    assert case.truth[0].score == 0.9
    assert case.truth[1].score == -math.inf
    assert not case.truth[1].detected
    assert case.truth[1].dice is None


def test_centroid_within_the_equivalent_radius_hits_without_overlap() -> None:
    truth = _grid()
    truth[10:16, 10:16, 10:16] = 1  # 216 mm3: equivalent radius 3.72 mm, centre z 12.5
    near, far = _grid(), _grid()
    near[16, 12:14, 12:14] = 1  # centre z 16: 3.5 mm away, no shared voxel
    far[17, 12:14, 12:14] = 1  # centre z 17: 4.5 mm away
    assert match_lesions(truth, near, SPACING).truth[0].detected
    missed = match_lesions(truth, far, SPACING)
    assert not missed.truth[0].detected
    assert missed.detections[0].false_positive
    # The rule is in mm: with 2 mm slices the same voxels are 7 mm apart (radius 5.9 mm).
    assert not match_lesions(truth, near, (2.0, 1.0, 1.0)).truth[0].detected


def test_two_detections_on_one_lesion_count_once_and_neither_is_false() -> None:
    truth, det = _grid(), _grid()
    truth[4:12, 4:12, 4:12] = 1
    det[4:8, 4:12, 4:12] = 1
    det[8:12, 4:12, 4:12] = 2
    case = match_lesions(truth, det, SPACING, scores=[0.6, 0.8])
    assert case.truth[0].detections == (1, 2)
    assert case.truth[0].score == 0.8
    assert case.truth[0].dice == pytest.approx(1.0)
    assert not any(d.false_positive for d in case.detections)


def test_dice_volume_and_diameter_of_a_half_detected_lesion() -> None:
    truth, det = _grid(), _grid()
    truth[4:8, 4:8, 4:8] = 1  # 64 voxels, a 4 x 4 square per slice
    det[4:6, 4:8, 4:8] = 1  # the upper half: 32 voxels
    spacing = (2.0, 0.5, 0.5)  # 0.5 mm3 per voxel
    case = match_lesions(truth, det, spacing)
    lesion = case.truth[0]
    assert lesion.volume_mm3 == pytest.approx(32.0)
    assert lesion.detected_volume_mm3 == pytest.approx(16.0)
    assert lesion.dice == pytest.approx(2 * 32 / 96)
    # Voxel centres 3 x 0.5 mm apart along rows and columns: the diagonal.
    assert lesion.diameter_mm == pytest.approx(1.5 * math.sqrt(2))
    assert lesion.detected_diameter_mm == pytest.approx(lesion.diameter_mm)
    assert case.dice == pytest.approx(2 * 32 / 96)
    report = volume_report([case], n_boot=20)
    assert report["volume_error"]["signed_mean"] == pytest.approx(-0.5)
    assert report["diameter_error_mm"]["signed_mean"] == pytest.approx(0.0)


def test_an_empty_study_is_a_perfect_negative() -> None:
    case = match_lesions(_grid(), _grid(), SPACING)
    assert case.truth == []
    assert case.detections == []
    assert case.dice == 1.0


def test_shapes_and_scores_are_checked() -> None:
    with pytest.raises(ValueError, match="same 3D grid"):
        match_lesions(_grid(), np.zeros((2, 2, 2)), SPACING)
    det = _grid()
    det[0, 0, 0] = 2
    with pytest.raises(ValueError, match="scores"):
        match_lesions(_grid(), det, SPACING, scores=[0.5])


def _froc_cases() -> list[CaseMatch]:
    """Two studies with one lesion each; the answer worked out by hand below."""
    cases = []
    for lesion_score, fp_scores in ((0.9, [0.8]), (0.3, [0.95, 0.6])):
        truth, det = _grid(), _grid()
        truth[2:5, 2:5, 2:5] = 1
        det[2:5, 2:5, 2:5] = 1
        for n, _ in enumerate(fp_scores, start=2):
            det[15:17, 4 * n:4 * n + 2, 25:27] = n
        cases.append(match_lesions(truth, det, SPACING, scores=[lesion_score, *fp_scores]))
    return cases


def test_froc_points_worked_out_by_hand() -> None:
    cases = _froc_cases()
    # Thresholds 0.95, 0.9, 0.8, 0.6, 0.3: FPs 1, 1, 2, 3, 3 over 2 volumes; lesions 0, 1, 1,
    # 1, 2 of 2.
    fp, sens = froc_curve(cases)
    assert fp.tolist() == [0.0, 0.5, 0.5, 1.0, 1.5, 1.5]
    assert sens.tolist() == [0.0, 0.0, 0.5, 0.5, 0.5, 1.0]
    assert froc(cases) == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert len(froc(cases)) == len(FROC_RATES)
    report = volume_report(cases, n_boot=50, seed=3)
    assert report["froc"]["cpm"]["value"] == pytest.approx(4.0 / 7.0)
    assert report["operating"]["sensitivity"]["value"] == 1.0
    assert report["operating"]["fp_per_volume"]["value"] == 1.5
    assert headline(report)["froc_sensitivity_at_2_fp"] == 1.0


def test_bootstrap_cis_bracket_the_point_estimates_and_are_seeded() -> None:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(12):
        truth, det = _grid(), _grid()
        for j in range(3):
            truth[2 + 7 * j:6 + 7 * j, 4:8, 4:8] = j + 1
            if rng.random() < 0.7:  # found, with an error in size
                det[2 + 7 * j:6 + 7 * j, 4:8, 4:4 + int(rng.integers(3, 6))] = j + 1
        if i % 3 == 0:
            det[10:12, 20:22, 20:22] = 4
        cases.append(match_lesions(truth, det, SPACING, scores=list(rng.random(4))))
    a = volume_report(cases, n_boot=200, seed=7)
    for key in ("dice_per_volume", "dice_per_lesion"):
        assert a[key]["ci_low"] <= a[key]["value"] <= a[key]["ci_high"]
    for key in ("sensitivity", "fp_per_volume"):
        point = a["operating"][key]
        assert point["ci_low"] <= point["value"] <= point["ci_high"]
        assert point["ci_low"] < point["ci_high"]
    for name in ("volume_error", "diameter_error_mm"):
        point = a[name]["abs_mean"]
        assert point["ci_low"] <= point["value"] <= point["ci_high"]
    for s, lo, hi in zip(a["froc"]["sensitivity"], a["froc"]["ci_low"], a["froc"]["ci_high"],
                         strict=True):
        assert lo <= s <= hi
    assert volume_report(cases, n_boot=200, seed=7) == a
    lo, hi = bootstrap_over_cases(cases, lambda cs: float(len(cs)), n=10)
    assert lo[0] == hi[0] == 12.0
