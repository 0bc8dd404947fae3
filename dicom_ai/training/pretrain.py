"""Pretraining the ``synth-backbone`` on a large synthetic source task (no downloads anywhere).

Transfer learning needs a pretrained backbone, and this project may not download ImageNet
weights. So the backbone learns on a source task built from ``dicom-ai synth`` CT and MR volumes,
slice by slice: which modality the slice is (anatomy/contrast) and whether a lesion crosses it
(round structures against organ background). Neither task is the target task (nodules on chest
radiographs), but both teach the low-level features it needs; the learning curve in the README
measures whether fine-tuning this backbone beats training from scratch on few labelled studies.

Inputs go through the same preprocessing functions as serving (:func:`load_inputs`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from dicom_ai.pipeline.preprocessing import PreprocessingSpec
from dicom_ai.training.dataset import Sample, load_inputs
from dicom_ai.training.synth import Modality, synthesize

__all__ = ["pretrain_backbone", "source_samples"]


def source_samples(folder: Path) -> tuple[list[Sample], np.ndarray[Any, np.dtype[np.float32]]]:
    """Every slice of the synthetic CT/MR studies in ``folder`` with its two source labels.

    Parameters
    ----------
    folder : Path
        Output of :func:`~dicom_ai.training.synth.synthesize` (``labels.csv``, ``masks/``).

    Returns
    -------
    samples : list of Sample
        One per slice (``label`` is the lesion flag).
    targets : numpy.ndarray
        ``(N, 2)`` float32: [is CT, lesion in this slice].
    """
    masks: dict[str, Any] = {}
    samples: list[Sample] = []
    targets: list[tuple[float, float]] = []
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series = str(ds.SeriesInstanceUID)
        if series not in masks:
            mask_file = folder / "masks" / f"{series}.npy"
            masks[series] = np.load(mask_file) if mask_file.is_file() else None
        mask = masks[series]
        index = int(ds.InstanceNumber) - 1
        lesion = bool(mask is not None and mask[index].any())
        samples.append(Sample(
            path=path, sop_instance_uid=str(ds.SOPInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=series,
            patient_key=str(ds.get("PatientID", "") or ds.StudyInstanceUID), label=int(lesion),
            mask_path=None, modality=str(ds.Modality),
            body_part=str(ds.get("BodyPartExamined", "")), synthetic=True,
        ))
        targets.append((float(ds.Modality == "CT"), float(lesion)))
    return samples, np.asarray(targets, dtype=np.float32)


def pretrain_backbone(
    weights_out: Path,
    *,
    workdir: Path,
    studies_per_modality: int = 60,
    epochs: int = 8,
    input_size: int = 128,
    seed: int = 0,
    batch_size: int = 32,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Synthesize the source data, train the backbone with a two-output head, save its weights.

    Parameters
    ----------
    weights_out : Path
        Where the backbone weights (``.weights.h5``) go.
    workdir : Path
        Scratch folder for the synthetic studies.
    studies_per_modality : int
        CT studies and MR studies each (16-24 slices per study).
    epochs : int
        Source-task epochs.
    input_size : int
        Square input side; the backbone is for ``(input_size, input_size, 1)`` inputs.
    seed : int
        Synthesis, split and initialisation seed.
    batch_size : int
    say : callable
        Progress lines.

    Returns
    -------
    dict
        ``slices``, ``seconds``, validation AUC per source output, the weights path.
    """
    import keras

    from dicom_ai.training import architectures, metrics
    from dicom_ai.training.augment import AugmentationSpec, build_augmenter

    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    source: tuple[Modality, Modality] = ("CT", "MR")
    for offset, modality in enumerate(source):
        target = workdir / modality
        if not (target / "labels.csv").is_file():
            # Easy, frequent lesions: the source task must be learnable to teach anything.
            synthesize(target, studies=studies_per_modality, seed=seed * 10 + offset,
                       modality=modality, positive_fraction=0.8, difficulty=0.0)
    samples: list[Sample] = []
    target_rows = []
    for modality in ("CT", "MR"):
        s, t = source_samples(workdir / modality)
        samples += s
        target_rows.append(t)
    targets = np.concatenate(target_rows)
    spec = PreprocessingSpec(input_shape=(input_size, input_size), channels=1)
    say(f"source task: {len(samples)} CT/MR slices, {int(targets[:, 1].sum())} with a lesion")
    inputs = np.asarray(load_inputs(samples, spec, cache=workdir / "cache"))
    # Split by study, so neighbouring slices of one volume never straddle the split.
    # One sixth of each modality's studies (at least one) is held out for validation.
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for modality in source:
        studies = sorted({s.study_instance_uid for s in samples if s.modality == modality})
        held |= set(rng.choice(studies, size=max(1, len(studies) // 6), replace=False).tolist())
    val = np.array([s.study_instance_uid in held for s in samples])

    backbone = architectures.build_backbone("synth-backbone", (input_size, input_size, 1))
    features = backbone.output
    head = keras.layers.Dropout(0.2)(features)
    head = keras.layers.Dense(2, activation="sigmoid", name="source_head")(head)
    model = keras.Model(backbone.input, head)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc", multi_label=True)])
    augmenter = build_augmenter(AugmentationSpec(), seed=seed)
    x_train, y_train = inputs[~val], targets[~val]
    steps = math.ceil(len(x_train) / batch_size)

    def batches() -> Any:
        epoch = 0
        while True:
            order = np.random.default_rng(seed + epoch).permutation(len(x_train))
            for i in range(steps):
                rows = order[i * batch_size : (i + 1) * batch_size]
                yield augmenter(x_train[rows], training=True), y_train[rows]
            epoch += 1

    for epoch in range(epochs):
        tick = time.perf_counter()
        history = model.fit(batches(), steps_per_epoch=steps, epochs=1, verbose=0,
                            validation_data=(inputs[val], targets[val]))
        logs = {k: v[-1] for k, v in history.history.items()}
        say(f"pretrain epoch {epoch + 1}/{epochs}  loss {logs['loss']:.4f}  "
            f"val_auc {logs['val_auc']:.4f}  ({time.perf_counter() - tick:.1f} s)")
    probs = np.asarray(model.predict(inputs[val], verbose=0))

    def auc(column: int) -> float | None:
        truth = targets[val, column].astype(np.int64)
        if len(set(truth.tolist())) < 2:
            return None  # a tiny validation set may hold one class only
        return float(metrics.roc_auc(truth, probs[:, column]))

    result = {
        "slices": len(samples),
        "validation_slices": int(val.sum()),
        "val_auc_modality": auc(0),
        "val_auc_lesion": auc(1),
        "epochs": epochs,
        "input_shape": [input_size, input_size, 1],
        "seconds": round(time.perf_counter() - started, 1),
        "weights": weights_out.name,
    }
    weights_out.parent.mkdir(parents=True, exist_ok=True)
    backbone.save_weights(weights_out)
    weights_out.with_suffix("").with_suffix(".json").write_text(json.dumps(result, indent=2))
    say(f"backbone weights: {weights_out} (validation AUC: lesion {result['val_auc_lesion']}, "
        f"modality {result['val_auc_modality']})")
    return result
