"""Evaluation metrics: pinned against scikit-learn, hand-computed values and hand-made masks."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn import metrics as sk

from dicom_ai.training.metrics import (
    Confusion,
    average_precision,
    bootstrap_ci,
    brier_score,
    calibration_bins,
    classification_report,
    confusion_at,
    dice,
    expected_calibration_error,
    lesion_detection,
    pr_curve,
    roc_auc,
    roc_curve,
    segmentation_report,
    threshold_for_sensitivity,
    youden_threshold,
)

Case = tuple[NDArray[np.int64], NDArray[np.float64]]


def _random(seed: int = 7, n: int = 300) -> Case:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return y, p


def _ties() -> Case:
    # Scores rounded to one decimal: many ties, some across classes.
    y, p = _random(11, 200)
    return y, np.round(p, 1)


def _separable() -> Case:
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    return y, np.array([0.0, 0.1, 0.2, 0.3, 0.7, 0.8, 1.0])


def _inverted() -> Case:
    y, p = _separable()
    return y, 1.0 - p


def _all_tied() -> Case:
    return np.array([0, 1, 0, 1, 1]), np.full(5, 0.5)


CASES = {
    "random": _random(),
    "ties": _ties(),
    "separable": _separable(),
    "inverted": _inverted(),
    "all_tied": _all_tied(),
}
case_ids = list(CASES)


@pytest.fixture(params=case_ids)
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


# --------------------------------------------------------------------------- against sklearn


def test_roc_auc_matches_sklearn(case: Case) -> None:
    y, p = case
    assert roc_auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)


def test_roc_auc_extremes() -> None:
    assert roc_auc(*_separable()) == 1.0
    assert roc_auc(*_inverted()) == 0.0
    assert roc_auc(*_all_tied()) == 0.5


@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_matches_sklearn(case: Case, drop: bool) -> None:
    y, p = case
    ours = roc_curve(y, p, drop_intermediate=drop)
    theirs = sk.roc_curve(y, p, drop_intermediate=drop)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_roc_curve_thresholds_reproduce_rates() -> None:
    y, p = _ties()
    fpr, tpr, thresholds = roc_curve(y, p)
    for f, t, th in zip(fpr, tpr, thresholds, strict=True):
        c = confusion_at(y, p, th)
        assert c.recall == pytest.approx(t)
        assert 1 - c.specificity == pytest.approx(f)


def test_pr_curve_matches_sklearn(case: Case) -> None:
    y, p = case
    ours = pr_curve(y, p)
    theirs = sk.precision_recall_curve(y, p)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_average_precision_matches_sklearn(case: Case) -> None:
    y, p = case
    assert average_precision(y, p) == pytest.approx(sk.average_precision_score(y, p), abs=1e-12)


def test_brier_matches_sklearn(case: Case) -> None:
    y, p = case
    assert brier_score(y, p) == pytest.approx(sk.brier_score_loss(y, p), abs=1e-12)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_thresholded_metrics_match_sklearn(case: Case, threshold: float) -> None:
    y, p = case
    c = confusion_at(y, p, threshold)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = sk.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert c == Confusion(tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn))
    assert c.n == y.size
    assert c.accuracy == pytest.approx(sk.accuracy_score(y, pred))
    assert c.precision == pytest.approx(sk.precision_score(y, pred, zero_division=0))
    assert c.recall == pytest.approx(sk.recall_score(y, pred, zero_division=0))
    assert c.specificity == pytest.approx(sk.recall_score(y, pred, pos_label=0, zero_division=0))
    assert c.f1 == pytest.approx(sk.f1_score(y, pred, zero_division=0))


def test_threshold_is_inclusive() -> None:
    c = confusion_at([1, 0], [0.5, 0.4999], 0.5)
    assert c == Confusion(tp=1, fp=0, tn=1, fn=0)


def test_zero_division_is_zero() -> None:
    c = confusion_at([0, 0, 1], [0.1, 0.2, 0.3], 0.9)
    assert (c.precision, c.recall, c.f1) == (0.0, 0.0, 0.0)
    assert Confusion(0, 0, 0, 0).accuracy == 0.0


# --------------------------------------------------------------------------- calibration


def test_ece_by_hand() -> None:
    # Two bins of 0.5 width: [0, 0.5) holds 0.1, 0.2, 0.4 (labels 0, 0, 1);
    # [0.5, 1] holds 0.6, 1.0 (labels 1, 0). 1.0 falls in the last bin.
    y = [0, 0, 1, 1, 0]
    p = [0.1, 0.2, 0.4, 0.6, 1.0]
    low = abs(1 / 3 - 0.7 / 3)
    high = abs(1 / 2 - 1.6 / 2)
    expected = 3 / 5 * low + 2 / 5 * high
    assert expected_calibration_error(y, p, bins=2) == pytest.approx(expected)


def test_calibration_bins_edges() -> None:
    counts, mean_prob, frac = calibration_bins([0, 1, 1, 0], [0.0, 0.3, 0.999, 1.0], bins=10)
    assert counts.tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 0, 2]
    assert np.isnan(mean_prob[1])
    assert np.isnan(frac[1])
    assert mean_prob[9] == pytest.approx(0.9995)
    assert frac[9] == pytest.approx(0.5)


def test_ece_perfect_and_worst() -> None:
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert expected_calibration_error([1, 0], [0.0, 1.0]) == 1.0


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_estimate_and_is_deterministic() -> None:
    y, p = _random(3, 400)
    lo, hi = bootstrap_ci(roc_auc, y, p, n=300, seed=5)
    assert lo < roc_auc(y, p) < hi
    assert bootstrap_ci(roc_auc, y, p, n=300, seed=5) == (lo, hi)
    assert bootstrap_ci(roc_auc, y, p, n=300, seed=6) != (lo, hi)
    lo, hi = bootstrap_ci(brier_score, y, p, n=300, seed=5)
    assert lo < brier_score(y, p) < hi


@pytest.mark.parametrize("metric", [roc_auc, average_precision])
def test_vectorised_bootstrap_equals_per_resample_loop(metric: Any) -> None:
    y, p = _ties()

    def wrapped(a: NDArray[Any], b: NDArray[Any]) -> float:
        return float(metric(a, b))

    fast = bootstrap_ci(metric, y, p, n=200, seed=1)
    slow = bootstrap_ci(wrapped, y, p, n=200, seed=1, both_classes=True)
    assert fast == slow


def test_bootstrap_redraws_single_class_resamples() -> None:
    # One positive in 30: about a third of the resamples lack it and must be redrawn.
    y = np.zeros(30, dtype=int)
    y[0] = 1
    p = np.linspace(0, 1, 30)
    lo, hi = bootstrap_ci(roc_auc, y, p, n=200, seed=0)
    assert 0.0 <= lo <= hi <= 1.0
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_ci(roc_auc, np.zeros(5, dtype=int), np.linspace(0, 1, 5))


def test_bootstrap_is_fast() -> None:
    y, p = _random(9, 2000)
    start = time.perf_counter()
    bootstrap_ci(roc_auc, y, p, n=1000, seed=0)
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------- operating points


def test_youden_threshold_is_a_score_reaching_max_j(case: Case) -> None:
    y, p = case
    threshold = youden_threshold(y, p)
    assert threshold in set(p.tolist())
    fpr, tpr, _ = sk.roc_curve(y, p, drop_intermediate=False)
    c = confusion_at(y, p, threshold)
    assert c.recall + c.specificity - 1 == pytest.approx(float(np.max(tpr - fpr)))


def test_youden_separable() -> None:
    y, p = _separable()
    assert youden_threshold(y, p) == 0.7


@pytest.mark.parametrize("target", [0.0, 0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_for_sensitivity(case: Case, target: float) -> None:
    y, p = case
    threshold = threshold_for_sensitivity(y, p, target)
    assert threshold in set(p.tolist())
    assert confusion_at(y, p, threshold).recall >= target
    higher = p[p > threshold]
    if higher.size:
        # The next score above the returned threshold no longer reaches the target.
        assert confusion_at(y, p, float(higher.min())).recall < target


def test_threshold_for_sensitivity_exact_fraction() -> None:
    # 9 of 10 positives is exactly 0.9 and must count as reaching 0.9.
    y = np.array([1] * 10 + [0] * 5)
    p = np.r_[np.linspace(0.9, 0.5, 10), np.linspace(0.4, 0.0, 5)]
    assert threshold_for_sensitivity(y, p, 0.9) == pytest.approx(p[8])


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1], [0.5], "differ in length"),
        ([0, 2], [0.5, 0.5], "labels 0 and 1"),
        ([0, 1], [0.5, np.nan], "finite"),
        ([0, 1], [0.5, 1.5], r"\[0, 1\]"),
        ([], [], "no predictions"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_invalid_inputs_raise(y: Any, p: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_at(y, p, 0.5)


@pytest.mark.parametrize("func", [roc_auc, average_precision, roc_curve, pr_curve])
def test_ranking_metrics_need_both_classes(func: Any) -> None:
    with pytest.raises(ValueError, match="both classes"):
        func([1, 1, 1], [0.2, 0.5, 0.9])


# --------------------------------------------------------------------------- report


REPORT_KEYS = {
    "n",
    "positives",
    "negatives",
    "threshold",
    "accuracy",
    "precision",
    "recall",
    "sensitivity",
    "specificity",
    "f1",
    "roc_auc",
    "roc_auc_ci95",
    "pr_auc",
    "brier",
    "ece",
    "confusion",
    "target_sensitivity",
    "threshold_at_target_sensitivity",
}


def test_classification_report() -> None:
    y, p = _random()
    report = classification_report(y, p, 0.5, n_bootstrap=200)
    assert set(report) == REPORT_KEYS
    json.dumps(report)
    pred = (p >= 0.5).astype(int)
    assert report["n"] == y.size
    assert report["positives"] + report["negatives"] == y.size
    assert report["sensitivity"] == report["recall"] == pytest.approx(sk.recall_score(y, pred))
    assert report["f1"] == pytest.approx(sk.f1_score(y, pred))
    assert report["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p))
    assert report["pr_auc"] == pytest.approx(sk.average_precision_score(y, p))
    lo, hi = report["roc_auc_ci95"]
    assert lo < report["roc_auc"] < hi
    tn, fp, fn, tp = sk.confusion_matrix(y, pred).ravel()
    assert report["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    at_target = report["threshold_at_target_sensitivity"]
    assert confusion_at(y, p, at_target).recall >= report["target_sensitivity"] == 0.9


def test_classification_report_single_class() -> None:
    report = classification_report([0, 0, 0], [0.1, 0.6, 0.2], 0.5)
    assert set(report) == REPORT_KEYS
    assert report["roc_auc"] is None
    assert report["roc_auc_ci95"] is None
    assert report["pr_auc"] is None
    assert report["threshold_at_target_sensitivity"] is None
    assert report["specificity"] == pytest.approx(2 / 3)
    assert report["precision"] == 0.0


# --------------------------------------------------------------------------- segmentation


def _masks() -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    truth = np.zeros((12, 12), dtype=bool)
    truth[1:4, 1:4] = True  # lesion A, found
    truth[8:11, 8:11] = True  # lesion B, missed
    pred = np.zeros_like(truth)
    pred[2:5, 2:5] = True  # overlaps A by 2x2
    pred[0:2, 9:11] = True  # false positive, 4 pixels
    pred[6, 0] = True  # a single pixel, ignored with min_pixels=2
    return pred, truth


def test_dice_by_hand() -> None:
    pred, truth = _masks()
    # |pred| = 9 + 4 + 1, |truth| = 18, overlap = 4.
    assert dice(pred, truth) == pytest.approx(2 * 4 / (14 + 18))
    empty = np.zeros((3, 3), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert dice(truth, np.zeros_like(truth)) == 0.0
    assert dice(truth, truth) == 1.0
    with pytest.raises(ValueError, match="boolean"):
        dice(truth.astype(np.uint8), truth)
    with pytest.raises(ValueError, match="shapes"):
        dice(empty, truth)


def test_lesion_detection_by_hand() -> None:
    pred, truth = _masks()
    result = lesion_detection([pred], [truth], min_pixels=2)
    assert result == {
        "n_images": 1,
        "n_lesions": 2,
        "detected": 1,
        "sensitivity": 0.5,
        "false_positives": 1,
        "fp_per_image": 1.0,
    }
    # Counting single pixels too, the stray pixel is a second false positive.
    assert lesion_detection([pred], [truth])["false_positives"] == 2


def test_lesion_detection_uses_full_connectivity() -> None:
    truth = np.zeros((5, 5), dtype=bool)
    truth[1, 1] = truth[2, 2] = True  # diagonal neighbours: one lesion
    pred = np.zeros_like(truth)
    pred[2, 2] = True
    result = lesion_detection([pred], [truth])
    assert (result["n_lesions"], result["detected"]) == (1, 1)
    volume = np.zeros((3, 3, 3), dtype=bool)
    volume[0, 0, 0] = volume[1, 1, 1] = True  # corner neighbours in 3-D: one lesion
    assert lesion_detection([volume], [volume])["n_lesions"] == 1


def test_segmentation_report() -> None:
    pred, truth = _masks()
    empty = np.zeros_like(truth)
    probs = [pred * 0.9, np.zeros(truth.shape), empty + 0.1]
    report = segmentation_report(probs, [truth, empty, empty], 0.5, n_bootstrap=200)
    first = 2 * 4 / (14 + 18)
    assert report["dice_mean"] == pytest.approx((first + 1 + 1) / 3)
    assert report["dice_positive_mean"] == pytest.approx(first)
    lo, hi = report["dice_ci95"]
    assert lo <= report["dice_mean"] <= hi
    # min_component_pixels=4 drops the stray pixel; the 4-pixel false positive stays.
    assert report["false_positives"] == 1
    assert report["n_images"] == 3
    assert report["fp_per_image"] == pytest.approx(1 / 3)
    assert report["sensitivity"] == 0.5
