"""Binary classification and segmentation metrics for model evaluation, in plain numpy.

Classification metrics take ``y_true`` (labels 0/1) and ``y_prob`` (the predicted probability of
the positive class, finite, in [0, 1]) as 1-D arrays of the same length; anything else raises
:class:`ValueError`. A prediction is positive when ``y_prob >= threshold``.

The ranking metrics reproduce scikit-learn's definitions, ties included:
:func:`roc_curve` / :func:`roc_auc` (``sklearn.metrics.roc_curve`` / ``roc_auc_score``) and
:func:`pr_curve` / :func:`average_precision` (``precision_recall_curve`` /
``average_precision_score``). They need both classes and raise :class:`ValueError` otherwise.

Ratios whose denominator is zero (precision with no predicted positives, specificity with no
negatives, ...) are reported as ``0.0``, as scikit-learn does with ``zero_division=0``.

Segmentation metrics take boolean masks of the same shape: :func:`dice`, and
:func:`lesion_detection`, which matches connected components (8-connectivity in 2D, 26 in 3D).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray
from skimage import measure

__all__ = [
    "Confusion",
    "average_precision",
    "bootstrap_ci",
    "brier_score",
    "calibration_bins",
    "classification_report",
    "confusion_at",
    "dice",
    "expected_calibration_error",
    "lesion_detection",
    "pr_curve",
    "roc_auc",
    "roc_curve",
    "segmentation_report",
    "threshold_for_sensitivity",
    "youden_threshold",
]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]
Metric = Callable[[NDArray[Any], NDArray[Any]], float]


def _ratio(num: float, den: float) -> float:
    """``num / den``, or 0.0 when ``den`` is 0 (the module's zero-division convention)."""
    return float(num) / float(den) if den else 0.0


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary confusion matrix, with the ratios derived from them.

    Every ratio is 0.0 when its denominator is 0.
    """

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        """Number of predictions."""
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        """(tp + tn) / n."""
        return _ratio(self.tp + self.tn, self.n)

    @property
    def precision(self) -> float:
        """tp / (tp + fp), the positive predictive value."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """tp / (tp + fn), the sensitivity or true positive rate."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """tn / (tn + fp), the true negative rate."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def f1(self) -> float:
        """2 tp / (2 tp + fp + fn), the harmonic mean of precision and recall."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


# --------------------------------------------------------------------------- validation


def _validate(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[BoolArray, FloatArray]:
    """Check labels and probabilities; return them as bool and float64 arrays."""
    t = np.asarray(y_true)
    try:
        p = np.asarray(y_prob, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"y_prob must be numeric: {exc}") from exc
    if t.ndim != 1 or p.ndim != 1:
        raise ValueError(f"y_true and y_prob must be 1-D, got shapes {t.shape} and {p.shape}")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_prob differ in length: {t.size} != {p.size}")
    if t.size == 0:
        raise ValueError("no predictions to evaluate")
    if t.dtype.kind not in "biuf" or not np.isin(t, (0, 1)).all():
        raise ValueError("y_true must contain only the labels 0 and 1")
    if not np.isfinite(p).all():
        raise ValueError("y_prob must be finite (no NaN or infinity)")
    if (p < 0).any() or (p > 1).any():
        raise ValueError(f"y_prob must lie in [0, 1], got values in [{p.min():.6g}, {p.max():.6g}]")
    return t.astype(np.bool_), p


def _require_both_classes(t: BoolArray, what: str) -> None:
    positives = int(t.sum())
    if positives == 0 or positives == t.size:
        only = "positive" if positives else "negative"
        raise ValueError(f"{what} needs both classes, but every label is {only}")


# --------------------------------------------------------------------------- thresholded


def confusion_at(y_true: ArrayLike, y_prob: ArrayLike, threshold: float) -> Confusion:
    """Confusion counts when ``y_prob >= threshold`` is predicted positive.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    threshold : float
        Decision threshold; a probability equal to it counts as positive.

    Returns
    -------
    Confusion
        True/false positives and negatives.
    """
    t, p = _validate(y_true, y_prob)
    pred = p >= threshold
    tp = int(np.count_nonzero(pred & t))
    fp = int(np.count_nonzero(pred & ~t))
    fn = int(np.count_nonzero(~pred & t))
    return Confusion(tp=tp, fp=fp, tn=t.size - tp - fp - fn, fn=fn)


# --------------------------------------------------------------------------- ranking


def _score_groups(t: BoolArray, p: FloatArray) -> tuple[IntArray, IntArray, FloatArray, IntArray]:
    """Group predictions by distinct score, highest first.

    Returns the positives and negatives per group, the group scores, and the stable order that
    sorts the samples by descending score (the groups are consecutive runs of it).
    """
    order = np.argsort(-p, kind="stable")
    sorted_p = p[order]
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    sizes = np.diff(np.r_[starts, p.size])
    pos = np.add.reduceat(t[order].astype(np.int64), starts)
    return pos, sizes - pos, sorted_p[starts], order


def _ranked(
    y_true: ArrayLike, y_prob: ArrayLike, what: str
) -> tuple[IntArray, IntArray, FloatArray]:
    """The start of every ranking metric: validate, require both classes, group by score.

    Returns the positives and negatives per score group and the group scores, highest first.
    """
    t, p = _validate(y_true, y_prob)
    _require_both_classes(t, what)
    pos, neg, scores, _ = _score_groups(t, p)
    return pos, neg, scores


def _auc_from_groups(pos: NDArray[Any], neg: NDArray[Any]) -> FloatArray:
    """ROC AUC from per-score-group class counts (last axis: groups, highest score first).

    Mann-Whitney: each (positive, negative) pair scores 1 when the positive ranks higher and
    1/2 when tied, which is exactly the trapezoidal area under the full ROC curve. Counting in
    integers keeps the result exact until the single final division.
    """
    cum_pos_before = np.cumsum(pos, axis=-1) - pos
    twice_wins = np.sum(neg * (2 * cum_pos_before + pos), axis=-1)
    pairs = np.sum(pos, axis=-1) * np.sum(neg, axis=-1)
    return np.asarray(twice_wins / (2 * pairs), dtype=np.float64)


def _ap_from_groups(pos: NDArray[Any], neg: NDArray[Any]) -> FloatArray:
    """Average precision from per-score-group class counts (last axis: groups, highest first).

    sklearn's step integral ``sum_n (R_n - R_{n-1}) P_n``: the recall step at a group is its
    share of the positives, and groups without positives add nothing.
    """
    tp = np.cumsum(pos, axis=-1)
    predicted = tp + np.cumsum(neg, axis=-1)
    # Groups emptied by a bootstrap resample can leave 0 predicted positives; they have pos = 0.
    precision = np.divide(tp, predicted, out=np.zeros(tp.shape), where=predicted > 0)
    return np.asarray(np.sum(pos * precision, axis=-1) / np.sum(pos, axis=-1), dtype=np.float64)


def roc_curve(
    y_true: ArrayLike, y_prob: ArrayLike, *, drop_intermediate: bool = True
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Receiver operating characteristic curve, as ``sklearn.metrics.roc_curve``.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1; both must occur.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    drop_intermediate : bool, default True
        Drop thresholds whose point is collinear with its neighbours (it changes neither the
        plot nor the area), as scikit-learn does by default.

    Returns
    -------
    fpr, tpr : ndarray
        False and true positive rates, from (0, 0) up to (1, 1).
    thresholds : ndarray
        Decreasing; ``thresholds[i]`` gives ``fpr[i]``, ``tpr[i]`` under :func:`confusion_at`.
        The first is ``inf`` (nothing positive); the others are score values.

    Raises
    ------
    ValueError
        If the inputs are invalid or only one class is present.
    """
    pos, neg, scores = _ranked(y_true, y_prob, "roc_curve")
    tps, fps = np.cumsum(pos), np.cumsum(neg)
    if drop_intermediate and tps.size > 2:
        # A point is kept where the curve bends: non-zero second difference of fps or tps.
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps, scores = tps[keep], fps[keep], scores[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, scores]
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_auc(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Area under the ROC curve, as ``sklearn.metrics.roc_auc_score``.

    Tied scores count half, as the trapezoidal rule on the ROC curve does.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1; both must occur.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].

    Returns
    -------
    float
        The probability that a random positive scores above a random negative (ties: 1/2).

    Raises
    ------
    ValueError
        If the inputs are invalid or only one class is present.
    """
    pos, neg, _ = _ranked(y_true, y_prob, "roc_auc")
    return float(_auc_from_groups(pos, neg))


def pr_curve(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Precision-recall curve, as ``sklearn.metrics.precision_recall_curve``.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1; both must occur.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].

    Returns
    -------
    precision, recall : ndarray
        One entry per distinct score in increasing order of threshold, then the point
        (recall 0, precision 1) that has no threshold.
    thresholds : ndarray
        The distinct scores, increasing.

    Raises
    ------
    ValueError
        If the inputs are invalid or only one class is present.
    """
    pos, neg, scores = _ranked(y_true, y_prob, "pr_curve")
    tps, fps = np.cumsum(pos), np.cumsum(neg)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], scores[::-1].copy()


