"""Evaluation plots are valid PNGs; the model card carries metrics, CI and the right notices."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from dicom_ai.training.metrics import classification_report
from dicom_ai.training.report import (
    SYNTHETIC_ONLY_NOTICE,
    plot_calibration,
    plot_learning_curve,
    plot_pr,
    plot_roc,
    plot_training_curves,
    write_model_card,
)


@pytest.fixture
def predictions() -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    return y, np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)


def _assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        assert width > 0
        assert height > 0
        # Small: a few hundred pixels a side at 100 dpi.
        assert max(width, height) < 2000
        img.verify()
    assert plt.get_fignums() == [], "figures must be closed"


def test_plot_roc_pr_calibration(
    tmp_path: Path, predictions: tuple[NDArray[np.int64], NDArray[np.float64]]
) -> None:
    y, p = predictions
    out = plot_roc(y, p, tmp_path / "roc.png", title="Validation ROC")
    assert out == tmp_path / "roc.png"
    _assert_png(out)
    _assert_png(plot_pr(y, p, tmp_path / "pr.png"))
    _assert_png(plot_calibration(y, p, tmp_path / "nested" / "calibration.png", bins=5))


def test_plot_training_curves(tmp_path: Path) -> None:
    history = {
        "loss": [0.7, 0.5, 0.4],
        "val_loss": [0.72, 0.6, 0.55],
        "auc": [0.6, 0.75, 0.8],
        "val_auc": [0.58, 0.7, 0.74],
        "val_only": [1.0, 2.0],
    }
    _assert_png(plot_training_curves(history, str(tmp_path / "history.png")))
    with pytest.raises(ValueError, match="no values"):
        plot_training_curves({"loss": []}, tmp_path / "empty.png")


def test_plot_learning_curve(tmp_path: Path) -> None:
    points = [(200, 0.8, 0.9), (50, 0.62, 0.81), (100, 0.7, 0.86)]
    _assert_png(plot_learning_curve(points, tmp_path / "learning.png"))
    with pytest.raises(ValueError, match="no learning-curve points"):
        plot_learning_curve([], tmp_path / "none.png")


def _card(tmp_path: Path, *, synthetic_only: bool) -> str:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    metrics = classification_report(y, p, 0.5, n_bootstrap=100)
    card = write_model_card(
        tmp_path / "card",
        name="chest-nodule",
        version="0.1.0",
        task="binary classification: nodule present",
        description="A small CNN on 256 x 256 radiographs.",
        intended_use="Demonstrating the training pipeline.",
        training_data="400 phantom radiographs.",
        metrics=metrics,
        limitations=["Evaluated on 100 images only."],
        synthetic_only=synthetic_only,
        plots=["roc.png"],
    )
    assert card == tmp_path / "card" / "model_card.md"
    text = card.read_text(encoding="utf-8")
    lo, hi = metrics["roc_auc_ci95"]
    assert f"| ROC AUC | {metrics['roc_auc']:.4f} (95% CI {lo:.4f} to {hi:.4f}) |" in text
    assert f"| Sensitivity | {metrics['sensitivity']:.4f} |" in text
    assert f"| Brier score | {metrics['brier']:.4f} |" in text
    assert "tp = " in text
    assert "roc_auc_ci95" not in text
    return text


def test_model_card_synthetic_only(tmp_path: Path) -> None:
    text = _card(tmp_path, synthetic_only=True)
    for section in (
        "## Model details",
        "## Intended use",
        "## Training data",
        "## Evaluation",
        "## Limitations",
    ):
        assert section in text
    assert SYNTHETIC_ONLY_NOTICE in text
    assert "synthetic phantoms only and is not for clinical use" in text
    assert "- Evaluated on 100 images only." in text
    assert "![roc](roc.png)" in text


def test_model_card_without_notice(tmp_path: Path) -> None:
    text = _card(tmp_path, synthetic_only=False)
    assert SYNTHETIC_ONLY_NOTICE not in text
    assert "clinical use" not in text


def test_model_card_segmentation_metrics(tmp_path: Path) -> None:
    metrics = {"dice_mean": 0.8, "dice_ci95": [0.7, 0.9], "n_lesions": 3, "sensitivity": 2 / 3}
    card = write_model_card(
        tmp_path,
        name="liver-lesion",
        version="0.1.0",
        task="segmentation",
        description="U-Net.",
        intended_use="Demonstrations.",
        training_data="Phantom volumes.",
        metrics=metrics,
        limitations=[],
        synthetic_only=False,
        plots=[],
    )
    text = card.read_text(encoding="utf-8")
    assert "| Dice (mean) | 0.8000 (95% CI 0.7000 to 0.9000) |" in text
    assert "| Lesion sensitivity | 0.6667 |" in text
    assert "| Lesions | 3 |" in text
