"""Out-of-distribution score: how far an input lies from the model's training inputs.

A classifier trained on synthetic chest CR gives real radiographs a probability near 1.0 and says
nothing about it. Each model version therefore carries statistics of its training inputs in the
network's own feature space (the global-average-pooled last convolutional features, the input of
its head), saved beside the network as ``ood.npz``:

- the mean and a shrinkage-regularised covariance (Ledoit and Wolf, 2004, on standardised
  features) of the training images' features, stored as the mean and the precision matrix;
- a threshold: the ``quantile`` (default 0.99) of the scores of held-out images of the training
  distribution (the validation split), so about 1 % of in-distribution inputs are flagged.

An input's score is its Mahalanobis distance to that mean (Lee et al., 2018, "A simple unified
framework for detecting out-of-distribution samples"); above the threshold it is flagged
"outside the training distribution". The features come from the same forward pass as the
probabilities (:class:`~dicom_ai.inference.runtime.Predictor`); a model folder without
``ood.npz`` (or a network without a pooled feature layer, e.g. a U-Net) has no score. This
module is numpy only: no TensorFlow.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["OOD_FILE", "OodStats", "fit_stats", "ledoit_wolf", "read_stats", "write_stats"]

#: The statistics' file name inside a model folder.
OOD_FILE = "ood.npz"


@dataclass(frozen=True)
class OodStats:
    """Training-input statistics of one model version, and its flagging threshold.

    Attributes
    ----------
    layer : str
        The network layer whose output is the feature vector (e.g. ``"backbone_gap"``).
    mean : ndarray
        ``(D,)`` mean feature of the training images.
    precision : ndarray
        ``(D, D)`` inverse of the shrunk covariance.
    threshold : float
        Scores above it are flagged.
    quantile : float
        Which quantile of the held-out scores the threshold is.
    shrinkage : float
        The Ledoit-Wolf shrinkage intensity used, in [0, 1].
    n_fit, n_heldout : int
        How many images the statistics and the threshold came from.
    """

    layer: str
    mean: NDArray[np.float64]
    precision: NDArray[np.float64]
    threshold: float
    quantile: float = 0.99
    shrinkage: float = 0.0
    n_fit: int = 0
    n_heldout: int = 0

    def score(self, features: NDArray[Any]) -> NDArray[np.float32]:
        """Mahalanobis distances of a batch of feature vectors.

        Parameters
        ----------
        features : ndarray
            ``(N, D)`` features from :attr:`layer`.

        Returns
        -------
        ndarray of float32
            ``(N,)`` distances, >= 0.
        """
        centred = np.asarray(features, dtype=np.float64).reshape(len(features), -1) - self.mean
        squared = np.einsum("ij,jk,ik->i", centred, self.precision, centred)
        distances: NDArray[np.float32] = np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)
        return distances

    def flagged(self, scores: NDArray[Any]) -> NDArray[np.bool_]:
        """Which scores are above the threshold (outside the training distribution)."""
        return np.asarray(scores) > self.threshold


def ledoit_wolf(x: NDArray[Any]) -> tuple[NDArray[np.float64], float]:
    """The Ledoit-Wolf shrunk covariance of centred rows `x`, toward a scaled identity.

    ``(1 - a) S + a (tr S / D) I`` with the intensity ``a`` that minimises the expected
    Frobenius error (Ledoit and Wolf, 2004, "A well-conditioned estimator for large-dimensional
    covariance matrices"); invertible whenever ``a > 0``, even with fewer images than features.

    Parameters
    ----------
    x : ndarray
        ``(N, D)`` centred samples.

    Returns
    -------
    tuple of (ndarray, float)
        The ``(D, D)`` covariance and the intensity ``a``.
    """
    n, d = x.shape
    sample = x.T @ x / n
    mu = float(np.trace(sample)) / d
    target = mu * np.eye(d)
    delta = float(np.sum((sample - target) ** 2)) / d
    # Sum over samples of ||x x^T - S||_F^2 = sum ||x||^4 - n ||S||_F^2.
    spread = (float(np.sum(np.sum(x**2, axis=1) ** 2)) - n * float(np.sum(sample**2))) / d
    beta = min(spread / n**2, delta)
    shrinkage = 0.0 if delta == 0 else beta / delta
    return (1 - shrinkage) * sample + shrinkage * target, shrinkage


def fit_stats(fit: NDArray[Any], heldout: NDArray[Any], *, layer: str,
              quantile: float = 0.99) -> OodStats:
    """Statistics of training features and a threshold from held-out ones.

    Features are standardised per dimension before shrinkage (so no one unit's scale dominates
    the identity target); the stored precision maps raw features directly.

    Parameters
    ----------
    fit : ndarray
        ``(N, D)`` features of the training images.
    heldout : ndarray
        ``(M, D)`` features of held-out images of the same distribution (e.g. validation).
    layer : str
        The layer they came from.
    quantile : float
        The threshold is this quantile of the held-out scores.

    Returns
    -------
    OodStats

    Raises
    ------
    ValueError
        Fewer than two training images, no held-out image, or mismatched dimensions.
    """
    fit = np.asarray(fit, dtype=np.float64).reshape(len(fit), -1)
    heldout = np.asarray(heldout, dtype=np.float64).reshape(len(heldout), -1)
    if len(fit) < 2 or len(heldout) < 1 or fit.shape[1] != heldout.shape[1]:
        raise ValueError(f"need >= 2 training and >= 1 held-out feature vectors of one size, "
                         f"got {fit.shape} and {heldout.shape}")
    if not 0.5 <= quantile < 1:
        raise ValueError(f"quantile must be in [0.5, 1), not {quantile}")
    mean = fit.mean(axis=0)
    scale = fit.std(axis=0)
    scale[scale < 1e-6] = 1e-6  # a dead unit: any change in it is out of distribution
    covariance, shrinkage = ledoit_wolf((fit - mean) / scale)
    inverse = np.linalg.pinv(covariance, hermitian=True)
    precision = inverse / np.outer(scale, scale)
    draft = OodStats(layer=layer, mean=mean, precision=precision, threshold=0.0,
                     quantile=quantile, shrinkage=shrinkage, n_fit=len(fit),
                     n_heldout=len(heldout))
    threshold = float(np.quantile(draft.score(heldout), quantile))
    return OodStats(**{**draft.__dict__, "threshold": threshold})


def write_stats(stats: OodStats, folder: Path) -> Path:
    """Write ``ood.npz`` into a model folder (atomically; float32 arrays keep it small).

    Returns
    -------
    Path
        The file written.
    """
    folder = Path(folder)
    meta = {"layer": stats.layer, "threshold": stats.threshold, "quantile": stats.quantile,
            "shrinkage": stats.shrinkage, "n_fit": stats.n_fit, "n_heldout": stats.n_heldout}
    handle, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
    os.close(handle)
    try:
        np.savez_compressed(tmp, mean=stats.mean.astype(np.float32),
                            precision=stats.precision.astype(np.float32),
                            meta=np.array(json.dumps(meta)))
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the model folder is shared
        os.replace(tmp, folder / OOD_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return folder / OOD_FILE


def read_stats(folder: Path) -> OodStats | None:
    """The statistics of a model folder, or None when it has none.

    Raises
    ------
    ValueError
        The file exists but is unreadable or inconsistent.
    """
    path = Path(folder) / OOD_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            mean = np.asarray(data["mean"], dtype=np.float64)
            precision = np.asarray(data["precision"], dtype=np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if mean.ndim != 1 or precision.shape != (mean.size, mean.size):
        raise ValueError(f"{path}: mean {mean.shape} and precision {precision.shape} disagree")
    return OodStats(layer=str(meta["layer"]), mean=mean, precision=precision,
                    threshold=float(meta["threshold"]), quantile=float(meta["quantile"]),
                    shrinkage=float(meta["shrinkage"]), n_fit=int(meta["n_fit"]),
                    n_heldout=int(meta["n_heldout"]))
