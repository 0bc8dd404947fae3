"""``dicom-ai evaluate``: a model on labelled DICOM, through the serving path, honestly reported.

The images go through :func:`~dicom_ai.training.dataset.load_inputs` (the serving
``model_inputs``) and the model through :func:`~dicom_ai.inference.runtime.load_predictor`, so the
figures are those of the service. Classification reports accuracy, precision, recall, specificity,
F1, ROC AUC with a bootstrap 95% CI, PR AUC, Brier score, expected calibration error, the
confusion matrix at the spec's threshold and the threshold reaching a target sensitivity;
segmentation reports Dice and per-lesion detection. A Keras classifier evaluated on images with
lesion masks also gets its localisation measured: the hit rates of the heat-map regions the
service reports, and of the old peak point (:mod:`dicom_ai.training.localisation`), under
``localisation``. With an output folder it writes plots, the metrics as JSON and a model card.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicom_ai.inference.runtime import Predictor, load_predictor
from dicom_ai.inference.spec import ModelSpec
from dicom_ai.training.dataset import Sample, load_inputs, load_masks, read_samples

__all__ = ["SYNTHETIC_NOTE", "evaluate_model", "localisation"]

SYNTHETIC_NOTE = ("Trained on synthetic phantoms only (dicom-ai synth); not validated on patient "
                  "images and not for clinical use.")


def _synthetic_only(spec: ModelSpec) -> bool:
    return "synth" in spec.provenance.training_data.lower()


def _mm_per_input_pixel(sample: Sample, spec: ModelSpec) -> float:
    """Size in mm of one model-input pixel of `sample` (rows; 1 pixel = 1 mm without spacing)."""
    import pydicom

    header = pydicom.dcmread(sample.path, stop_before_pixels=True)
    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
    row_mm = float(spacing[0]) if spacing else 1.0
    return row_mm * int(header.Rows) / int(spec.preprocessing.input_shape[0])


def localisation(predictor: Predictor, samples: list[Sample], inputs: Any,
                 probs: Any) -> dict[str, Any] | None:
    """Localisation of a Keras classifier's true positives against their lesion masks.

    The maps are the service's (:class:`~dicom_ai.inference.explain.GradCam`,
    ``scale="probability"``); see :func:`~dicom_ai.training.localisation.localisation_report`.

    Parameters
    ----------
    predictor : Predictor
        The loaded classifier.
    samples : list of Sample
        The evaluated images, in the order of `inputs` and `probs`.
    inputs, probs : numpy.ndarray
        Model inputs ``(N, H, W, C)`` and outputs ``(N, K)``.

    Returns
    -------
    dict or None
        None when it does not apply: not a Keras classifier, or no positive with a mask.
    """
    spec = predictor.spec
    if spec.task != "classification" or predictor.backend != "keras":
        return None
    threshold = spec.outputs[0].threshold
    positives = [i for i, s in enumerate(samples) if s.label == 1 and s.mask_path is not None]
    hits = [i for i in positives if float(probs[i, 0]) >= threshold]
    if not positives:
        return None
    from dicom_ai.inference.explain import GradCam
    from dicom_ai.training.localisation import localisation_report

    explainer = GradCam(predictor.model, scale="probability")  # type: ignore[attr-defined]
    chosen = [samples[i] for i in hits]
    maps: list[Any] = list(explainer(np.asarray(inputs)[hits])) if hits else []
    masks: list[Any] = list(load_masks(chosen, spec.preprocessing)[..., 0]) if hits else []
    return localisation_report(
        maps, masks, spec.preprocessing,
        mm_per_pixel=[_mm_per_input_pixel(s, spec) for s in chosen], positives=len(positives))


def evaluate_model(
    folder: Path,
    data: Path,
    labels: Path,
    *,
    out: Path | None = None,
    target_sensitivity: float = 0.9,
    n_bootstrap: int = 1000,
    seed: int = 0,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a model folder on a labelled DICOM folder.

    Parameters
    ----------
    folder : Path
        The model folder (from the registry or a training run).
    data, labels : Path
        DICOM folder and labels CSV (see :func:`~dicom_ai.training.dataset.read_samples`).
    out : Path, optional
        Folder for ``metrics.json``, ROC/PR/calibration plots and ``model_card.md``.
    target_sensitivity : float
        For ``threshold_at_target_sensitivity``.
    n_bootstrap : int
        Bootstrap resamples for the AUC (or Dice) confidence interval.
    seed : int
        Bootstrap seed.
    say : callable, optional
        Receives progress lines.

    Returns
    -------
    dict
        The metrics (see :func:`dicom_ai.training.metrics.classification_report`) plus ``model``,
        ``version``, ``task`` and ``images``, and ``localisation`` for a Keras classifier
        evaluated on images with lesion masks (:func:`localisation`).
    """
    import json

    from dicom_ai.training import metrics, report

    predictor = load_predictor(folder)
    spec = predictor.spec
    samples = read_samples(data, labels)
    if say:
        say(f"evaluating {spec.name} {spec.version} on {len(samples)} images")
    inputs = load_inputs(samples, spec.preprocessing)
    probs = predictor.predict(np.asarray(inputs))
    threshold = spec.outputs[0].threshold
    result: dict[str, Any] = {"model": spec.name, "version": spec.version, "task": spec.task,
                              "images": len(samples)}
    y_true = np.array([s.label for s in samples], dtype=np.int64)
    if spec.task == "classification":
        result.update(metrics.classification_report(
            y_true, probs[:, 0], threshold, target_sensitivity=target_sensitivity,
            n_bootstrap=n_bootstrap, seed=seed))
        located = localisation(predictor, samples, inputs, probs)
        if located is not None:
            result["localisation"] = located
    else:
        masks = load_masks(samples, spec.preprocessing)
        result.update(metrics.segmentation_report(
            [p[..., 0] for p in probs], [m[..., 0] > 0.5 for m in masks], threshold,
            min_component_pixels=spec.min_component_pixels))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
        plots: list[str] = []
        if spec.task == "classification" and len(set(y_true.tolist())) == 2:
            title = f"{spec.name} {spec.version}"
            report.plot_roc(y_true, probs[:, 0], out / "roc.png", title=f"{title}: ROC")
            report.plot_pr(y_true, probs[:, 0], out / "pr.png", title=f"{title}: precision-recall")
            report.plot_calibration(y_true, probs[:, 0], out / "calibration.png")
            plots = ["roc.png", "pr.png", "calibration.png"]
        limitations = [
            f"Evaluated on {len(samples)} images from {data.name}; performance on other "
            "scanners, populations and image types is unknown.",
            f"Operating threshold {threshold:.3f} ({spec.outputs[0].threshold_method}).",
        ]
        report.write_model_card(
            out, name=spec.name, version=spec.version, task=spec.task,
            description=spec.description,
            intended_use=(f"Research and integration testing of {spec.outputs[0].finding.meaning}"
                          f" detection on {', '.join(spec.modalities) or 'any'} images of "
                          f"{', '.join(spec.body_parts) or 'any body part'}."),
            training_data=spec.provenance.training_data or "not recorded",
            metrics={k: v for k, v in result.items() if k != "localisation"},
            limitations=limitations, synthetic_only=_synthetic_only(spec), plots=plots,
            localisation=result.get("localisation"))
    return result
