"""Per-lesion evaluation of a volume model: matching, FROC, Dice, volume and diameter errors.

A study is a pair of label volumes on the source slices' grid: the ground truth (0 background,
``1..N`` lesions, as :func:`~dicom_ai.training.synth.read_lesion_masks` gives it) and the
detections (``1..M``, each with a score: the peak probability the model gave it).

**The matching rule** (:func:`match_lesions`): a detection *hits* a truth lesion when

* they share at least one voxel, or
* the detection's centroid lies within the truth lesion's equivalent-sphere radius
  (``(3 V / 4 pi) ** (1/3)``) of the truth lesion's centroid, in mm (a small lesion whose
  detected mask is shifted off it by a voxel of resampling still counts).

A truth lesion is *detected* when at least one detection hits it; a detection that hits no
truth lesion is a *false positive*. Several detections on one lesion count once (the lesion is
found) and none of them is a false positive: the convention of LUNA16's FROC.

**FROC** (:func:`froc`): over the candidates' score thresholds, sensitivity (detected truth
lesions / all truth lesions, pooled over studies) against false positives per volume (false
positives / studies); the sensitivity at a rate ``r`` is the highest one reached with at most
``r`` false positives per volume, reported at :data:`FROC_RATES` (0.125 .. 8) and averaged into
the competition performance metric (CPM).

Confidence intervals are percentile bootstraps over *studies* (a study is resampled with all
its lesions and detections: lesions of one study are not independent), seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from dicom_ai.pipeline.volume import Grid, measure_lesions
from dicom_ai.training.evaluate import SYNTHETIC_NOTE
from dicom_ai.training.metrics import dice as _dice  # `dice` names a lesion's value below

__all__ = ["CANDIDATE_THRESHOLD", "FROC_RATES", "SIZE_BINS_MM", "SYNTHETIC_NOTE", "CaseMatch",
           "Detection", "TruthLesion", "bootstrap_over_cases", "froc", "froc_curve",
           "headline", "match_lesions", "model_card", "volume_report"]

#: False positives per volume at which the FROC sensitivity is reported (LUNA16's seven).
FROC_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: The threshold of the candidate pass that feeds the FROC (well below the operating 0.5).
CANDIDATE_THRESHOLD = 0.1
#: Upper bounds (mm, longest axial diameter of the truth) of the size bins of sensitivity.
SIZE_BINS_MM: tuple[float, ...] = (6.0, 10.0, math.inf)

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class TruthLesion:
    """One ground-truth lesion and what the model made of it.

    Attributes
    ----------
    label : int
        Its label in the truth volume.
    volume_mm3 : float
        Its volume (voxels x voxel volume).
    diameter_mm : float
        Its longest axial diameter (in-plane, over its slices).
    detections : tuple of int
        Labels of the detections that hit it (empty: missed).
    score : float
        The highest score among them (``-inf`` when missed).
    dice : float or None
        Dice of its mask with the union of the detections that hit it.
    detected_volume_mm3, detected_diameter_mm : float or None
        Volume and longest axial diameter of that union.
    """

    label: int
    volume_mm3: float
    diameter_mm: float
    detections: tuple[int, ...]
    score: float
    dice: float | None
    detected_volume_mm3: float | None
    detected_diameter_mm: float | None

    @property
    def detected(self) -> bool:
        """Whether at least one detection hits it."""
        return bool(self.detections)


@dataclass(frozen=True)
class Detection:
    """One detection of the model.

    Attributes
    ----------
    label : int
        Its label in the detection volume.
    score : float
        Its score (peak probability).
    volume_mm3 : float
        Its volume.
    hits : tuple of int
        The truth lesions it hits (empty: a false positive).
    """

    label: int
    score: float
    volume_mm3: float
    hits: tuple[int, ...]

    @property
    def false_positive(self) -> bool:
        """Whether it hits no truth lesion."""
        return not self.hits


@dataclass(frozen=True)
class CaseMatch:
    """The matching of one study (see :func:`match_lesions`).

    Attributes
    ----------
    truth : list of TruthLesion
        Every truth lesion, in label order.
    detections : list of Detection
        Every detection, in label order.
    dice : float
        Dice of all detected voxels with all truth voxels (1.0 when both are empty).
    """

    truth: list[TruthLesion]
    detections: list[Detection]
    dice: float


def _diameter(mask: NDArray[np.bool_], spacing: tuple[float, float, float]) -> float:
    """Longest axial diameter (mm) of one mask, measured as served lesions are."""
    if not mask.any():
        return 0.0
    s, r, c = mask.shape
    lesions = measure_lesions(mask.astype(np.uint8), Grid((s, r, c), spacing, (0.0, 0.0, 0.0),
                                                          _IDENTITY))
    return lesions[0].longest_axial_diameter_mm


def _boxes(labels: NDArray[Any]) -> dict[int, tuple[slice, ...]]:
    return {i: box for i, box in enumerate(ndimage.find_objects(labels), start=1)
            if box is not None}


def _union(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b,
                                                                                  strict=True))


def match_lesions(truth: NDArray[Any], detections: NDArray[Any],
                  spacing: tuple[float, float, float], *,
                  scores: Sequence[float] | None = None) -> CaseMatch:
    """Match one study's detections to its truth lesions (the rule: the module docstring).

    Parameters
    ----------
    truth : numpy.ndarray
        Integer ``(slices, rows, columns)``: 0 background, ``1..N`` truth lesions.
    detections : numpy.ndarray
        Integer, same shape: 0 background, ``1..M`` detections.
    spacing : tuple of float
        ``(slice, row, column)`` mm of the grid.
    scores : sequence of float, optional
        Score of detection ``i`` at index ``i - 1``; by default 1.0 each.

    Returns
    -------
    CaseMatch

    Raises
    ------
    ValueError
        Shapes that differ, or fewer scores than detections.
    """
    truth = np.asarray(truth)
    detections = np.asarray(detections)
    if truth.shape != detections.shape or truth.ndim != 3:
        raise ValueError(f"truth {truth.shape} and detections {detections.shape} must be the "
                         "same 3D grid")
    voxel = float(spacing[0] * spacing[1] * spacing[2])
    scale = np.asarray(spacing, dtype=np.float64)
    t_boxes, d_boxes = _boxes(truth), _boxes(detections)
    n_det = int(detections.max(initial=0))
    score_of = [1.0] * n_det if scores is None else [float(s) for s in scores]
    if len(score_of) < n_det:
        raise ValueError(f"{n_det} detections but {len(score_of)} scores")

    def centroid(labels: NDArray[Any], box: tuple[slice, ...], label: int
                 ) -> tuple[NDArray[np.float64], int]:
        inside = np.argwhere(labels[box] == label)
        offset = np.array([b.start for b in box], dtype=np.float64)
        return (inside.mean(axis=0) + offset) * scale, len(inside)

    t_info = {i: centroid(truth, box, i) for i, box in t_boxes.items()}
    d_info = {j: centroid(detections, box, j) for j, box in d_boxes.items()}
    hits: dict[int, set[int]] = {j: set() for j in d_boxes}
    for j, box in d_boxes.items():
        under = truth[box][detections[box] == j]
        hits[j].update(int(v) for v in np.unique(under) if v)
        for i, (t_centre, t_voxels) in t_info.items():
            radius = (3.0 * t_voxels * voxel / (4.0 * math.pi)) ** (1.0 / 3.0)
            if float(np.linalg.norm(d_info[j][0] - t_centre)) <= radius:
                hits[j].add(i)
    lesions: list[TruthLesion] = []
    for i, box in t_boxes.items():
        mine = tuple(sorted(j for j, hit in hits.items() if i in hit))
        t_mask_box = box
        for j in mine:
            t_mask_box = _union(t_mask_box, d_boxes[j])
        t_mask = truth[t_mask_box] == i
        dice = volume = diameter = None
        if mine:
            d_mask = np.isin(detections[t_mask_box], mine)
            # Detections may reach beyond this union box only if they overlap no more of it.
            dice = _dice(t_mask, d_mask)
            volume = sum(d_info[j][1] for j in mine) * voxel
            diameter = _diameter(d_mask, spacing)
        lesions.append(TruthLesion(
            label=i, volume_mm3=t_info[i][1] * voxel, diameter_mm=_diameter(t_mask, spacing),
            detections=mine, score=max((score_of[j - 1] for j in mine), default=-math.inf),
            dice=dice, detected_volume_mm3=volume, detected_diameter_mm=diameter))
    found = [Detection(label=j, score=score_of[j - 1], volume_mm3=d_info[j][1] * voxel,
                       hits=tuple(sorted(hits[j]))) for j in d_boxes]
    return CaseMatch(lesions, found, _dice(truth > 0, detections > 0))


# --------------------------------------------------------------------------- FROC
def froc_curve(cases: Sequence[CaseMatch]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The FROC curve: false positives per volume and sensitivity, threshold by threshold.

    Parameters
    ----------
    cases : sequence of CaseMatch
        The studies (negatives included: they add false positives and volumes).

    Returns
    -------
    tuple of numpy.ndarray
        ``fp_per_volume`` and ``sensitivity`` at every distinct score, highest first, after a
        leading ``(0, 0)`` point (no detection kept). Sensitivity is NaN without truth lesions.
    """
    if not cases:
        raise ValueError("froc needs at least one study")
    best = np.array([t.score for c in cases for t in c.truth], dtype=np.float64)
    fps = np.array([d.score for c in cases for d in c.detections if d.false_positive],
                   dtype=np.float64)
    thresholds = np.unique(np.concatenate([best[np.isfinite(best)], fps]))[::-1]
    n_lesions = len(best)
    found = np.array([(best >= t).sum() for t in thresholds], dtype=np.float64)
    false = np.array([(fps >= t).sum() for t in thresholds], dtype=np.float64)
    sens = found / n_lesions if n_lesions else np.full(len(thresholds), np.nan)
    return (np.concatenate([[0.0], false / len(cases)]),
            np.concatenate([[0.0 if n_lesions else np.nan], sens]))


