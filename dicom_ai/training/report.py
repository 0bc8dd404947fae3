"""Evaluation plots (PNG) and a Markdown model card, for a trained model's release notes.

The plots use matplotlib's non-interactive Agg backend, so they work on headless machines and
never open a window; each function writes one small PNG (100 dpi), closes its figure and returns
the path. :func:`write_model_card` writes ``model_card.md`` from aggregate metrics only: nothing
in it comes from an image or a DICOM header, so it carries no patient data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib

# Select the backend before pyplot is imported: pyplot picks an interactive one otherwise.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike

from dicom_ai.training.metrics import (
    average_precision,
    calibration_bins,
    pr_curve,
    roc_auc,
    roc_curve,
)

__all__ = [
    "SYNTHETIC_ONLY_NOTICE",
    "plot_calibration",
    "plot_froc",
    "plot_learning_curve",
    "plot_pr",
    "plot_roc",
    "plot_training_curves",
    "write_model_card",
]

PathLike = str | os.PathLike[str]

#: The sentence a model card carries when the model has only seen synthetic phantoms.
SYNTHETIC_ONLY_NOTICE = (
    "This model is trained on synthetic phantoms only and is not for clinical use."
)

_DPI = 100


def _save(fig: Figure, path: PathLike) -> Path:
    """Write ``fig`` as PNG and close it, creating the parent folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        # pyplot keeps every open figure alive; close even when saving fails.
        plt.close(fig)
    return out


