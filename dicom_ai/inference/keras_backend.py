"""The Keras backend: a ``.keras`` network served through a compiled ``tf.function``.

``model.predict`` pays a heavy per-call overhead (docs/notes.md: 42 ms vs 4 ms per image at batch 1
for the seed CNN on this machine), so the model is called inside a ``tf.function`` with a fixed
input signature ``(None, H, W, C)`` float32: one trace at load, no retracing for any batch size.
This module and :mod:`dicom_ai.inference.explain` are where serving imports TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from dicom_ai.inference.ood import OOD_FILE
from dicom_ai.inference.runtime import InferenceError, Predictor
from dicom_ai.inference.spec import ModelSpec, write_spec

__all__ = ["KerasPredictor", "compiled_call", "export_onnx", "feature_layer_name",
           "feature_model"]


def feature_layer_name(model: Any) -> str | None:
    """The layer whose output is the out-of-distribution feature vector, or None.

    The last global pooling layer: the pooled last convolutional features that the classifier
    head reads (:mod:`dicom_ai.inference.ood`). None for networks without one (a U-Net).
    """
    pooling = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
    names = [layer.name for layer in model.layers if isinstance(layer, pooling)]
    return names[-1] if names else None


def feature_model(model: Any, layer: str) -> Any:
    """``model`` with a second output: the ``(N, D)`` features of `layer`, in one forward pass."""
    return keras.Model(model.inputs[0], [model.outputs[0], model.get_layer(layer).output])


def compiled_call(model: Any, input_shape: tuple[int, ...]) -> Any:
    """``model(x, training=False)`` as a ``tf.function`` with signature ``(None, *input_shape)``.

    Parameters
    ----------
    model : keras.Model
        The network.
    input_shape : tuple of int
        ``(H, W, C)``, or ``(D, H, W, C)`` for a 3D volume model.

    Returns
    -------
    tf.types.experimental.GenericFunction
        Takes a float32 tensor or array of shape ``(N, H, W, C)``.
    """
    signature = [tf.TensorSpec(shape=(None, *input_shape), dtype=tf.float32)]

    def call(batch: Any) -> Any:
        return model(batch, training=False)

    return tf.function(call, input_signature=signature)


class KerasPredictor(Predictor):
    """A loaded ``model.keras`` (see :class:`~dicom_ai.inference.runtime.Predictor`)."""

    backend = "keras"

    def __init__(self, folder: Path, spec: ModelSpec, batch_size: int) -> None:
        super().__init__(folder, spec, batch_size)
        self.model = keras.saving.load_model(folder / spec.network, compile=False)
        shape = tuple(int(d) for d in self.model.input_shape[1:])
        if shape != spec.input_shape:
            raise InferenceError(f"{self.label}: the network takes {shape}, the spec says "
                                 f"{spec.input_shape}")
        self._call = compiled_call(self.model, spec.input_shape)
        # The out-of-distribution features come out of the same call as the probabilities.
        self._call_both = None
        if self.ood is not None:
            try:
                both = feature_model(self.model, self.ood.layer)
            except ValueError as exc:
                raise InferenceError(f"{self.label}: {OOD_FILE} names layer "
                                     f"{self.ood.layer!r}: {exc}") from exc
            self._call_both = compiled_call(both, spec.input_shape)

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        out = self._call(tf.convert_to_tensor(batch))
        return np.asarray(out.numpy(), dtype=np.float32)

    def _run_features(self, batch: NDArray[np.float32]) -> tuple[NDArray[np.float32],
                                                                 NDArray[np.float32]] | None:
        if self._call_both is None:
            return None
        probs, features = self._call_both(tf.convert_to_tensor(batch))
        return (np.asarray(probs.numpy(), dtype=np.float32),
                np.asarray(features.numpy(), dtype=np.float32))


def export_onnx(folder: Path, out: Path) -> Path:
    """Write an ONNX twin of a Keras model folder: ``out/model.onnx`` plus its spec.

    The spec is copied with ``network = "model.onnx"``; the version gets no suffix, so the twin is
    meant for another registry or for ``--backend onnx`` deployments, not to sit beside the
    original.

    Parameters
    ----------
    folder : Path
        A Keras model folder.
    out : Path
        The folder to write (created).

    Returns
    -------
    Path
        ``out``.
    """
    from dicom_ai.inference.spec import read_spec

    spec = read_spec(folder)
    if spec.backend != "keras":
        raise InferenceError(f"{folder} is not a Keras model folder")
    model = keras.saving.load_model(folder / spec.network, compile=False)
    model(np.zeros((1, *spec.input_shape), dtype=np.float32))  # export needs a called model
    out.mkdir(parents=True, exist_ok=True)
    model.export(str(out / "model.onnx"), format="onnx", verbose=False)
    write_spec(spec.model_copy(update={"network": "model.onnx"}), out)
    return out