def froc(cases: Sequence[CaseMatch], rates: Sequence[float] = FROC_RATES) -> list[float]:
    """Sensitivity at each false-positive rate: the best reached with at most that many.

    Parameters
    ----------
    cases : sequence of CaseMatch
        The studies.
    rates : sequence of float
        False positives per volume.

    Returns
    -------
    list of float
        One sensitivity per rate (NaN without truth lesions).
    """
    fp, sens = froc_curve(cases)
    return [float(np.max(sens[fp <= r])) for r in rates]


# --------------------------------------------------------------------------- bootstrap
def bootstrap_over_cases(cases: Sequence[CaseMatch],
                         statistic: Callable[[Sequence[CaseMatch]], float | Sequence[float]],
                         *, n: int = 1000, seed: int = 0, alpha: float = 0.05
                         ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Percentile bootstrap CI of a statistic of the studies, resampling whole studies.

    Parameters
    ----------
    cases : sequence of CaseMatch
        The studies.
    statistic : callable
        ``statistic(cases) -> float`` or a sequence of floats (NaN allowed: ignored).
    n : int
        Resamples.
    seed : int
        Seed of the resampling.
    alpha : float
        0.05 gives a 95% interval.

    Returns
    -------
    tuple of numpy.ndarray
        Lower and upper bounds, one per value of the statistic.
    """
    if n < 1 or not cases:
        raise ValueError("bootstrap needs n >= 1 and at least one study")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pick = rng.integers(0, len(cases), size=len(cases))
        values.append(np.atleast_1d(np.asarray(statistic([cases[i] for i in pick]),
                                               dtype=np.float64)))
    stack = np.vstack(values)
    lo = np.full(stack.shape[1], np.nan)
    hi = np.full(stack.shape[1], np.nan)
    for k in range(stack.shape[1]):
        column = stack[:, k][np.isfinite(stack[:, k])]
        if len(column):
            lo[k], hi[k] = np.quantile(column, [alpha / 2, 1 - alpha / 2])
    return lo, hi


# --------------------------------------------------------------------------- the report
def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _detected(cases: Sequence[CaseMatch]) -> list[TruthLesion]:
    return [t for c in cases for t in c.truth if t.detected]


def _sensitivity(cases: Sequence[CaseMatch]) -> float:
    lesions = [t for c in cases for t in c.truth]
    return sum(t.detected for t in lesions) / len(lesions) if lesions else math.nan


def _fp_rate(cases: Sequence[CaseMatch]) -> float:
    return sum(d.false_positive for c in cases for d in c.detections) / len(cases)


def _volume_dice(cases: Sequence[CaseMatch]) -> float:
    return _mean([c.dice for c in cases if c.truth])


def _lesion_dice(cases: Sequence[CaseMatch]) -> float:
    return _mean([t.dice for t in _detected(cases) if t.dice is not None])


def _volume_errors(cases: Sequence[CaseMatch]) -> list[float]:
    return [(t.detected_volume_mm3 - t.volume_mm3) / t.volume_mm3 for t in _detected(cases)
            if t.detected_volume_mm3 is not None and t.volume_mm3 > 0]


def _diameter_errors(cases: Sequence[CaseMatch]) -> list[float]:
    return [t.detected_diameter_mm - t.diameter_mm for t in _detected(cases)
            if t.detected_diameter_mm is not None]


def _abs_volume_error(cases: Sequence[CaseMatch]) -> float:
    return _mean([abs(e) for e in _volume_errors(cases)])


def _abs_diameter_error(cases: Sequence[CaseMatch]) -> float:
    return _mean([abs(e) for e in _diameter_errors(cases)])


def _point(value: float, ci: tuple[float, float]) -> dict[str, float]:
    return {"value": value, "ci_low": ci[0], "ci_high": ci[1]}


def volume_report(operating: Sequence[CaseMatch], candidates: Sequence[CaseMatch] | None = None,
                  *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every per-lesion metric with bootstrap 95% CIs over studies.

    Parameters
    ----------
    operating : sequence of CaseMatch
        The studies as served (the spec's threshold): sensitivity, false positives, Dice,
        volume and diameter errors.
    candidates : sequence of CaseMatch, optional
        The same studies at :data:`CANDIDATE_THRESHOLD` (detections scored): the FROC; by
        default ``operating``'s detections.
    n_boot : int
        Bootstrap resamples.
    seed : int
        Their seed.

    Returns
    -------
    dict
        ``studies``, ``lesions``, ``operating`` (sensitivity, false positives per volume),
        ``froc`` (rates, sensitivity and CIs, CPM, the curve), ``dice_per_volume``,
        ``dice_per_lesion``, ``volume_error`` (relative, detected lesions: signed mean, mean and
        median absolute), ``diameter_error_mm`` (the same in mm), ``by_size`` (sensitivity per
        truth diameter bin). Each headline number is ``{value, ci_low, ci_high}``.
    """
    if not operating:
        raise ValueError("volume_report needs at least one study")
    froc_cases = list(candidates) if candidates is not None else list(operating)
    if len(froc_cases) != len(operating):
        raise ValueError("candidates must be the same studies as operating")

    def ci(stat: Callable[[Sequence[CaseMatch]], float], cases: Sequence[CaseMatch] = operating,
           salt: int = 0) -> tuple[float, float]:
        lo, hi = bootstrap_over_cases(cases, stat, n=n_boot, seed=seed + salt)
        return float(lo[0]), float(hi[0])

    points = froc(froc_cases)
    lo, hi = bootstrap_over_cases(froc_cases, froc, n=n_boot, seed=seed + 1)
    cpm_lo, cpm_hi = bootstrap_over_cases(
        froc_cases, lambda cs: float(np.nanmean(froc(cs))), n=n_boot, seed=seed + 1)
    fp_curve, sens_curve = froc_curve(froc_cases)
    volume_errors = _volume_errors(operating)
    diameter_errors = _diameter_errors(operating)
    truth = [t for c in operating for t in c.truth]
    by_size: list[dict[str, Any]] = []
    lower = 0.0
    for upper in SIZE_BINS_MM:
        inside = [t for t in truth if lower <= t.diameter_mm < upper]
        by_size.append({"diameter_mm": [lower, upper if math.isfinite(upper) else None],
                        "lesions": len(inside), "detected": sum(t.detected for t in inside),
                        "sensitivity": (sum(t.detected for t in inside) / len(inside)
                                        if inside else math.nan)})
        lower = upper
    return {
        "studies": len(operating),
        "studies_with_lesions": sum(1 for c in operating if c.truth),
        "lesions": len(truth),
        "matching": ("a detection hits a truth lesion when they share a voxel or its centroid "
                     "lies within the lesion's equivalent-sphere radius of the lesion's "
                     "centroid; several detections on one lesion count once, none of them "
                     "false positive"),
        "operating": {
            "detected": sum(t.detected for t in truth),
            "false_positives": sum(d.false_positive for c in operating for d in c.detections),
            "sensitivity": _point(_sensitivity(operating), ci(_sensitivity)),
            "fp_per_volume": _point(_fp_rate(operating), ci(_fp_rate, salt=2)),
        },
        "froc": {
            "candidate_threshold": CANDIDATE_THRESHOLD,
            "rates": list(FROC_RATES),
            "sensitivity": points,
            "ci_low": [float(v) for v in lo],
            "ci_high": [float(v) for v in hi],
            "cpm": _point(float(np.nanmean(points)), (float(cpm_lo[0]), float(cpm_hi[0]))),
            "curve": {"fp_per_volume": [float(v) for v in fp_curve],
                      "sensitivity": [float(v) for v in sens_curve]},
        },
        "dice_per_volume": _point(_volume_dice(operating), ci(_volume_dice, salt=3)),
        "dice_per_lesion": _point(_lesion_dice(operating), ci(_lesion_dice, salt=4)),
        "volume_error": {
            "signed_mean": _mean(volume_errors),
            "median_abs": float(np.median(np.abs(volume_errors))) if volume_errors else math.nan,
            "abs_mean": _point(_abs_volume_error(operating), ci(_abs_volume_error, salt=5)),
        },
        "diameter_error_mm": {
            "signed_mean": _mean(diameter_errors),
            "median_abs": (float(np.median(np.abs(diameter_errors))) if diameter_errors
                           else math.nan),
            "abs_mean": _point(_abs_diameter_error(operating), ci(_abs_diameter_error, salt=6)),
        },
        "by_size": by_size,
    }


def headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The spec's ``provenance.metrics``: the point estimates of :func:`volume_report`."""
    out = {
        "studies": float(metrics["studies"]), "lesions": float(metrics["lesions"]),
        "sensitivity": metrics["operating"]["sensitivity"]["value"],
        "fp_per_volume": metrics["operating"]["fp_per_volume"]["value"],
        "froc_cpm": metrics["froc"]["cpm"]["value"],
        "dice_per_volume": metrics["dice_per_volume"]["value"],
        "dice_per_lesion": metrics["dice_per_lesion"]["value"],
        "volume_abs_error": metrics["volume_error"]["abs_mean"]["value"],
        "diameter_abs_error_mm": metrics["diameter_error_mm"]["abs_mean"]["value"],
    }
    for rate, sens in zip(metrics["froc"]["rates"], metrics["froc"]["sensitivity"], strict=True):
        out[f"froc_sensitivity_at_{rate:g}_fp"] = sens
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _fmt(point: Mapping[str, float], scale: float = 1.0, digits: int = 3) -> str:
    return (f"{point['value'] * scale:.{digits}f} "
            f"(95% CI {point['ci_low'] * scale:.{digits}f}-{point['ci_high'] * scale:.{digits}f})")


def model_card(spec: Any, metrics: Mapping[str, Any], test_data: str,
               history: Mapping[str, Any]) -> str:
    """The model card (Markdown) of a volume model from its spec and :func:`volume_report`.

    Parameters
    ----------
    spec : ModelSpec
        The model's spec.
    metrics : mapping
        :func:`volume_report`'s result.
    test_data : str
        What the metrics were measured on.
    history : mapping
        Training ``loss`` per epoch and ``seconds``.

    Returns
    -------
    str
    """
    prep = spec.preprocessing
    op = metrics["operating"]
    fr = metrics["froc"]
    lines = [
        f"# {spec.name} {spec.version}",
        "",
        f"**{SYNTHETIC_NOTE}** Synthetic-only: every training and test study is a dicom-ai "
        "synth chest CT phantom; nothing here says how the model behaves on patient scans.",
        "",
        "## Model",
        "",
        f"- {spec.description}.",
        f"- Input: {prep.slices_k} adjacent slices as channels, {prep.input_shape[0]} x "
        f"{prep.input_shape[1]} patches, volume resampled to {prep.target_spacing} mm "
        f"(slice, row, column), window {prep.window}, normalisation {prep.normalization}; "
        f"sliding window, overlap {prep.overlap}, {prep.blend} blending.",
        f"- Output: lesion probability per voxel, mapped back to the source slices; lesions "
        f"are connected components at {spec.outputs[0].threshold} of at least "
        f"{spec.min_component_pixels} voxels.",
        f"- Training: {spec.provenance.training_data}; {len(history.get('loss', []))} epochs "
        f"in {history.get('seconds', 0)} s on 2 CPU cores.",
        "",
        f"## Held-out evaluation ({test_data})",
        "",
        f"{metrics['studies']} studies ({metrics['studies_with_lesions']} with lesions), "
        f"{metrics['lesions']} lesions. Matching rule: {metrics['matching']}. 95% CIs: "
        "percentile bootstrap over studies.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| sensitivity at the operating threshold | {_fmt(op['sensitivity'])} |",
        f"| false positives per volume | {_fmt(op['fp_per_volume'], digits=2)} |",
        f"| FROC CPM (mean sensitivity at 0.125-8 FP/volume) | {_fmt(fr['cpm'])} |",
        f"| Dice per volume (studies with lesions) | {_fmt(metrics['dice_per_volume'])} |",
        f"| Dice per detected lesion | {_fmt(metrics['dice_per_lesion'])} |",
        f"| volume error, mean absolute (relative) | "
        f"{_fmt(metrics['volume_error']['abs_mean'])} |",
        f"| volume error, signed mean (relative) | "
        f"{metrics['volume_error']['signed_mean']:.3f} |",
        f"| longest axial diameter error, mean absolute (mm) | "
        f"{_fmt(metrics['diameter_error_mm']['abs_mean'], digits=2)} |",
        "",
        "FROC (candidates at probability "
        f"{fr['candidate_threshold']}, scored by their peak probability):",
        "",
        "| FP per volume | sensitivity (95% CI) |",
        "|---|---|",
    ]
    for rate, s, lo, hi in zip(fr["rates"], fr["sensitivity"], fr["ci_low"], fr["ci_high"],
                               strict=True):
        lines.append(f"| {rate:g} | {s:.3f} ({lo:.3f}-{hi:.3f}) |")
    lines += ["", "Sensitivity by truth diameter:", "", "| diameter (mm) | lesions | detected |",
              "|---|---|---|"]
    for row in metrics["by_size"]:
        lo_mm, hi_mm = row["diameter_mm"]
        label = f"{lo_mm:g}-{hi_mm:g}" if hi_mm is not None else f">= {lo_mm:g}"
        lines.append(f"| {label} | {row['lesions']} | {row['detected']} |")
    lines += ["", "![FROC](froc.png)", "",
              "## Limitations", "",
              "- Synthetic phantoms only; not validated on patient images; not for clinical "
              "use.",
              "- Lesions are spheres of uniform attenuation in lungs and liver; low-contrast "
              "liver lesions and lesions under about two model voxels (3 mm) are the ones it "
              "misses.", ""]
    return "\n".join(lines)
