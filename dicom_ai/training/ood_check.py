"""Out-of-distribution statistics for a trained classifier folder, and their validation.

:func:`bundle_ood` writes ``ood.npz`` (:mod:`dicom_ai.inference.ood`) for a model folder that
was trained without one, from the same training split ``dicom-ai train`` used (split by patient,
the spec's seed and validation fraction): statistics of the training images, threshold on the
validation images. :func:`validate_ood` scores held-out synthetic studies against the real
radiographs and other body parts and modalities in pydicom's test files, each through the
model's own preprocessing, and reports the ROC AUC of the score (in-distribution vs each group)
and the share of each group flagged.

Run::

    .venv/bin/python -m dicom_ai.training.ood_check MODEL_FOLDER TRAIN_DIR TEST_DIR [--fit]
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dicom_ai.inference.ood import OodStats
from dicom_ai.inference.spec import read_spec

__all__ = ["bundle_ood", "pydicom_groups", "score_auc", "score_files", "validate_ood"]

LOGGER = logging.getLogger(__name__)


def score_auc(inside: NDArray[Any], outside: NDArray[Any]) -> float:
    """ROC AUC of a score separating `outside` (higher) from `inside`: the Mann-Whitney U
    statistic over all pairs, ties counted half (scores are unbounded, not probabilities)."""
    inside = np.asarray(inside, dtype=np.float64)[:, None]
    outside = np.asarray(outside, dtype=np.float64)[None, :]
    return float(np.mean((outside > inside) + 0.5 * (outside == inside)))


def bundle_ood(folder: Path, train_dir: Path, *, labels: Path | None = None) -> OodStats | None:
    """Write ``ood.npz`` into a trained classifier folder from its training data.

    Parameters
    ----------
    folder : Path
        The model folder.
    train_dir : Path
        The training studies (with ``labels.csv`` unless `labels` is given).
    labels : Path, optional
        The labels CSV.

    Returns
    -------
    OodStats or None
        None when the network has no pooled feature layer.
    """
    import keras

    from dicom_ai.training.dataset import load_inputs, read_samples, split_by_patient
    from dicom_ai.training.train import fit_ood

    spec = read_spec(folder)
    split = spec.training.get("split", {})
    samples = read_samples(train_dir, labels or train_dir / "labels.csv")
    train_set, val_set = split_by_patient(
        samples, val_fraction=float(split.get("validation_fraction", 0.2)),
        seed=int(spec.training.get("seed", 0)))
    model = keras.saving.load_model(folder / spec.network, compile=False)
    return fit_ood(model, load_inputs(train_set, spec.preprocessing),
                   load_inputs(val_set, spec.preprocessing), folder)


def pydicom_groups() -> dict[str, list[Path]]:
    """pydicom's image test files by group: real chest CR, other CR, and each other modality."""
    import pydicom
    from pydicom.data import get_testdata_files

    groups: dict[str, list[Path]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(get_testdata_files("*")):
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True)
            except Exception:  # not DICOM (pydicom ships other test data too)
                LOGGER.debug("not a DICOM file: %s", name)
                continue
            if "PixelData" not in ds and not ds.get("Rows"):
                continue
            modality = str(ds.get("Modality", "") or "none")
            body = str(ds.get("BodyPartExamined", "") or "").upper()
            group = ("real CR chest" if modality == "CR" and body == "CHEST" else
                     "real CR other body part" if modality in ("CR", "DX") else modality)
            groups.setdefault(group, []).append(Path(name))
    return groups


def score_files(predictor: Any, paths: Sequence[Path]) -> tuple[NDArray[np.float32],
                                                              NDArray[np.float32]]:
    """OOD scores and probabilities of the first frame of each file that preprocesses.

    Files that cannot be decoded or preprocessed (e.g. no pixel data, an unsupported layout)
    are left out.
    """
    import pydicom

    from dicom_ai.pipeline.loading import frames_of
    from dicom_ai.pipeline.preprocessing import preprocess_frame

    inputs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            try:
                frame = frames_of([pydicom.dcmread(path)])[0]
                inputs.append(preprocess_frame(frame.array, frame.dataset,
                                               predictor.spec.preprocessing))
            except Exception:  # a file the service would not take either
                LOGGER.debug("left out (cannot be decoded or preprocessed): %s", path.name)
                continue
    if not inputs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    probs, scores = predictor.predict_with_ood(np.stack(inputs))
    if scores is None:
        raise ValueError(f"{predictor.label} has no out-of-distribution statistics")
    return scores, probs[:, 0]


def validate_ood(folder: Path, test_dir: Path) -> dict[str, Any]:
    """How well the score separates held-out synthetic studies from pydicom's test images.

    Parameters
    ----------
    folder : Path
        The model folder (with ``ood.npz``).
    test_dir : Path
        Held-out synthetic studies of the training distribution.

    Returns
    -------
    dict
        Per group: images, share flagged, ROC AUC of the score against the synthetic group
        (1.0: every image of the group scores above every synthetic one), median, lowest and
        highest score and median probability; plus the threshold.
    """
    from dicom_ai.inference.runtime import load_predictor

    predictor = load_predictor(folder)
    if predictor.ood is None:
        raise ValueError(f"{folder} has no out-of-distribution statistics")
    synth, synth_probs = score_files(predictor, sorted(test_dir.rglob("*.dcm")))
    groups: dict[str, Any] = {}

    def row(scores: NDArray[np.float32], probs: NDArray[np.float32]) -> dict[str, Any]:
        assert predictor.ood is not None
        return {"images": len(scores),
                "flagged": float(np.mean(predictor.ood.flagged(scores))) if len(scores) else None,
                "median_score": float(np.median(scores)) if len(scores) else None,
                "min_score": float(np.min(scores)) if len(scores) else None,
                "max_score": float(np.max(scores)) if len(scores) else None,
                "median_probability": float(np.median(probs)) if len(probs) else None}

    groups["synth CR (held-out, in distribution)"] = row(synth, synth_probs)
    everything_else = []
    for name, paths in sorted(pydicom_groups().items()):
        scores, probs = score_files(predictor, paths)
        if not len(scores):
            continue
        everything_else.append(scores)
        groups[name] = row(scores, probs) | {"roc_auc": score_auc(synth, scores)}
    others = np.concatenate(everything_else) if everything_else else np.zeros(0, np.float32)
    return {"model": f"{predictor.spec.name} {predictor.spec.version}",
            "threshold": predictor.ood.threshold, "quantile": predictor.ood.quantile,
            "groups": groups,
            "all pydicom images": row(others, np.zeros(0, np.float32)) | {
                "roc_auc": score_auc(synth, others) if len(others) else None}}


def main() -> None:
    """Command-line entry: (re)fit a folder's statistics and validate them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("train_dir", type=Path)
    parser.add_argument("test_dir", type=Path)
    parser.add_argument("--fit", action="store_true", help="write ood.npz first")
    parser.add_argument("--out", type=Path, help="write the validation JSON here")
    args = parser.parse_args()
    if args.fit:
        bundle_ood(args.folder, args.train_dir)
    result = validate_ood(args.folder, args.test_dir)
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
