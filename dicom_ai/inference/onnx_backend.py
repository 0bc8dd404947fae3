"""The ONNX Runtime backend: ``model.onnx`` files trained anywhere (PyTorch, Keras, ...).

The model's first input must take float32 ``(N, H, W, C)`` (channels last, as the spec's
preprocessing produces) with a free or matching batch dimension.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from dicom_ai.inference.runtime import InferenceError, Predictor
from dicom_ai.inference.spec import ModelSpec

__all__ = ["OnnxPredictor"]


class OnnxPredictor(Predictor):
    """A loaded ``model.onnx`` (see :class:`~dicom_ai.inference.runtime.Predictor`)."""

    backend = "onnx"

    def __init__(self, folder: Path, spec: ModelSpec, batch_size: int) -> None:
        super().__init__(folder, spec, batch_size)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(folder / spec.network), sess_options=options, providers=["CPUExecutionProvider"]
        )
        first = self.session.get_inputs()[0]
        self.input_name = str(first.name)
        dims = list(first.shape)[1:]
        wanted = list(spec.input_shape)
        if len(dims) != len(wanted) or any(
                isinstance(d, int) and d != w for d, w in zip(dims, wanted, strict=True)):
            raise InferenceError(f"{self.label}: the ONNX input {self.input_name} has shape "
                                 f"{first.shape}, the spec says (N, {', '.join(map(str, wanted))})")

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        outputs = self.session.run(None, {self.input_name: batch})
        return np.asarray(outputs[0], dtype=np.float32)
