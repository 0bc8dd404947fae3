"""Running a model: one interface over the Keras and ONNX Runtime backends.

:func:`load_predictor` opens a model folder with the backend its network file needs and keeps it
loaded; :meth:`Predictor.predict` takes a batch of preprocessed inputs (exactly what
:func:`dicom_ai.pipeline.preview.model_inputs` produces, the same function training uses) and
returns probabilities. Backends are imported lazily, so reading specs never loads TensorFlow.
They are looked up by name in :data:`BACKENDS` (module and class), not imported here: the
backends import this module for :class:`Predictor`, and the arrow must point one way only.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from dicom_ai.exceptions import DicomAIError
from dicom_ai.inference.ood import OOD_FILE, OodStats, read_stats
from dicom_ai.inference.spec import ModelSpec, read_spec

__all__ = ["BACKENDS", "OOD_FILE", "Backend", "InferenceError", "Predictor", "load_predictor"]

Backend = Literal["keras", "onnx"]
#: Each backend's module and Predictor class, imported on first use by :func:`load_predictor`.
BACKENDS: dict[str, tuple[str, str]] = {
    "keras": ("dicom_ai.inference.keras_backend", "KerasPredictor"),
    "onnx": ("dicom_ai.inference.onnx_backend", "OnnxPredictor"),
}


class InferenceError(DicomAIError):
    """A model cannot be loaded or run; the message says which model and why."""


class Predictor(ABC):
    """A loaded model.

    Parameters
    ----------
    folder : Path
        The model folder.
    spec : ModelSpec
        Its spec.
    batch_size : int
        Inputs are run in chunks of at most this many.

    Attributes
    ----------
    load_seconds : float
        Time to load the network and compile the inference function, including one warm-up
        call (so the first real call pays no tracing).
    ood : OodStats or None
        The training-input statistics of the folder's ``ood.npz``
        (:mod:`dicom_ai.inference.ood`); None when it has none.
    """

    backend: Backend

    def __init__(self, folder: Path, spec: ModelSpec, batch_size: int) -> None:
        if batch_size < 1:
            raise InferenceError(f"batch size must be >= 1, not {batch_size}")
        self.folder = folder
        self.spec = spec
        self.batch_size = batch_size
        self.load_seconds = 0.0
        try:
            self.ood: OodStats | None = read_stats(folder)
        except ValueError as exc:
            raise InferenceError(f"{self.label}: {exc}") from exc

    @property
    def label(self) -> str:
        """``name version`` for logs and findings."""
        return f"{self.spec.name} {self.spec.version}"

    def _check(self, inputs: NDArray[Any]) -> NDArray[np.float32]:
        batch = np.asarray(inputs, dtype=np.float32)
        rank = len(self.spec.input_shape)  # (H, W, C), or (D, H, W, 1) for a volume model
        if batch.ndim == rank:
            batch = batch[np.newaxis]
        if batch.ndim != rank + 1 or tuple(batch.shape[1:]) != self.spec.input_shape:
            raise InferenceError(f"{self.label} takes inputs of shape (N, "
                                 f"{', '.join(map(str, self.spec.input_shape))}), "
                                 f"got {tuple(np.shape(inputs))}")
        return np.ascontiguousarray(batch)

    def predict(self, inputs: NDArray[Any]) -> NDArray[np.float32]:
        """Probabilities for a batch of model inputs.

        Parameters
        ----------
        inputs : numpy.ndarray
            ``(N, H, W, C)`` (or one ``(H, W, C)`` input) float32, preprocessed per the spec;
            ``(N, D, H, W, 1)`` for a volume model.

        Returns
        -------
        numpy.ndarray
            Classification: ``(N, outputs)``; segmentation: ``(N, H, W, outputs)`` (``(N, D, H,
            W, outputs)`` for a volume model); float32.

        Raises
        ------
        InferenceError
            Inputs of the wrong shape, or the backend failed.
        """
        batch = self._check(inputs)
        if batch.shape[0] == 0:
            shape = (0, len(self.spec.outputs)) if self.spec.task == "classification" else (
                0, *self.spec.input_shape[:-1], len(self.spec.outputs))
            return np.zeros(shape, dtype=np.float32)
        chunks = []
        for start in range(0, batch.shape[0], self.batch_size):
            try:
                chunks.append(self._run(batch[start : start + self.batch_size]))
            except Exception as exc:  # the backend's own errors, named
                raise InferenceError(f"{self.label} ({self.backend}) failed: {exc}") from exc
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def predict_with_ood(self, inputs: NDArray[Any]) -> tuple[NDArray[np.float32],
                                                              NDArray[np.float32] | None]:
        """Probabilities and out-of-distribution scores, from one forward pass.

        Parameters
        ----------
        inputs : numpy.ndarray
            As for :meth:`predict`.

        Returns
        -------
        tuple
            The probabilities (as :meth:`predict`) and ``(N,)`` Mahalanobis distances of the
            inputs' features to the training features (:mod:`dicom_ai.inference.ood`), or
            None when the model has no statistics (or its backend cannot expose features).

        Raises
        ------
        InferenceError
            As for :meth:`predict`.
        """
        batch = self._check(inputs)
        if self.ood is None or batch.shape[0] == 0:
            return self.predict(batch), None
        probs, scores = [], []
        for start in range(0, batch.shape[0], self.batch_size):
            try:
                both = self._run_features(batch[start : start + self.batch_size])
            except Exception as exc:  # the backend's own errors, named
                raise InferenceError(f"{self.label} ({self.backend}) failed: {exc}") from exc
            if both is None:
                return self.predict(batch), None
            probs.append(both[0])
            scores.append(self.ood.score(both[1]))
        return (np.concatenate(probs).astype(np.float32, copy=False),
                np.concatenate(scores).astype(np.float32, copy=False))

    @abstractmethod
    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Run one chunk of at most ``batch_size`` inputs."""

    def _run_features(self, batch: NDArray[np.float32]) -> tuple[NDArray[np.float32],
                                                                 NDArray[np.float32]] | None:
        """Probabilities and ``(N, D)`` features of one chunk; None where not supported."""
        return None

    def _warm_up(self) -> None:
        self._run(np.zeros((1, *self.spec.input_shape), dtype=np.float32))
        self._run_features(np.zeros((1, *self.spec.input_shape), dtype=np.float32))