def _finish(
    fig: Figure, ax: Axes, path: PathLike, *, legend_loc: Literal["lower left", "lower right"]
) -> Path:
    """Give a one-axes plot its legend and the light grid every plot here has, then save it."""
    ax.legend(loc=legend_loc)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_froc(froc_metrics: Mapping[str, Any], path: PathLike) -> Path:
    """The FROC curve with the reported points and their CIs, as a PNG.

    Parameters
    ----------
    froc_metrics : mapping
        ``volume_metrics.volume_report(...)["froc"]``: the ``curve`` (``fp_per_volume``,
        ``sensitivity``), and the reported ``rates`` with ``sensitivity``, ``ci_low`` and
        ``ci_high``.
    path : str or path-like
        Where to write the PNG.

    Returns
    -------
    Path
        ``path``.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    curve = froc_metrics["curve"]
    ax.step(np.maximum(curve["fp_per_volume"], 1e-2), curve["sensitivity"], where="post",
            label="FROC (held-out studies)")
    rates = np.asarray(froc_metrics["rates"], dtype=np.float64)
    sens = np.asarray(froc_metrics["sensitivity"], dtype=np.float64)
    err = np.vstack([sens - np.asarray(froc_metrics["ci_low"], dtype=np.float64),
                     np.asarray(froc_metrics["ci_high"], dtype=np.float64) - sens])
    ax.errorbar(rates, sens, yerr=np.clip(err, 0.0, None), fmt="o", capsize=3,
                label="sensitivity at fixed FP/volume (95% CI)")
    ax.set_xscale("log")
    ax.set_xlim(0.1, 10.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("false positives per volume")
    ax.set_ylabel("lesion sensitivity")
    return _finish(fig, ax, path, legend_loc="lower right")


def plot_roc(
    y_true: ArrayLike, y_prob: ArrayLike, path: PathLike, *, title: str = "ROC curve"
) -> Path:
    """Plot the ROC curve with its AUC and the chance diagonal.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1; both must occur.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    path : str or path-like
        Where to write the PNG.
    title : str, default "ROC curve"
        Axes title.

    Returns
    -------
    Path
        ``path``.
    """
    fpr, tpr, _ = roc_curve(y_true, y_prob)
    auc = roc_auc(y_true, y_prob)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"model (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    return _finish(fig, ax, path, legend_loc="lower right")


def plot_pr(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    path: PathLike,
    *,
    title: str = "Precision-recall curve",
) -> Path:
    """Plot the precision-recall curve with its average precision and the prevalence baseline.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1; both must occur.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    path : str or path-like
        Where to write the PNG.
    title : str, default "Precision-recall curve"
        Axes title.

    Returns
    -------
    Path
        ``path``.
    """
    precision, recall, _ = pr_curve(y_true, y_prob)
    ap = average_precision(y_true, y_prob)
    prevalence = float(np.mean(np.asarray(y_true) == 1))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    # Average precision integrates this step function, so draw steps, not interpolated lines.
    ax.step(recall, precision, where="post", lw=2, label=f"model (AP = {ap:.3f})")
    ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"prevalence ({prevalence:.2f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title, xlabel="recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    return _finish(fig, ax, path, legend_loc="lower left")


def plot_calibration(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    path: PathLike,
    *,
    bins: int = 10,
    title: str = "Calibration",
) -> Path:
    """Plot a reliability diagram above a histogram of the predicted probabilities.

    The bins are those of :func:`dicom_ai.training.metrics.calibration_bins`, so the plot
    shows what :func:`~dicom_ai.training.metrics.expected_calibration_error` measures.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Labels, 0 or 1.
    y_prob : array_like of shape (n,)
        Predicted probabilities of the positive class, in [0, 1].
    path : str or path-like
        Where to write the PNG.
    bins : int, default 10
        Number of equal-width probability bins.
    title : str, default "Calibration"
        Title of the reliability diagram.

    Returns
    -------
    Path
        ``path``.
    """
    counts, mean_prob, frac_pos = calibration_bins(y_true, y_prob, bins)
    filled = counts > 0
    edges = np.linspace(0.0, 1.0, bins + 1)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    top.plot(mean_prob[filled], frac_pos[filled], marker="o", lw=2, label="model")
    top.set(xlim=(0, 1), ylim=(0, 1), title=title, ylabel="fraction of positives")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(edges[:-1], counts, width=1.0 / bins, align="edge", edgecolor="white")
    bottom.set(xlabel="predicted probability", ylabel="count")
    return _save(fig, path)


def plot_training_curves(history: Mapping[str, Sequence[float]], path: PathLike) -> Path:
    """Plot each training metric per epoch next to its ``val_`` twin, one subplot per metric.

    Parameters
    ----------
    history : mapping of str to sequence of float
        Per-epoch values, as in ``keras.callbacks.History.history``: ``loss``, ``val_loss``,
        ``auc``, ``val_auc``, ... A ``val_`` key without a training twin gets its own subplot.
    path : str or path-like
        Where to write the PNG.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``history`` holds no values.
    """
    names = [k for k in history if not k.startswith("val_")]
    names += [k[4:] for k in history if k.startswith("val_") and k[4:] not in history]
    names = [k for k in names if len(history.get(k, ())) or len(history.get(f"val_{k}", ()))]
    if not names:
        raise ValueError("the training history holds no values to plot")
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for key, label in ((name, "train"), (f"val_{name}", "validation")):
            values = history.get(key)
            if values is not None and len(values):
                ax.plot(range(1, len(values) + 1), values, marker=".", label=label)
        ax.set(title=name, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def plot_learning_curve(
    points: Sequence[tuple[int, float, float]],
    path: PathLike,
    *,
    labels: tuple[str, str] = ("from scratch", "pretrained backbone"),
    metric: str = "test ROC AUC",
) -> Path:
    """Plot ROC AUC against the number of labelled training studies for two models.

    Parameters
    ----------
    points : sequence of (int, float, float)
        ``(training studies, AUC of the first model, AUC of the second model)``; any order.
    path : str or path-like
        Where to write the PNG.
    labels : tuple of str, default ("from scratch", "pretrained backbone")
        Legend labels of the two models.
    metric : str, default "test ROC AUC"
        The y-axis label: which data the AUCs were measured on.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If ``points`` is empty.
    """
    if not points:
        raise ValueError("no learning-curve points to plot")
    ordered = sorted(points)
    studies = [p[0] for p in ordered]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for column, label in enumerate(labels, start=1):
        ax.plot(studies, [p[column] for p in ordered], marker="o", lw=2, label=label)
    ax.axhline(0.5, ls="--", color="grey", lw=1, label="chance")
    ax.set(title="Learning curve", xlabel="labelled training studies", ylabel=metric)
    ax.set_ylim(min(0.45, *(min(p[1], p[2]) - 0.02 for p in ordered)), 1.0)
    return _finish(fig, ax, path, legend_loc="lower right")


# --------------------------------------------------------------------------- model card

_METRIC_LABELS = {
    "n": "Predictions",
    "positives": "Positives",
    "negatives": "Negatives",
    "threshold": "Decision threshold",
    "accuracy": "Accuracy",
    "precision": "Precision (PPV)",
    "recall": "Recall",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "f1": "F1 score",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "brier": "Brier score",
    "ece": "Expected calibration error",
    "target_sensitivity": "Target sensitivity",
    "threshold_at_target_sensitivity": "Threshold at target sensitivity",
    "dice_mean": "Dice (mean)",
    "dice_positive_mean": "Dice (images with a lesion)",
    "n_images": "Images",
    "n_lesions": "Lesions",
    "detected": "Lesions detected",
    "false_positives": "False-positive components",
    "fp_per_image": "False positives per image",
}
# Shown inside the row of the metric they qualify rather than as rows of their own.
_INTERVALS = {"roc_auc_ci95": "roc_auc", "dice_ci95": "dice_mean"}


def _cell(value: Any) -> str:
    """Render one metric value for a Markdown table cell."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.4f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} = {_cell(v)}" for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    lines = ["| Metric | Value |", "| --- | --- |"]
    for key, value in metrics.items():
        if key in _INTERVALS and _INTERVALS[key] in metrics:
            continue
        text = _cell(value)
        interval = next((k for k, v in _INTERVALS.items() if v == key), None)
        if interval is not None and metrics.get(interval) is not None:
            lo, hi = metrics[interval]
            text += f" (95% CI {float(lo):.4f} to {float(hi):.4f})"
        label = _METRIC_LABELS.get(key, key.replace("_", " "))
        if key == "confusion":
            label = "Confusion matrix"
        elif key == "sensitivity" and "n_lesions" in metrics:
            # Segmentation reports carry lesion-level sensitivity under the same key.
            label = "Lesion sensitivity"
        lines.append(f"| {label} | {text} |")
    return lines


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100.0 * float(value):.1f}%"


