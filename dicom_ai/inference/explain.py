"""Grad-CAM heat-maps: where in the image a classifier output looks (Selvaraju et al., 2017).

For an output ``c`` and a convolutional layer with activations ``A`` (``h x w x k``), the map is
``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of ``d score_c / d A_k``, upsampled
bilinearly to the input resolution. Two scales (``scale``):

``"peak"`` (the paper's, the default of :func:`gradcam`)
    scaled to ``[0, 1]`` per image (an all-zero map stays zero). Every map then has a peak of 1,
    however weak the evidence: fine for seeing *where* a model looks, misleading in a clinical
    overlay, where it paints a hot spot on every image, negatives included.
``"probability"`` (what the service shows)
    the peak-scaled map times the output's probability: a fixed colour scale whose top is the
    model's own calibrated probability (ECE 0.026 for the bundled chest model), so a map can
    only be hot where the model says the finding is present with high probability; a negative
    image (p = 0.02) stays cold instead of showing a red spot. The map's *shape* is Grad-CAM's;
    its *level* is the decision's. Rejected: CAM as a local probability
    (``sigmoid(H * W * sum_k alpha_k A_k + bias)``): measured on 30 synth negatives, its peak
    reached >= 0.8 on every one (positive and negative contributions balance out in the
    average pool), which is exactly the invented hot spot this avoids.

The score is the output's *logit* when the model ends in a sigmoid/softmax Dense layer
(as :func:`~dicom_ai.training.architectures.build_classifier` models do): a saturated sigmoid
has vanishing gradients, which would blank the map of exactly the confident findings.

The service explains one finding at a time, so :class:`GradCam` builds the gradient model once
per (model, layer) and runs it through a ``tf.function`` with a fixed input signature (no
retracing per image, batch size or output index); :func:`gradcam` keeps one per model and layer.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

__all__ = ["GradCam", "HeatScale", "gradcam", "last_conv_layer_name"]

#: How a map is scaled: per-image peak, or times the output's probability (module docstring).
HeatScale = Literal["peak", "probability"]


_GLOBAL_POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
_SPATIAL_POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def last_conv_layer_name(model: Any) -> str:
    """The layer Grad-CAM should explain: the last one with a 4D output before global pooling.

    Spatial pooling layers (and the input) are skipped, so the heat-map keeps the resolution of
    the convolution that feeds them.

    Parameters
    ----------
    model : keras.Model
        A convolutional network (classifier or U-Net).

    Returns
    -------
    str
        The layer name.

    Raises
    ------
    ValueError
        No layer with a 4D output.
    """
    name: str | None = None
    before_pooling: str | None = None
    for layer in model.layers:
        if isinstance(layer, _GLOBAL_POOLING):
            # The *last* global pooling feeds the head (EfficientNet's squeeze-and-excitation
            # blocks pool globally too, much earlier).
            before_pooling = name
        elif isinstance(layer, (keras.layers.InputLayer, *_SPATIAL_POOLING)):
            continue
        elif len(layer.output.shape) == 4:
            name = layer.name
    name = before_pooling or name
    if name is None:
        raise ValueError(f"model {model.name!r} has no layer with a 4D (N, H, W, C) output")
    return name


class GradCam:
    """A compiled Grad-CAM for one model and one layer.

    Parameters
    ----------
    model : keras.Model
        A functional image model with one input ``(N, H, W, C)`` and one output ``(N, K)``.
    layer_name : str, optional
        The layer to explain; default :func:`last_conv_layer_name`.
    batch_size : int
        Images per compiled call.
    scale : {"peak", "probability"}
        Per-image peak scaling, or that times the output's probability: the fixed colour
        scale the service shows (module docstring).

    Raises
    ------
    ValueError
        The layer does not exist or has no 4D output, the model output is not ``(N, K)``, or
        an unknown scale.
    """

    def __init__(self, model: Any, layer_name: str | None = None, *, batch_size: int = 32,
                 scale: HeatScale = "peak") -> None:
        if scale not in ("peak", "probability"):
            raise ValueError(f"unknown heat-map scale {scale!r}")
        self.scale = scale
        self.layer_name = layer_name or last_conv_layer_name(model)
        try:
            layer = model.get_layer(self.layer_name)
        except ValueError as exc:
            raise ValueError(f"model {model.name!r} has no layer {self.layer_name!r}") from exc
        if len(layer.output.shape) != 4:
            raise ValueError(f"layer {self.layer_name!r} output is not (N, H, W, C)")
        if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
            raise ValueError("Grad-CAM needs a model with one (N, K) output")
        self.n_outputs = int(model.outputs[0].shape[-1])
        self.batch_size = batch_size
        self.input_shape = tuple(model.inputs[0].shape[1:])
        # The model object itself is not kept: gradcam()'s cache is keyed weakly by it.
        head = model.layers[-1]
        logits_from_dense = (
            isinstance(head, keras.layers.Dense)
            and head.output is model.outputs[0]
            and head.activation in (keras.activations.sigmoid, keras.activations.softmax)
        )
        softmax = logits_from_dense and head.activation is keras.activations.softmax
        target = head.input if logits_from_dense else model.outputs[0]
        grad_model = keras.Model(model.inputs[0], [layer.output, target])

        def score(features: Any) -> Any:
            if not logits_from_dense:
                return features
            # Recompute the head's pre-activation from its input: the same kernel and bias.
            logits = tf.matmul(features, head.kernel)
            return logits + head.bias if head.use_bias else logits

        def compute(images: Any, index: Any) -> Any:
            with tf.GradientTape() as tape:
                activations, features = grad_model(images, training=False)
                all_scores = score(features)
                scores = tf.gather(all_scores, index, axis=1)
            # Samples are independent in inference mode: the gradient of the summed scores is
            # each sample's own gradient.
            grads = tape.gradient(scores, activations)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            cam = tf.reduce_sum(weights * activations, axis=-1, keepdims=True)
            cam = tf.image.resize(tf.nn.relu(cam), tf.shape(images)[1:3], method="bilinear")
            cam = cam[..., 0]
            peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
            cam = tf.math.divide_no_nan(cam, peak)
            if scale == "probability":
                # The ceiling is the model's own (calibrated) probability of the output.
                probability = scores
                if logits_from_dense:
                    probability = tf.gather(
                        tf.nn.softmax(all_scores) if softmax else tf.sigmoid(all_scores),
                        index, axis=1)
                cam = cam * tf.reshape(tf.clip_by_value(probability, 0.0, 1.0), (-1, 1, 1))
            return cam

        self._compute = tf.function(
            compute,
            input_signature=[
                tf.TensorSpec((None, *self.input_shape), tf.float32),
                tf.TensorSpec((), tf.int32),
            ],
        )

    def __call__(self, images: NDArray[Any], *, output_index: int = 0) -> NDArray[np.float32]:
        """Heat-maps of one output for a batch or a single image.

        Parameters
        ----------
        images : ndarray
            ``(N, H, W, C)`` or ``(H, W, C)``, preprocessed as the model expects.
        output_index : int
            Which output (finding) to explain.

        Returns
        -------
        ndarray of float32
            ``(N, H, W)`` or ``(H, W)`` in ``[0, 1]``: peak-scaled, or that times the output's
            probability (:attr:`scale`).

        Raises
        ------
        ValueError
            Bad image shape or output index.
        """
        if not 0 <= output_index < self.n_outputs:
            raise ValueError(f"output_index {output_index} not in [0, {self.n_outputs})")
        batch = np.asarray(images, dtype=np.float32)
        single = batch.ndim == 3
        if single:
            batch = batch[np.newaxis]
        if batch.ndim != 4 or any(
            want is not None and want != got
            for want, got in zip(self.input_shape, batch.shape[1:], strict=True)
        ):
            raise ValueError(
                f"images of shape {np.shape(images)} do not fit the model input {self.input_shape}"
            )
        index = tf.constant(output_index, dtype=tf.int32)
        maps = [
            self._compute(tf.constant(batch[start : start + self.batch_size]), index).numpy()
            for start in range(0, len(batch), self.batch_size)
        ]
        result = (
            np.concatenate(maps).astype(np.float32, copy=False)
            if maps
            else np.zeros(batch.shape[:3], np.float32)
        )
        return result[0] if single else result


# Per model, by "layer/scale".
_CACHE: weakref.WeakKeyDictionary[Any, dict[str, GradCam]] = weakref.WeakKeyDictionary()


def gradcam(
    model: Any,
    images: NDArray[Any],
    *,
    output_index: int = 0,
    layer_name: str | None = None,
    scale: HeatScale = "peak",
) -> NDArray[np.float32]:
    """Grad-CAM heat-maps, reusing a compiled :class:`GradCam` per model and layer.

    Parameters
    ----------
    model : keras.Model
        A functional image classifier (one input, one ``(N, K)`` output).
    images : ndarray
        ``(N, H, W, C)`` or ``(H, W, C)`` float, preprocessed as the model expects.
    output_index : int
        Which output (finding) to explain.
    layer_name : str, optional
        The layer to explain; default :func:`last_conv_layer_name`.
    scale : {"peak", "probability"}
        Per-image peak scaling (default) or that times the output's probability.

    Returns
    -------
    ndarray of float32
        ``(N, H, W)`` or ``(H, W)`` heat-maps in ``[0, 1]`` at the model input resolution.

    Raises
    ------
    ValueError
        Bad layer, image shape or output index.
    """
    per_layer = _CACHE.setdefault(model, {})
    name = layer_name or last_conv_layer_name(model)
    explainer = per_layer.get(f"{name}/{scale}")
    if explainer is None:
        explainer = per_layer[f"{name}/{scale}"] = GradCam(model, name, scale=scale)
    return explainer(images, output_index=output_index)