def load_predictor(
    folder: Path, *, backend: Backend | None = None, batch_size: int = 32
) -> Predictor:
    """Load a model folder for inference.

    Parameters
    ----------
    folder : Path
        A model folder (spec.json + network).
    backend : {'keras', 'onnx'}, optional
        Must match the network file; by default the one it needs.
    batch_size : int
        Largest chunk run at once.

    Returns
    -------
    Predictor
        Loaded, compiled and warmed up.

    Raises
    ------
    ModelSpecError
        The folder or spec is invalid.
    InferenceError
        The network cannot be loaded by its backend.
    """
    folder = Path(folder)
    spec = read_spec(folder)
    wanted = backend or spec.backend
    if wanted != spec.backend:
        raise InferenceError(f"{spec.name} {spec.version} holds {spec.network}, which the "
                             f"{wanted} backend cannot run")
    started = time.perf_counter()
    predictor: Predictor
    try:
        module, name = BACKENDS[wanted]
        predictor_class: type[Predictor] = getattr(importlib.import_module(module), name)
        predictor = predictor_class(folder, spec, batch_size)
        predictor._warm_up()
    except InferenceError:
        raise
    except Exception as exc:
        raise InferenceError(f"cannot load {spec.name} {spec.version} from {folder}: "
                             f"{type(exc).__name__}: {exc}") from exc
    predictor.load_seconds = time.perf_counter() - started
    return predictor