def average_precision(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Average precision, as ``sklearn.metrics.average_precision_score``.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds, without interpolation.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1; both must occur.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].

    Returns
    -------
    float
        The area under the precision-recall step curve.

    Raises
    ------
    ValueError
        If the inputs are invalid or only one class is present.
    """
    pos, neg, _ = _ranked(y_true, y_prob, "average_precision")
    return float(_ap_from_groups(pos, neg))


# --------------------------------------------------------------------------- calibration


def brier_score(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Mean squared difference between probability and label, as ``brier_score_loss``.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].

    Returns
    -------
    float
        0 for perfect confident predictions, 1 for confidently wrong ones.
    """
    t, p = _validate(y_true, y_prob)
    return float(np.mean((p - t) ** 2))


def calibration_bins(
    y_true: ArrayLike, y_prob: ArrayLike, bins: int = 10
) -> tuple[IntArray, FloatArray, FloatArray]:
    """Per-bin counts, mean probability and fraction of positives over equal-width bins.

    Bin ``k`` of ``bins`` holds the probabilities with ``k / bins <= p < (k + 1) / bins``,
    computed as ``floor(p * bins)``; the last bin also holds ``p == 1.0``, so the edges are
    ``linspace(0, 1, bins + 1)`` and every bin is half-open except the last, which is closed.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    bins : int, default 10
        Number of bins.

    Returns
    -------
    counts : ndarray of int64, shape (bins,)
        Predictions per bin.
    mean_prob, frac_positive : ndarray of float64, shape (bins,)
        Mean probability and fraction of positive labels per bin; NaN for empty bins.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    t, p = _validate(y_true, y_prob)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.int64)
    prob_sum = np.bincount(index, weights=p, minlength=bins)
    pos_sum = np.bincount(index, weights=t.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, prob_sum / counts, pos_sum / counts


def expected_calibration_error(y_true: ArrayLike, y_prob: ArrayLike, bins: int = 10) -> float:
    """Expected calibration error over equal-width probability bins.

    ``ECE = sum_k (n_k / n) |mean label in bin k - mean probability in bin k|``, with the bins
    of :func:`calibration_bins` (edges ``linspace(0, 1, bins + 1)``, bin ``k`` is
    ``[k / bins, (k + 1) / bins)``, and a probability of exactly 1.0 falls in the last bin).
    Empty bins add nothing.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    bins : int, default 10
        Number of bins.

    Returns
    -------
    float
        0 for a perfectly calibrated model, at most 1.
    """
    counts, mean_prob, frac_pos = calibration_bins(y_true, y_prob, bins)
    filled = counts > 0
    gaps = np.abs(frac_pos[filled] - mean_prob[filled])
    return float(np.sum(counts[filled] * gaps) / np.sum(counts))


# --------------------------------------------------------------------------- bootstrap

_MAX_REDRAW_ROUNDS = 1000
# Metrics with a vectorised bootstrap; results are bit-identical to calling them per resample.
_GROUPED: dict[Metric, Callable[[NDArray[Any], NDArray[Any]], FloatArray]] = {
    roc_auc: _auc_from_groups,
    average_precision: _ap_from_groups,
}


def _draw_resamples(
    t: BoolArray, n: int, rng: np.random.Generator, both_classes: bool
) -> NDArray[np.intp]:
    """``n`` rows of bootstrap indices; with ``both_classes``, rows with one class are redrawn."""
    size = t.size
    if not both_classes:
        return rng.integers(0, size, size=(n, size))
    _require_both_classes(t, "bootstrap_ci of this metric")
    kept: list[NDArray[np.intp]] = []
    have = 0
    for _ in range(_MAX_REDRAW_ROUNDS):
        idx = rng.integers(0, size, size=(n - have, size))
        positives = t[idx].sum(axis=1)
        idx = idx[(positives > 0) & (positives < size)]
        kept.append(idx)
        have += idx.shape[0]
        if have == n:
            return np.concatenate(kept)
    raise ValueError("too few resamples contain both classes; the data is too unbalanced")


def bootstrap_ci(
    metric: Metric,
    y_true: ArrayLike,
    y_prob: ArrayLike,
    *,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    both_classes: bool | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric.

    Resamples the predictions with replacement ``n`` times, evaluates ``metric`` on each, and
    returns the ``alpha / 2`` and ``1 - alpha / 2`` quantiles (linear interpolation). For
    metrics that need both classes, resamples holding one class only are redrawn, so exactly
    ``n`` resamples count. The same ``seed`` gives the same interval. :func:`roc_auc` and
    :func:`average_precision` are evaluated for all resamples at once.

    Parameters
    ----------
    metric : callable
        ``metric(y_true, y_prob) -> float``; it receives int64 labels and float64 probabilities.
    y_true : array_like of shape (n,)
        Labels, 0 or 1.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    n : int, default 1000
        Number of resamples.
    seed : int, default 0
        Seed of the ``numpy.random.default_rng`` that draws the resamples.
    alpha : float, default 0.05
        One minus the coverage: 0.05 gives a 95% interval.
    both_classes : bool, optional
        Whether resamples need both classes; by default True for :func:`roc_auc` and
        :func:`average_precision`, False for other metrics.

    Returns
    -------
    tuple of float
        Lower and upper bound.

    Raises
    ------
    ValueError
        If the inputs are invalid, ``n < 1``, ``alpha`` is not in (0, 1), or the metric needs
        both classes and they do not both occur.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    t, p = _validate(y_true, y_prob)
    grouped = _GROUPED.get(metric)
    if both_classes is None:
        both_classes = grouped is not None
    idx = _draw_resamples(t, n, np.random.default_rng(seed), both_classes)
    if grouped is not None:
        stats = _grouped_bootstrap(grouped, t, p, idx)
    else:
        labels = t.astype(np.int64)
        stats = np.array([metric(labels[row], p[row]) for row in idx], dtype=np.float64)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _grouped_bootstrap(
    kernel: Callable[[NDArray[Any], NDArray[Any]], FloatArray],
    t: BoolArray,
    p: FloatArray,
    idx: NDArray[np.intp],
) -> FloatArray:
    """Evaluate a score-group kernel on every resample at once.

    A resample is a multiset of the original predictions, so it is fully described by how often
    each one was drawn; summing those counts within score groups gives each resample's per-group
    class counts without sorting it again.
    """
    n, size = idx.shape
    pos, neg, _, order = _score_groups(t, p)
    starts = np.r_[0, np.cumsum(pos + neg)[:-1]]
    offsets = (np.arange(n, dtype=np.int64) * size)[:, None]
    counts = np.bincount((idx + offsets).ravel(), minlength=n * size).reshape(n, size)
    counts = counts[:, order]
    sorted_t = t[order]
    group_pos = np.add.reduceat(counts * sorted_t, starts, axis=1)
    group_all = np.add.reduceat(counts, starts, axis=1)
    return kernel(group_pos, group_all - group_pos)


# --------------------------------------------------------------------------- operating points


def youden_threshold(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """The score threshold that maximises Youden's J = sensitivity + specificity - 1.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1; both must occur.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].

    Returns
    -------
    float
        A value of ``y_prob``: ``confusion_at(y_true, y_prob, threshold)`` reaches the maximal
        ``tpr - fpr``. Among equally good thresholds the highest is returned.

    Raises
    ------
    ValueError
        If the inputs are invalid or only one class is present.
    """
    fpr, tpr, thresholds = roc_curve(y_true, y_prob, drop_intermediate=False)
    # Skip the leading infinite threshold; its J is 0, which the lowest score also reaches.
    j = (tpr - fpr)[1:]
    return float(thresholds[1:][int(np.argmax(j))])


def threshold_for_sensitivity(y_true: ArrayLike, y_prob: ArrayLike, target: float) -> float:
    """The highest score threshold whose sensitivity (recall) is at least ``target``.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1; at least one must be positive.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    target : float
        Required sensitivity, in [0, 1].

    Returns
    -------
    float
        A value of ``y_prob``; ``confusion_at`` at this threshold has recall >= ``target``, and
        at any higher score value recall < ``target``.

    Raises
    ------
    ValueError
        If the inputs are invalid, ``target`` is outside [0, 1], or there is no positive label.
    """
    if not 0 <= target <= 1:
        raise ValueError(f"target sensitivity must lie in [0, 1], got {target}")
    t, p = _validate(y_true, y_prob)
    positives = int(t.sum())
    if positives == 0:
        raise ValueError("sensitivity is undefined without positive labels")
    pos, _, scores, _ = _score_groups(t, p)
    # Integer comparison avoids a float recall like 0.9 being a hair below the target.
    needed = math.ceil(target * positives - 1e-9)
    first = int(np.argmax(np.cumsum(pos) >= needed))
    return float(scores[first])


# --------------------------------------------------------------------------- reports


def classification_report(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    threshold: float,
    *,
    target_sensitivity: float = 0.9,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All classification metrics at once, as JSON-ready Python values.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    threshold : float
        Decision threshold for the thresholded metrics (``y_prob >= threshold`` is positive).
    target_sensitivity : float, default 0.9
        Sensitivity for ``threshold_at_target_sensitivity``.
    n_bootstrap : int, default 1000
        Resamples for ``roc_auc_ci95``; 0 skips the interval (it is then None).
    seed : int, default 0
        Seed of the bootstrap.

    Returns
    -------
    dict
        Keys ``n``, ``positives``, ``negatives``, ``threshold``, ``accuracy``, ``precision``,
        ``recall``, ``sensitivity`` (= recall), ``specificity``, ``f1``, ``roc_auc``,
        ``roc_auc_ci95`` (``[lo, hi]``), ``pr_auc`` (average precision), ``brier``, ``ece``
        (10 bins), ``confusion`` (``{"tp", "fp", "tn", "fn"}``), ``target_sensitivity`` and
        ``threshold_at_target_sensitivity``. Ratios with a zero denominator are 0.0. With one
        class only, ``roc_auc``, ``roc_auc_ci95`` and ``pr_auc`` are None, and so is
        ``threshold_at_target_sensitivity`` when there is no positive.

    Raises
    ------
    ValueError
        If the inputs are invalid.
    """
    t, p = _validate(y_true, y_prob)
    c = confusion_at(t, p, threshold)
    positives = int(t.sum())
    both = 0 < positives < t.size
    auc = roc_auc(t, p) if both else None
    ci = bootstrap_ci(roc_auc, t, p, n=n_bootstrap, seed=seed) if both and n_bootstrap else None
    return {
        "n": int(t.size),
        "positives": positives,
        "negatives": int(t.size) - positives,
        "threshold": float(threshold),
        "accuracy": c.accuracy,
        "precision": c.precision,
        "recall": c.recall,
        "sensitivity": c.recall,
        "specificity": c.specificity,
        "f1": c.f1,
        "roc_auc": auc,
        "roc_auc_ci95": list(ci) if ci is not None else None,
        "pr_auc": average_precision(t, p) if both else None,
        "brier": brier_score(t, p),
        "ece": expected_calibration_error(t, p),
        "confusion": {"tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn},
        "target_sensitivity": float(target_sensitivity),
        "threshold_at_target_sensitivity": (
            threshold_for_sensitivity(t, p, target_sensitivity) if positives else None
        ),
    }


# --------------------------------------------------------------------------- segmentation


def _as_mask(arr: ArrayLike, what: str) -> BoolArray:
    mask = np.asarray(arr)
    if mask.dtype != np.bool_:
        raise ValueError(f"{what} must be a boolean mask, got dtype {mask.dtype}")
    return mask


def _check_pair(pred: BoolArray, truth: BoolArray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(f"prediction and truth shapes differ: {pred.shape} != {truth.shape}")


def dice(pred: ArrayLike, truth: ArrayLike) -> float:
    """Dice coefficient ``2 |A & B| / (|A| + |B|)`` of two boolean masks.

    Parameters
    ----------
    pred, truth : array_like of bool
        Masks of the same shape.

    Returns
    -------
    float
        In [0, 1]; 1.0 when both masks are empty (nothing to find, nothing found).

    Raises
    ------
    ValueError
        If a mask is not boolean or the shapes differ.
    """
    a, b = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    _check_pair(a, b)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def _components(mask: BoolArray) -> tuple[IntArray, int]:
    """Label connected components with full connectivity (8 in 2D, 26 in 3D)."""
    if mask.ndim not in (2, 3):
        raise ValueError(f"lesion masks must be 2-D or 3-D, got {mask.ndim}-D")
    # skimage is untyped; cast keeps mypy --strict quiet about the call.
    sk_label = cast(Callable[..., tuple[Any, int]], measure.label)
    labels, count = sk_label(mask, connectivity=mask.ndim, return_num=True)
    return np.asarray(labels, dtype=np.int64), int(count)


def lesion_detection(
    preds: Sequence[ArrayLike], truths: Sequence[ArrayLike], *, min_pixels: int = 1
) -> dict[str, Any]:
    """Lesion-level detection: connected components of predictions against true lesions.

    Each connected component of a truth mask is a lesion; predicted components smaller than
    ``min_pixels`` are ignored. A lesion is detected when any remaining predicted component
    overlaps it by at least one pixel; a predicted component overlapping no lesion is a false
    positive.

    Parameters
    ----------
    preds, truths : sequence of array_like of bool
        Per image, the predicted and true masks (2-D or 3-D, same shape).
    min_pixels : int, default 1
        Smallest predicted component that counts.

    Returns
    -------
    dict
        ``n_images``, ``n_lesions``, ``detected``, ``sensitivity`` (detected / lesions, 0.0
        without lesions), ``false_positives`` and ``fp_per_image`` (0.0 without images).

    Raises
    ------
    ValueError
        If the sequences differ in length or a pair of masks is invalid.
    """
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions but {len(truths)} truths")
    n_lesions = detected = false_positives = 0
    for pred_in, truth_in in zip(preds, truths, strict=True):
        pred, truth = _as_mask(pred_in, "pred"), _as_mask(truth_in, "truth")
        _check_pair(pred, truth)
        truth_lab, n_true = _components(truth)
        pred_lab, n_pred = _components(pred)
        sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
        kept = sizes >= min_pixels
        kept[0] = False
        both = (truth_lab > 0) & kept[pred_lab]
        n_lesions += n_true
        detected += np.unique(truth_lab[both]).size
        false_positives += int(kept.sum()) - np.unique(pred_lab[both]).size
    return {
        "n_images": len(preds),
        "n_lesions": n_lesions,
        "detected": detected,
        "sensitivity": _ratio(detected, n_lesions),
        "false_positives": false_positives,
        "fp_per_image": _ratio(false_positives, len(preds)),
    }


def _bootstrap_mean_ci(
    values: FloatArray, *, n: int, seed: int, alpha: float
) -> tuple[float, float]:
    idx = np.random.default_rng(seed).integers(0, values.size, size=(n, values.size))
    lo, hi = np.quantile(values[idx].mean(axis=1), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def segmentation_report(
    prob_maps: Sequence[ArrayLike],
    truths: Sequence[ArrayLike],
    threshold: float,
    *,
    min_component_pixels: int = 4,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Pixel overlap and lesion detection of probability maps against true masks.

    Parameters
    ----------
    prob_maps : sequence of array_like
        Per image, the predicted lesion probability per pixel; ``>= threshold`` is lesion.
    truths : sequence of array_like of bool
        Per image, the true lesion mask, same shape as its probability map.
    threshold : float
        Pixel decision threshold.
    min_component_pixels : int, default 4
        Smallest predicted component that counts for lesion detection (Dice uses every pixel).
    n_bootstrap : int, default 1000
        Resamples of the images for ``dice_ci95``.
    seed : int, default 0
        Seed of the bootstrap.
    alpha : float, default 0.05
        One minus the coverage of ``dice_ci95``.

    Returns
    -------
    dict
        ``dice_mean`` (mean per-image Dice), ``dice_ci95`` (``[lo, hi]``, percentile bootstrap
        over images), ``dice_positive_mean`` (over images with a lesion; None if there is
        none), and the keys of :func:`lesion_detection`.

    Raises
    ------
    ValueError
        If there are no images, the sequences differ in length, or a pair is invalid.
    """
    if not prob_maps:
        raise ValueError("no images to evaluate")
    if len(prob_maps) != len(truths):
        raise ValueError(f"{len(prob_maps)} probability maps but {len(truths)} truths")
    preds = [np.asarray(m, dtype=np.float64) >= threshold for m in prob_maps]
    masks = [_as_mask(t, "truth") for t in truths]
    scores = np.array([dice(p, t) for p, t in zip(preds, masks, strict=True)])
    positive = np.array([bool(t.any()) for t in masks])
    report: dict[str, Any] = {
        "dice_mean": float(scores.mean()),
        "dice_ci95": list(_bootstrap_mean_ci(scores, n=n_bootstrap, seed=seed, alpha=alpha)),
        "dice_positive_mean": float(scores[positive].mean()) if positive.any() else None,
    }
    report.update(lesion_detection(preds, masks, min_pixels=min_component_pixels))
    return report