def _localisation_section(loc: Mapping[str, Any]) -> list[str]:
    """The model card's Localisation section: region vs. peak-point hit rates."""
    distance = loc.get("point_distance_mm_median")
    longest = loc.get("point_distance_mm_max")
    rows = [
        ("True positives with a lesion mask", _cell(loc.get("true_positives"))),
        ("Region hit rate (box overlaps a lesion)", _percent(loc.get("region_hit_rate"))),
        ("Peak-point hit rate (peak inside a lesion)", _percent(loc.get("point_hit_rate"))),
        ("Peak to nearest lesion pixel, median / max",
         "n/a" if distance is None else f"{distance:.1f} mm / {float(longest or 0.0):.1f} mm"),
        ("Box area, median share of the image",
         _percent(loc.get("region_area_fraction_median"))),
        ("Chance level: the same boxes placed at random",
         _percent(loc.get("region_hit_rate_random"))),
    ]
    return [
        "## Localisation", "",
        "Where a present finding is, as the service reports it: the bounding box of the "
        f"Grad-CAM map's region above {float(loc.get('cut', 0.5)):.0%} of its peak (TID 1410 "
        "SCOORD POLYLINE), compared with the map's peak as a point (what earlier versions "
        "reported), on the true positives of the test set against their ground-truth lesion "
        "masks.", "",
        "| Measure | Value |", "| --- | --- |",
        *[f"| {label} | {value} |" for label, value in rows], "",
    ]


def write_model_card(
    out: Path,
    *,
    name: str,
    version: str,
    task: str,
    description: str,
    intended_use: str,
    training_data: str,
    metrics: Mapping[str, Any],
    limitations: Sequence[str],
    synthetic_only: bool,
    plots: Sequence[str] = (),
    localisation: Mapping[str, Any] | None = None,
) -> Path:
    """Write a Markdown model card, ``out/model_card.md``.

    Sections: Model details, Intended use, Training data, Evaluation (a table of ``metrics``,
    with the ROC AUC 95% confidence interval from ``roc_auc_ci95`` in the AUC row, and the
    plots), Limitations. Only the given aggregate values are written; pass no patient data.

    Parameters
    ----------
    out : Path
        Folder of the card (created if missing).
    name, version, task, description : str
        Model details.
    intended_use : str
        Who should use the model, for what.
    training_data : str
        What the model was trained and evaluated on.
    metrics : mapping of str to Any
        Evaluation results, e.g. from :func:`~dicom_ai.training.metrics.classification_report`.
    limitations : sequence of str
        Known limitations, one bullet each.
    synthetic_only : bool
        Whether the model has only seen synthetic phantoms; the card then states, at the top,
        under Intended use and under Limitations, that it is not for clinical use.
    plots : sequence of str, default ()
        Image paths to embed, best given relative to ``out``.
    localisation : mapping, optional
        Heat-map localisation against lesion masks
        (:func:`~dicom_ai.training.localisation.localisation_report`): a Localisation section.

    Returns
    -------
    Path
        The written ``model_card.md``.
    """
    notice = [f"> **{SYNTHETIC_ONLY_NOTICE}**", ""] if synthetic_only else []
    lines = [f"# Model card: {name}", "", *notice]
    lines += [
        "## Model details",
        "",
        f"- **Name:** {name}",
        f"- **Version:** {version}",
        f"- **Task:** {task}",
        "",
        description,
        "",
        "## Intended use",
        "",
        intended_use,
        "",
    ]
    if synthetic_only:
        lines += [SYNTHETIC_ONLY_NOTICE, ""]
    lines += ["## Training data", "", training_data, "", "## Evaluation", ""]
    lines += [*_metrics_table(metrics), ""] if metrics else ["No evaluation results.", ""]
    lines += [f"![{Path(plot).stem.replace('_', ' ')}]({plot})" for plot in plots]
    if plots:
        lines.append("")
    if localisation:
        lines += _localisation_section(localisation)
    bullets = [SYNTHETIC_ONLY_NOTICE] if synthetic_only else []
    bullets += list(limitations)
    lines += ["## Limitations", ""]
    lines += [f"- {item}" for item in bullets] if bullets else ["None recorded."]
    out.mkdir(parents=True, exist_ok=True)
    card = out / "model_card.md"
    card.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return card
