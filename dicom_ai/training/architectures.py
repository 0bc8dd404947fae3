"""Network architectures: image classifiers (shared backbone + sigmoid head) and a small U-Net.

Every classifier is one *flat* functional graph ``input -> backbone -> head``: the
``keras.applications`` backbones are built with ``input_tensor=`` so their layers sit in the same
graph as the head, and Grad-CAM (:mod:`dicom_ai.inference.explain`) can reach the last
convolutional layer directly. The head is ``head_dropout -> head_output`` (Dense, sigmoid) on the
backbone's globally average-pooled features; every other non-input layer is the backbone
(:func:`backbone_layers`), which is what :func:`set_backbone_trainable` freezes and unfreezes.

Architectures (:data:`ARCHITECTURES`):

``seed-cnn``
    Three conv(3x3, ReLU) + max-pool blocks (32, 64, 128 filters) and global average pooling:
    about 93 k parameters; any number of input channels.
``synth-backbone``
    Four blocks of (conv-BN-ReLU) x 2 (16, 32, 64, 128 filters; max-pooling between blocks) and
    global average pooling: about 290 k parameters; any number of input channels. The project
    pretrains it without labels on synthetic radiographs and ships its weights
    (:func:`build_backbone`, :mod:`~dicom_ai.training.pretrain`).
``mobilenetv2``, ``efficientnetb0``, ``densenet121``
    ``keras.applications`` backbones, randomly initialised (never downloaded ImageNet weights);
    3 input channels. ``efficientnetb0`` keeps its built-in ``Rescaling(1/255)`` +
    ``Normalization`` input layers.

Backbone weights (``backbone_weights=``) are a Keras weights file (``*.weights.h5``) saved from
:func:`build_backbone` (for ``keras.applications``, equivalently from the application built with
``include_top=False, weights=None``). They are loaded into a standalone backbone and copied layer
by layer, in graph order, into the flat classifier.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras

__all__ = [
    "APPLICATIONS",
    "ARCHITECTURES",
    "HEAD_PREFIX",
    "backbone_layers",
    "build_backbone",
    "build_classifier",
    "build_unet",
    "set_backbone_trainable",
]

ARCHITECTURES: tuple[str, ...] = (
    "seed-cnn",
    "synth-backbone",
    "mobilenetv2",
    "efficientnetb0",
    "densenet121",
)

#: Architecture name -> ``keras.applications`` constructor name.
APPLICATIONS: dict[str, str] = {
    "mobilenetv2": "MobileNetV2",
    "efficientnetb0": "EfficientNetB0",
    "densenet121": "DenseNet121",
}

#: Layers whose name starts with this are the classification head, never the backbone.
HEAD_PREFIX = "head_"
#: Batch-norm moving-average momentum of our own networks: 0.9 instead of Keras' 0.99, so the
#: inference statistics settle within the few hundred steps a small data set trains for.
BN_MOMENTUM = 0.9
#: logit(0.01): the U-Net's initial per-pixel lesion probability.
UNET_PRIOR_BIAS = -4.595



def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")


def _check_input_shape(arch: str, input_shape: tuple[int, int, int]) -> None:
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape}")
    if arch in APPLICATIONS and input_shape[2] != 3:
        raise ValueError(
            f"{arch} (keras.applications) needs 3 input channels, got {input_shape[2]}: "
            "repeat the grey channel (PreprocessingSpec channels=3) or use seed-cnn / "
            "synth-backbone, which accept any channel count"
        )


def _conv(filters: int, name: str, seed: int, *, activation: str | None = None) -> Any:
    return keras.layers.Conv2D(
        filters,
        3,
        padding="same",
        activation=activation,
        use_bias=activation is not None,  # a following BatchNormalization has its own offset
        kernel_initializer=keras.initializers.HeUniform(seed=seed),
        name=name,
    )


def _seed_cnn_features(inputs: Any, seed: int) -> Any:
    x = inputs
    for i, filters in enumerate((32, 64, 128), start=1):
        x = _conv(filters, f"backbone_conv{i}", seed + i, activation="relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"backbone_pool{i}")(x)
    return keras.layers.GlobalAveragePooling2D(name="backbone_gap")(x)


def _synth_features(inputs: Any, seed: int) -> Any:
    x = inputs
    for block, filters in enumerate((16, 32, 64, 128), start=1):
        if block > 1:
            # Pool *between* blocks: the last block keeps 1/8 resolution for Grad-CAM.
            x = keras.layers.MaxPooling2D(2, name=f"backbone_block{block}_pool")(x)
        for j in (1, 2):
            stem = f"backbone_block{block}_{j}"
            x = _conv(filters, f"{stem}_conv", seed + 10 * block + j)(x)
            x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{stem}_bn")(x)
            x = keras.layers.ReLU(name=f"{stem}_relu")(x)
    return keras.layers.GlobalAveragePooling2D(name="backbone_gap")(x)


def _application_features(arch: str, inputs: Any, seed: int) -> Any:
    # Applications take no initialiser seeds: seeding the global generators is the only way to
    # make their random initialisation reproducible.
    keras.utils.set_random_seed(seed)
    constructor = getattr(keras.applications, APPLICATIONS[arch])
    application = constructor(include_top=False, weights=None, input_tensor=inputs, pooling="avg")
    return application.output


def _features(arch: str, inputs: Any, seed: int) -> Any:
    if arch == "seed-cnn":
        return _seed_cnn_features(inputs, seed)
    if arch == "synth-backbone":
        return _synth_features(inputs, seed)
    return _application_features(arch, inputs, seed)


def build_backbone(arch: str, input_shape: tuple[int, int, int], *, seed: int = 0) -> Any:
    """The feature extractor of a classifier: image -> globally pooled features.

    Use it to pretrain a backbone with another head, to ``save_weights`` a backbone for
    ``build_classifier(..., backbone_weights=...)`` and (internally) to load such a file.

    Parameters
    ----------
    arch : str
        One of :data:`ARCHITECTURES`.
    input_shape : tuple of int
        ``(H, W, C)``; ``C`` must be 3 for the ``keras.applications`` backbones.
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    keras.Model
        Output ``(N, features)``; layers named as in the classifier built by
        :func:`build_classifier` with the same arguments.

    Raises
    ------
    ValueError
        Unknown ``arch`` or an input shape the architecture cannot take.
    """
    _check_arch(arch)
    _check_input_shape(arch, input_shape)
    inputs = keras.Input(shape=input_shape, name="image")
    features = _features(arch, inputs, seed)
    return keras.Model(inputs, features, name=f"{arch}-backbone")


def build_classifier(
    arch: str,
    input_shape: tuple[int, int, int],
    n_outputs: int,
    *,
    backbone_weights: Path | None = None,
    dropout: float = 0.2,
    seed: int = 0,
) -> Any:
    """An image classifier with ``n_outputs`` independent sigmoid outputs (multi-label).

    Parameters
    ----------
    arch : str
        One of :data:`ARCHITECTURES`.
    input_shape : tuple of int
        ``(H, W, C)``; ``C`` must be 3 for the ``keras.applications`` backbones.
    n_outputs : int
        Number of sigmoid outputs (findings).
    backbone_weights : Path, optional
        A Keras weights file of the backbone (see :func:`build_backbone`), copied into the
        classifier's backbone layers; without it the backbone is randomly initialised.
    dropout : float
        Dropout rate before the output layer, in ``[0, 1)``.
    seed : int
        Seed of the random initialisation and of the dropout.

    Returns
    -------
    keras.Model
        A flat functional model, output ``(N, n_outputs)`` in ``[0, 1]``; uncompiled.

    Raises
    ------
    ValueError
        Unknown ``arch``, a bad input shape, ``n_outputs`` or ``dropout``, or a weights file that
        does not match the backbone.
    """
    _check_arch(arch)
    _check_input_shape(arch, input_shape)
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be >= 1, got {n_outputs}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    inputs = keras.Input(shape=input_shape, name="image")
    features = _features(arch, inputs, seed)
    x = keras.layers.Dropout(dropout, seed=seed, name=f"{HEAD_PREFIX}dropout")(features)
    outputs = keras.layers.Dense(
        n_outputs,
        activation="sigmoid",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        name=f"{HEAD_PREFIX}output",
    )(x)
    model = keras.Model(inputs, outputs, name=arch)
    if backbone_weights is not None:
        _load_backbone_weights(model, arch, input_shape, Path(backbone_weights))
    return model


def _weighted(layers: list[Any]) -> list[Any]:
    return [layer for layer in layers if layer.weights]


def _load_backbone_weights(
    model: Any, arch: str, input_shape: tuple[int, int, int], path: Path
) -> None:
    if not path.is_file():
        raise ValueError(f"backbone weights file not found: {path}")
    standalone = build_backbone(arch, input_shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            standalone.load_weights(path)
        except (ValueError, KeyError, OSError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
            raise ValueError(
                f"{path} is not a weights file of the {arch} backbone: {first_line}"
            ) from exc
    # Keras only warns when parts of the file do not match, leaving fresh weights there.
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
    if skipped:
        raise ValueError(f"{path} is not a weights file of the {arch} backbone: {skipped[0]}")
    # Graph order is the same in both models (same builder), while auto-generated layer names
    # may differ between them: copy by position and check the shapes.
    sources = _weighted(standalone.layers)
    targets = _weighted(backbone_layers(model))
    if len(sources) != len(targets):
        raise ValueError(
            f"the {arch} backbone has {len(targets)} layers with weights, "
            f"{path} gives {len(sources)}"
        )
    for source, target in zip(sources, targets, strict=True):
        values = source.get_weights()
        shapes = [tuple(w.shape) for w in target.weights]
        if [v.shape for v in values] != shapes:
            raise ValueError(
                f"weights of layer {source.name!r} in {path} do not fit {target.name!r} of {arch}"
            )
        target.set_weights(values)


def backbone_layers(model: Any) -> list[Any]:
    """The backbone layers of a classifier built by :func:`build_classifier`, in graph order.

    Parameters
    ----------
    model : keras.Model
        A classifier from :func:`build_classifier` (or a backbone from :func:`build_backbone`).

    Returns
    -------
    list of keras.layers.Layer
        Every layer except the input layer(s) and the head (names starting with
        :data:`HEAD_PREFIX`).
    """
    return [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer) and not layer.name.startswith(HEAD_PREFIX)
    ]


def set_backbone_trainable(
    model: Any,
    trainable: bool,
    *,
    fine_tune_fraction: float = 1.0,
    train_batch_norm: bool = False,
) -> None:
    """Freeze the backbone, or unfreeze (the last part of) it for fine-tuning.

    The head stays trainable. Recompile the model afterwards: Keras reads ``trainable`` when the
    training function is built.

    Parameters
    ----------
    model : keras.Model
        A classifier from :func:`build_classifier`.
    trainable : bool
        False freezes the whole backbone (first stage of transfer learning); True unfreezes the
        last ``fine_tune_fraction`` of its layers that have weights (counted in graph order,
        rounded up) and keeps the earlier ones frozen.
    fine_tune_fraction : float
        In ``[0, 1]``; only used when ``trainable`` is True.
    train_batch_norm : bool
        When unfreezing, also train the BatchNormalization layers. By default they stay frozen,
        which in Keras 3 also keeps them in inference mode (moving statistics), as Keras'
        transfer-learning guide recommends: updating the statistics on a small target data set
        would wreck what the frozen-stage head learnt.

    Raises
    ------
    ValueError
        ``fine_tune_fraction`` outside ``[0, 1]``.
    """
    if not 0.0 <= fine_tune_fraction <= 1.0:
        raise ValueError(f"fine_tune_fraction must be in [0, 1], got {fine_tune_fraction}")
    layers = backbone_layers(model)
    for layer in layers:
        layer.trainable = False
    for layer in model.layers:
        if layer.name.startswith(HEAD_PREFIX):
            layer.trainable = True
    if not trainable:
        return
    weighted = _weighted(layers)
    count = math.ceil(fine_tune_fraction * len(weighted))
    for layer in weighted[len(weighted) - count :]:
        if isinstance(layer, keras.layers.BatchNormalization) and not train_batch_norm:
            continue
        layer.trainable = True


def build_unet(
    input_shape: tuple[int, int, int],
    n_outputs: int,
    *,
    base_filters: int = 16,
    depth: int = 3,
    seed: int = 0,
) -> Any:
    """A small U-Net for segmentation: per-pixel sigmoid outputs.

    Each level is (conv-BN-ReLU) x 2; the encoder halves the resolution ``depth`` times
    (max-pooling) and doubles the filters; the decoder upsamples with transposed convolutions and
    concatenates the skip connection of the same level.

    Parameters
    ----------
    input_shape : tuple of int
        ``(H, W, C)``; H and W must be divisible by ``2**depth``.
    n_outputs : int
        Number of output masks (channels).
    base_filters : int
        Filters of the first level.
    depth : int
        Number of down-sampling steps, >= 1.
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    keras.Model
        Output ``(N, H, W, n_outputs)`` in ``[0, 1]``; uncompiled.

    Raises
    ------
    ValueError
        Bad sizes, or H / W not divisible by ``2**depth``.
    """
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape}")
    if depth < 1 or base_filters < 1 or n_outputs < 1:
        raise ValueError("depth, base_filters and n_outputs must be >= 1")
    step = 2**depth
    height, width = input_shape[0], input_shape[1]
    if height % step or width % step:
        raise ValueError(
            f"U-Net of depth {depth} needs H and W divisible by {step}, got {height}x{width}"
        )

    def block(x: Any, filters: int, stem: str, block_seed: int) -> Any:
        for j in (1, 2):
            x = _conv(filters, f"{stem}_{j}_conv", block_seed + j)(x)
            x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{stem}_{j}_bn")(x)
            x = keras.layers.ReLU(name=f"{stem}_{j}_relu")(x)
        return x

    inputs = keras.Input(shape=input_shape, name="image")
    skips: list[Any] = []
    x = inputs
    for level in range(depth):
        x = block(x, base_filters * 2**level, f"unet_down{level}", seed + 10 * level)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"unet_down{level}_pool")(x)
    x = block(x, base_filters * 2**depth, "unet_bottom", seed + 10 * depth)
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = keras.layers.Conv2DTranspose(
            filters,
            2,
            strides=2,
            kernel_initializer=keras.initializers.HeUniform(seed=seed + 100 + level),
            name=f"unet_up{level}_upsample",
        )(x)
        x = keras.layers.Concatenate(name=f"unet_up{level}_concat")([x, skips[level]])
        x = block(x, filters, f"unet_up{level}", seed + 200 + 10 * level)
    outputs = keras.layers.Conv2D(
        n_outputs,
        1,
        activation="sigmoid",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        # Start by predicting a 1% lesion prior, not 50%: lesions are a fraction of a percent
        # of the pixels, and from 0.5 the first epochs only learn to say "background".
        bias_initializer=keras.initializers.Constant(UNET_PRIOR_BIAS),
        name="unet_output",
    )(x)
    return keras.Model(inputs, outputs, name="unet")
