"""``dicom-ai train``: DICOM folder + labels -> a registered-ready model folder.

The chain, in order:

1. :func:`~dicom_ai.training.dataset.read_samples` joins the labels with the DICOM files;
   :func:`~dicom_ai.training.dataset.split_by_patient` splits them (never one patient in both).
2. :func:`~dicom_ai.training.dataset.load_inputs` preprocesses every file through the serving
   path (``model_inputs``), cached as a memory-mapped array under ``OUT/cache``.
3. :mod:`~dicom_ai.training.architectures` builds the network; augmentation
   (:mod:`~dicom_ai.training.augment`) runs on each training batch only.
4. Transfer learning: with a backbone (``synth-backbone`` or a ``keras.applications`` one), the
   backbone is frozen for the first stage, then its last layers are fine-tuned at a lower rate.
5. Each epoch saves ``OUT/checkpoints/last.keras`` and ``state.json``; ``resume`` continues from
   there. The best epoch (validation AUC, or Dice for segmentation) is kept.
6. The saved network is reloaded through the serving runtime, validation predictions choose the
   operating threshold (Youden J), and ``OUT`` gets ``model.keras``, ``spec.json`` (with
   provenance and metrics) and ``report/`` (curves as PNG, history and metrics as JSON).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dicom_ai import __version__
from dicom_ai.exceptions import DicomAIError
from dicom_ai.inference.ood import OodStats
from dicom_ai.inference.spec import (
    FINDING_SITE_LUNG,
    NAME_PATTERN,
    NODULE,
    ModelSpec,
    OutputLabel,
    Provenance,
    write_spec,
)
from dicom_ai.training.augment import AugmentationSpec
from dicom_ai.training.dataset import (
    Sample,
    load_inputs,
    load_masks,
    read_samples,
    split_by_patient,
)
from dicom_ai.values import CodedConcept, PreprocessingSpec

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = ["TrainError", "TrainOptions", "TrainResult", "default_preprocessing", "train"]

logger = logging.getLogger(__name__)

#: Backbones from keras.applications: 3 channels, ImageNet statistics when weights are given.
KERAS_APPLICATIONS = frozenset({"mobilenetv2", "efficientnetb0", "densenet121"})
TRANSFER_ARCHS = KERAS_APPLICATIONS | {"synth-backbone"}
BEST_WEIGHTS = "best.weights.h5"


class TrainError(DicomAIError):
    """Training cannot start or continue; the message says why."""


@dataclass
class TrainOptions:
    """What ``dicom-ai train`` was asked to do (see the CLI for each option's meaning)."""

    data: Path
    labels: Path
    arch: str
    out: Path
    name: str | None = None
    version: str | None = None
    epochs: int = 10
    batch_size: int = 32
    augment: AugmentationSpec = field(default_factory=AugmentationSpec)
    backbone_weights: Path | None = None
    seed: int = 0
    val_fraction: float = 0.2
    input_size: int = 128
    learning_rate: float = 1e-3
    frozen_epochs: int | None = None
    fine_tune_fraction: float = 0.5
    resume: bool = False
    finding: CodedConcept = NODULE
    finding_site: CodedConcept | None = FINDING_SITE_LUNG
    preprocessing: PreprocessingSpec | None = None
    description: str = ""
    training_data: str = ""
    #: Optimisation steps per epoch; ``None`` is one pass over the training set. Set, every
    #: epoch draws this many batches from an endless stream of shuffled passes, so a schedule
    #: is a fixed number of gradient steps whatever the size of the training set.
    steps_per_epoch: int | None = None
    #: Keep the epoch with the best validation metric (True), or the last epoch's weights: a
    #: validation set of a few images makes "best" a coin toss.
    keep_best: bool = True
    #: Learning rate of the fine-tuning stage after a frozen one; ``None`` is a tenth of
    #: ``learning_rate``.
    fine_tune_learning_rate: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    out : Path
        The model folder.
    spec : ModelSpec
        Its spec.
    metrics : dict
        Validation metrics at the chosen threshold.
    history : dict
        Per-epoch metrics.
    seconds : float
        Wall time.
    """

    out: Path
    spec: ModelSpec
    metrics: dict[str, Any]
    history: dict[str, list[float]]
    seconds: float


def default_preprocessing(arch: str, input_size: int, *, with_weights: bool) -> PreprocessingSpec:
    """The preprocessing an architecture gets unless the caller gives one.

    Parameters
    ----------
    arch : str
        Architecture name.
    input_size : int
        Square input side.
    with_weights : bool
        A ``keras.applications`` backbone with weights loaded expects ImageNet normalisation.

    Returns
    -------
    PreprocessingSpec
        ``keras.applications`` backbones: 3 channels (``imagenet`` normalisation with weights,
        else ``minmax``); the project's own networks: 1 channel, ``minmax``.
    """
    if arch in KERAS_APPLICATIONS:
        return PreprocessingSpec(input_shape=(input_size, input_size), channels=3,
                                 normalization="imagenet" if with_weights else "minmax")
    return PreprocessingSpec(input_shape=(input_size, input_size), channels=1)


def _default_name(out: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", out.name.lower()).strip("-._")
    return name if re.match(NAME_PATTERN, name) else "model"


def _default_version() -> str:
    now = datetime.now(UTC)
    return f"{now:%Y}.{now.month * 100 + now.day}.{now.hour * 100 + now.minute}"


# -- batches ----------------------------------------------------------------------------------
def _stream_order(count: int, seed: int, start: int, length: int) -> NDArray[np.int64]:
    """Rows ``start`` to ``start + length`` of an endless stream of shuffled passes.

    Pass ``k`` over the ``count`` rows is ``default_rng(seed + k).permutation(count)``, the same
    order an epoch ``k`` of one pass gets, so the stream is a function of its position only.
    """
    first, last = start // count, (start + length - 1) // count
    passes = [np.random.default_rng(seed + k).permutation(count) for k in range(first, last + 1)]
    offset = start - first * count
    return np.concatenate(passes)[offset : offset + length]


def _batches(
    inputs: NDArray[np.float32], targets: NDArray[np.float32], *, batch_size: int, seed: int,
    augmenter: Any | None, masks: bool, steps_per_epoch: int | None = None,
) -> Any:
    """A ``keras.utils.PyDataset`` over (memory-mapped) arrays, shuffled per epoch.

    With ``steps_per_epoch`` an epoch is that many full batches cut from an endless stream of
    shuffled passes (:func:`_stream_order`); a batch may then hold an image more than once when
    the training set is smaller than a batch.
    """
    import keras
    import tensorflow as tf

    from dicom_ai.training.augment import augment_pair

    # Eager augmentation layers cost more than the training step itself: compile them once.
    augment: Any = None
    if augmenter is not None:
        if masks:
            augment = tf.function(lambda x, y: augment_pair(augmenter, x, y),
                                  reduce_retracing=True)
        else:
            augment = tf.function(lambda x: augmenter(x, training=True), reduce_retracing=True)

    class Batches(keras.utils.PyDataset):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0
            self.order = self._order()

        def _order(self) -> NDArray[np.int64]:
            if steps_per_epoch is not None:
                length = steps_per_epoch * batch_size
                return _stream_order(len(inputs), seed, self.epoch * length, length)
            return np.random.default_rng(seed + self.epoch).permutation(len(inputs))

        def __len__(self) -> int:
            if steps_per_epoch is not None:
                return steps_per_epoch
            return math.ceil(len(inputs) / batch_size)

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            rows = np.sort(self.order[index * batch_size : (index + 1) * batch_size])
            x = np.asarray(inputs[rows], dtype=np.float32)
            y = np.asarray(targets[rows], dtype=np.float32)
            if augment is not None:
                if masks:
                    x, y = augment(x, y)
                else:
                    x = augment(x)
            return x, y

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return Batches()


# -- the run ----------------------------------------------------------------------------------
class _Progress:
    """Per-epoch checkpoint, state file, best weights and one progress line."""

    def __init__(self, checkpoints: Path, history: dict[str, list[float]], monitor: str,
                 best: float, say: Callable[[str], None], total_epochs: int) -> None:
        self.checkpoints = checkpoints
        self.history = history
        self.monitor = monitor
        self.best = best
        self.say = say
        self.total_epochs = total_epochs
        self.started = time.perf_counter()

    def callback(self) -> Any:
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                outer.started = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                outer.end_epoch(self.model, epoch, dict(logs or {}))

        return Callback()

    def end_epoch(self, model: Any, epoch: int, logs: dict[str, Any]) -> None:
        for key, value in logs.items():
            if isinstance(value, int | float | np.floating):
                self.history.setdefault(key, []).append(float(value))
        score = float(logs.get(self.monitor, float("nan")))
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if math.isfinite(score) and score > self.best:
            self.best = score
            model.save_weights(self.checkpoints / BEST_WEIGHTS)
        model.save(self.checkpoints / "last.keras")
        state = {"epoch": epoch + 1, "history": self.history, "best": self.best}
        tmp = self.checkpoints / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.checkpoints / "state.json")
        shown = "  ".join(f"{k} {v:.4f}" for k, v in logs.items()
                          if isinstance(v, int | float | np.floating) and k != "learning_rate")
        self.say(f"epoch {epoch + 1}/{self.total_epochs}  {shown}  "
                 f"({time.perf_counter() - self.started:.1f} s)")


def train(options: TrainOptions, *, say: Callable[[str], None] = print) -> TrainResult:
    """Train a model and write its folder (see the module docstring for the chain).

    Parameters
    ----------
    options : TrainOptions
        What to train.
    say : callable
        Receives progress lines (epochs, metrics).

    Returns
    -------
    TrainResult

    Raises
    ------
    TrainError
        Unknown architecture, data that cannot train (one class only), a resume without a
        checkpoint, or an output folder holding another model.
    DatasetError
        Labels or data folder problems.
    """
    import keras
    import tensorflow as tf

    from dicom_ai.inference.runtime import load_predictor
    from dicom_ai.training import architectures, metrics, report
    from dicom_ai.training.augment import build_augmenter, flip_allowed

    tf.get_logger().setLevel("ERROR")  # retracing notices for each new model are not news
    started = time.perf_counter()
    o = options
    segmentation = o.arch == "unet"
    if not segmentation and o.arch not in architectures.ARCHITECTURES:
        raise TrainError(f"unknown architecture {o.arch!r}; choose one of "
                         f"{', '.join((*architectures.ARCHITECTURES, 'unet'))}")
    if o.epochs < 1:
        raise TrainError("epochs must be at least 1")
    if o.steps_per_epoch is not None and o.steps_per_epoch < 1:
        raise TrainError("steps_per_epoch must be at least 1")
    checkpoints = o.out / "checkpoints"
    if o.resume and not (checkpoints / "state.json").is_file():
        raise TrainError(f"nothing to resume: {checkpoints / 'state.json'} does not exist")
    if not o.resume and (o.out / "spec.json").exists():
        raise TrainError(f"{o.out} already holds a model; choose another --out")
    keras.utils.set_random_seed(o.seed)

    samples = read_samples(o.data, o.labels)
    labels_present = {s.label for s in samples}
    if not segmentation and labels_present != {0, 1}:
        raise TrainError("classification needs positive and negative examples; the labels hold "
                         f"only {sorted(labels_present)}")
    train_set, val_set = split_by_patient(samples, val_fraction=o.val_fraction, seed=o.seed)
    with_weights = o.backbone_weights is not None
    prep = o.preprocessing or default_preprocessing(o.arch, o.input_size,
                                                    with_weights=with_weights)
    say(f"data: {len(samples)} images of {len({s.patient_key for s in samples})} patients; "
        f"training {len(train_set)} ({sum(s.label for s in train_set)} positive), validation "
        f"{len(val_set)} ({sum(s.label for s in val_set)} positive), split by patient")
    cache = o.out / "cache"
    x_train = load_inputs(train_set, prep, cache=cache)
    x_val = load_inputs(val_set, prep, cache=cache)
    if segmentation:
        y_train: NDArray[np.float32] = load_masks(train_set, prep, cache=cache)
        y_val: NDArray[np.float32] = load_masks(val_set, prep, cache=cache)
    else:
        y_train = np.array([[s.label] for s in train_set], dtype=np.float32)
        y_val = np.array([[s.label] for s in val_set], dtype=np.float32)
    say(f"inputs: {prep.input_shape[0]}x{prep.input_shape[1]}x{prep.channels}, "
        f"{prep.normalization} normalisation, window {prep.window or 'from each file'}")

    input_shape = (*prep.input_shape, prep.channels)
    monitor = "val_dice" if segmentation else "val_auc"
    history: dict[str, list[float]] = {}
    initial_epoch = 0
    best = -math.inf
    if o.resume:
        state = json.loads((checkpoints / "state.json").read_text())
        initial_epoch = int(state["epoch"])
        history = {k: list(v) for k, v in state["history"].items()}
        best = float(state.get("best", -math.inf))
        model = keras.saving.load_model(checkpoints / "last.keras", compile=True,
                                        custom_objects=_custom_objects())
        say(f"resuming after epoch {initial_epoch}")
    else:
        if segmentation:
            model = architectures.build_unet(input_shape, 1, seed=o.seed)
        else:
            model = architectures.build_classifier(
                o.arch, input_shape, 1, backbone_weights=o.backbone_weights, seed=o.seed)
        model = _compile(model, o.learning_rate, segmentation)

    # Frozen-then-fine-tuned stages only make sense with pretrained backbone weights.
    transfer = o.arch in TRANSFER_ARCHS and o.backbone_weights is not None
    frozen_epochs = 0
    if transfer:
        # ImageNet-style backbones: a frozen stage first. Our synth-backbone learned on another
        # modality, batch-norm statistics included: it is fine-tuned whole from the start.
        default_frozen = max(1, o.epochs // 3) if o.arch in KERAS_APPLICATIONS else 0
        frozen_epochs = min(o.frozen_epochs if o.frozen_epochs is not None else default_frozen,
                            o.epochs)
    augmentation = o.augment
    if augmentation.enabled and augmentation.horizontal_flip:
        parts = sorted({s.body_part or "(none)" for s in train_set})
        if not all(flip_allowed(part) for part in parts):
            # Laterality matters (e.g. the heart is on the left in a chest image).
            augmentation = augmentation.model_copy(update={"horizontal_flip": False})
            say(f"horizontal flip switched off: laterality matters for {', '.join(parts)}")
    augmenter = build_augmenter(augmentation, seed=o.seed) if augmentation.enabled else None
    batches = _batches(x_train, y_train, batch_size=o.batch_size, seed=o.seed,
                       augmenter=augmenter, masks=segmentation, steps_per_epoch=o.steps_per_epoch)
    progress = _Progress(checkpoints, history, monitor, best, say, o.epochs)
    # (title, first epoch, end epoch, backbone trainable or None for "not a transfer stage")
    stages: list[tuple[str, int, int, bool | None]] = []
    if transfer and frozen_epochs > 0:
        stages.append(("frozen backbone", 0, frozen_epochs, False))
        stages.append((f"fine-tuning the last {o.fine_tune_fraction:.0%} of the backbone",
                       frozen_epochs, o.epochs, True))
    else:
        stages.append(("all layers", 0, o.epochs, None))
    for title, first, last, backbone_trainable in stages:
        if last <= initial_epoch or first >= last:
            continue
        resumed_inside = o.resume and first < initial_epoch  # optimizer state came with the model
        if backbone_trainable is not None and not resumed_inside:
            architectures.set_backbone_trainable(
                model, backbone_trainable, fine_tune_fraction=o.fine_tune_fraction,
                train_batch_norm=o.arch not in KERAS_APPLICATIONS)
            fine_tune_rate = (o.fine_tune_learning_rate if o.fine_tune_learning_rate is not None
                              else o.learning_rate / 10)
            rate = fine_tune_rate if backbone_trainable else o.learning_rate
            model = _compile(model, rate, segmentation)
        say(f"stage: {title}, epochs {max(first, initial_epoch) + 1}-{last}")
        model.fit(batches, validation_data=(np.asarray(x_val), y_val), epochs=last,
                  initial_epoch=max(first, initial_epoch), verbose=0,
                  callbacks=[progress.callback()])
        initial_epoch = last
    if o.keep_best and (checkpoints / BEST_WEIGHTS).is_file():  # also across a resume
        model.load_weights(checkpoints / BEST_WEIGHTS)

    # Save, then evaluate what serving will run: the saved file through the runtime.
    name = o.name or _default_name(o.out)
    version = o.version or _default_version()
    o.out.mkdir(parents=True, exist_ok=True)
    # The served network carries no optimizer state (a third of the size); checkpoints do.
    with keras.saving.custom_object_scope(_custom_objects()):  # the clone recompiles
        serving = keras.models.clone_model(model)
    serving.set_weights(model.get_weights())
    serving.save(o.out / "model.keras")
    draft = ModelSpec(
        name=name, version=version, task="segmentation" if segmentation else "classification",
        preprocessing=prep,
        outputs=[OutputLabel(name="nodule" if o.finding == NODULE else "finding",
                             finding=o.finding, finding_site=o.finding_site)],
        modalities=sorted({s.modality for s in samples if s.modality}),
        body_parts=sorted({s.body_part for s in samples if s.body_part}),
    )
    write_spec(draft, o.out)
    if not segmentation:  # the training-input statistics for the out-of-distribution score
        stats = fit_ood(serving, np.asarray(x_train), np.asarray(x_val), o.out)
        if stats is not None:
            say(f"out-of-distribution statistics: {stats.n_fit} training images, threshold "
                f"{stats.threshold:.1f} (q{stats.quantile:g} of {stats.n_heldout} validation)")
    predictor = load_predictor(o.out)
    probs = predictor.predict(np.asarray(x_val))
    if segmentation:
        threshold, method = 0.5, "0.5 (segmentation)"
        val_metrics = metrics.segmentation_report(
            [p[..., 0] for p in probs], [m[..., 0] > 0.5 for m in y_val], threshold,
            min_component_pixels=draft.min_component_pixels)
    else:
        truth = y_val[:, 0].astype(np.int64)
        if len(set(truth.tolist())) == 2:
            threshold = float(metrics.youden_threshold(truth, probs[:, 0]))
            method = "Youden J on validation"
        else:  # a tiny validation set of one class cannot choose a threshold
            threshold, method = 0.5, "default 0.5 (validation set had one class)"
        val_metrics = metrics.classification_report(truth, probs[:, 0], threshold)
    elapsed = time.perf_counter() - started
    kind = "segmentation" if segmentation else "classifier"
    headline = {k: float(v) for k, v in val_metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and v is not None}
    spec = draft.model_copy(update={
        "outputs": [draft.outputs[0].model_copy(update={"threshold": threshold,
                                                        "threshold_method": method})],
        "description": o.description or f"{o.arch} {kind} for {o.finding.meaning.lower()}",
        "provenance": Provenance(
            training_data=o.training_data or _describe_data(samples, o.data),
            code_version=f"dicom-ai {__version__}",
            metrics=headline,
        ),
        "training": {
            "arch": o.arch, "epochs": o.epochs, "batch_size": o.batch_size, "seed": o.seed,
            "learning_rate": o.learning_rate, "frozen_epochs": frozen_epochs,
            "steps_per_epoch": o.steps_per_epoch, "kept": "best" if o.keep_best else "last",
            "fine_tune_fraction": o.fine_tune_fraction if transfer else None,
            "fine_tune_learning_rate": ((o.fine_tune_learning_rate
                                         if o.fine_tune_learning_rate is not None
                                         else o.learning_rate / 10)
                                        if transfer and frozen_epochs > 0 else None),
            "augmentation": augmentation.model_dump(),
            "backbone_weights": o.backbone_weights.name if o.backbone_weights else None,
            "split": {"by": "patient", "validation_fraction": o.val_fraction,
                      "train_images": len(train_set), "validation_images": len(val_set)},
            "seconds": round(elapsed, 1),
        },
    })
    write_spec(spec, o.out)
    reports = o.out / "report"
    reports.mkdir(exist_ok=True)
    (reports / "history.json").write_text(json.dumps(history, indent=2))
    (reports / "validation.json").write_text(json.dumps(val_metrics, indent=2, default=float))
    report.plot_training_curves(history, reports / "training_curves.png")
    if not segmentation:
        report.plot_roc(y_val[:, 0].astype(np.int64), probs[:, 0], reports / "validation_roc.png",
                        title=f"{name} {version}: validation ROC")
    shutil.rmtree(o.out / "cache", ignore_errors=True)
    say(f"wrote {o.out}: {name} {version}, threshold {threshold:.3f} ({method}); "
        + ", ".join(f"{k} {v:.3f}" for k, v in headline.items()
                    if k in {"roc_auc", "accuracy", "sensitivity", "specificity", "dice_mean",
                             "fp_per_image"}))
    return TrainResult(o.out, spec, val_metrics, history, elapsed)


def fit_ood(model: Any, fit_inputs: NDArray[np.float32], heldout_inputs: NDArray[np.float32],
            out: Path, *, quantile: float = 0.99, batch_size: int = 64) -> OodStats | None:
    """Write ``ood.npz`` (:mod:`dicom_ai.inference.ood`) into a model folder.

    The statistics are the pooled last-convolution features of the training inputs; the
    threshold is the `quantile` of the held-out (validation) inputs' scores.

    Parameters
    ----------
    model : keras.Model
        The trained network.
    fit_inputs, heldout_inputs : ndarray
        Preprocessed ``(N, H, W, C)`` training and held-out inputs.
    out : Path
        The model folder.
    quantile : float
        Threshold quantile of the held-out scores.
    batch_size : int
        Inputs per forward pass.

    Returns
    -------
    OodStats or None
        None (and no file) when the network has no pooled feature layer or there are too few
        images.
    """
    from dicom_ai.inference.keras_backend import feature_layer_name, feature_model
    from dicom_ai.inference.ood import fit_stats, write_stats

    layer = feature_layer_name(model)
    if layer is None or len(fit_inputs) < 2 or len(heldout_inputs) < 1:
        return None
    both = feature_model(model, layer)

    def features(inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        chunks = [np.asarray(both(inputs[i : i + batch_size], training=False)[1])
                  for i in range(0, len(inputs), batch_size)]
        return np.concatenate(chunks)

    stats = fit_stats(features(fit_inputs), features(heldout_inputs), layer=layer,
                      quantile=quantile)
    write_stats(stats, out)
    return stats


def _describe_data(samples: list[Sample], data: Path) -> str:
    kind = " dicom-ai synth phantom" if all(s.synthetic for s in samples) else ""
    positives = sum(s.label for s in samples)
    return (f"{len(samples)}{kind} images ({positives} positive) of "
            f"{len({s.patient_key for s in samples})} patients from {data.name}")


def _custom_objects() -> dict[str, Any]:
    return {"dice_loss": dice_loss, "dice": dice}


def dice(y_true: Any, y_pred: Any) -> Any:
    """Soft Dice over the whole batch (the segmentation metric, named ``dice``).

    Pooled over every pixel of the batch rather than averaged per image: a nodule covers a few
    dozen of 16 384 pixels, and per-image Dice of the many empty masks would drown its signal.
    """
    import tensorflow as tf

    inter = tf.reduce_sum(y_true * y_pred)
    total = tf.reduce_sum(y_true) + tf.reduce_sum(y_pred)
    return (2.0 * inter + 1.0) / (total + 1.0)


#: Weight of lesion pixels in the cross-entropy part of the segmentation loss.
LESION_PIXEL_WEIGHT = 20.0


def dice_loss(y_true: Any, y_pred: Any) -> Any:
    """1 - batch soft Dice, plus cross-entropy with lesion pixels weighted up (class imbalance)."""
    import keras

    eps = 1e-6
    clipped = keras.ops.clip(y_pred, eps, 1.0 - eps)
    bce = -(LESION_PIXEL_WEIGHT * y_true * keras.ops.log(clipped)
            + (1.0 - y_true) * keras.ops.log(1.0 - clipped))
    return 1.0 - dice(y_true, y_pred) + keras.ops.mean(bce)


def _compile(model: Any, rate: float, segmentation: bool) -> Any:
    import keras

    if segmentation:
        model.compile(optimizer=keras.optimizers.Adam(rate), loss=dice_loss, metrics=[dice])
    else:
        model.compile(optimizer=keras.optimizers.Adam(rate), loss="binary_crossentropy",
                      metrics=[keras.metrics.AUC(name="auc"),
                               keras.metrics.BinaryAccuracy(name="accuracy")])
    return model
