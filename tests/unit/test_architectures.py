"""Classifier and U-Net builders: shapes, sizes, backbone weights, freezing, bad inputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras

from dicom_ai.inference.explain import last_conv_layer_name
from dicom_ai.training.architectures import (
    ARCHITECTURES,
    HEAD_PREFIX,
    backbone_layers,
    build_backbone,
    build_classifier,
    build_unet,
    set_backbone_trainable,
)

SHAPE = (64, 64, 3)


def _images(n: int, shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _features(model: Any) -> Any:
    """The classifier up to the pooled backbone features (the head's input)."""
    return keras.Model(model.input, model.get_layer(f"{HEAD_PREFIX}dropout").input)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_classifier_builds_flat_with_sigmoid_outputs(arch: str) -> None:
    model = build_classifier(arch, SHAPE, 3)
    out = np.asarray(model(_images(2), training=False))
    assert out.shape == (2, 3)
    assert np.all((out >= 0) & (out <= 1))
    # Flat graph: no nested Model, so Grad-CAM reaches the last conv layer by name.
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert len(model.get_layer(last_conv_layer_name(model)).output.shape) == 4
    assert [layer.name for layer in model.layers[-2:]] == ["head_dropout", "head_output"]


@pytest.mark.parametrize("arch", ["seed-cnn", "synth-backbone"])
def test_own_architectures_are_small_and_take_one_channel(arch: str) -> None:
    model = build_classifier(arch, (64, 64, 1), 1)
    assert model.count_params() < 1_500_000
    assert np.asarray(model(_images(1, (64, 64, 1)), training=False)).shape == (1, 1)
    assert all(layer.name.startswith("backbone_") for layer in backbone_layers(model))


def test_last_conv_layer_names() -> None:
    assert last_conv_layer_name(build_classifier("seed-cnn", SHAPE, 1)) == "backbone_conv3"
    name = last_conv_layer_name(build_classifier("synth-backbone", SHAPE, 1))
    assert name == "backbone_block4_2_relu"


def test_same_seed_same_model() -> None:
    x = _images(2)
    a = build_classifier("synth-backbone", SHAPE, 1, seed=3)
    b = build_classifier("synth-backbone", SHAPE, 1, seed=3)
    np.testing.assert_array_equal(
        np.asarray(a(x, training=False)), np.asarray(b(x, training=False))
    )


def test_synth_backbone_weights_round_trip(tmp_path: Path) -> None:
    backbone = build_backbone("synth-backbone", (64, 64, 1), seed=7)
    # Pretend it was pretrained: perturb every weight (BN statistics included).
    for layer in backbone.layers:
        layer.set_weights([w + 0.1 * np.sign(w + 0.5) for w in layer.get_weights()])
    path = tmp_path / "synth.weights.h5"
    backbone.save_weights(path)
    model = build_classifier("synth-backbone", (64, 64, 1), 2, backbone_weights=path, seed=1)
    x = _images(3, (64, 64, 1))
    np.testing.assert_array_equal(
        np.asarray(_features(model)(x, training=False)), np.asarray(backbone(x, training=False))
    )
    fresh = build_classifier("synth-backbone", (64, 64, 1), 2, seed=1)
    assert not np.allclose(
        np.asarray(_features(fresh)(x, training=False)), np.asarray(backbone(x, training=False))
    )


def test_application_weights_from_plain_keras_application(tmp_path: Path) -> None:
    # A backbone file as anyone would save it: the application itself, include_top=False.
    keras.utils.set_random_seed(11)
    application = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=SHAPE, alpha=1.0
    )
    path = tmp_path / "mobilenetv2.weights.h5"
    application.save_weights(path)
    model = build_classifier("mobilenetv2", SHAPE, 1, backbone_weights=path, seed=0)
    x = _images(2)
    expected = np.asarray(application(x, training=False)).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(_features(model)(x, training=False)), expected, atol=1e-6)


def test_wrong_weights_file_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "seed.weights.h5"
    build_backbone("seed-cnn", SHAPE).save_weights(path)
    with pytest.raises(ValueError, match="synth-backbone"):
        build_classifier("synth-backbone", SHAPE, 1, backbone_weights=path)
    with pytest.raises(ValueError, match="not found"):
        build_classifier("seed-cnn", SHAPE, 1, backbone_weights=tmp_path / "missing.weights.h5")


def test_set_backbone_trainable_stages() -> None:
    model = build_classifier("synth-backbone", SHAPE, 1)
    backbone = backbone_layers(model)
    head = [layer for layer in model.layers if layer.name.startswith(HEAD_PREFIX)]
    assert len(head) == 2
    assert set(backbone).isdisjoint(head)

    set_backbone_trainable(model, False)
    assert not any(layer.trainable for layer in backbone)
    assert all(layer.trainable for layer in head)
    trainable = {id(v) for v in model.trainable_weights}
    assert trainable == {id(v) for layer in head for v in layer.weights}

    set_backbone_trainable(model, True, fine_tune_fraction=0.25)
    weighted = [layer for layer in backbone if layer.weights]
    # 16 layers with weights (8 conv + 8 BN): the last 4 are conv, BN, conv, BN of block 4.
    assert [layer.name for layer in weighted[-4:] if layer.trainable] == [
        "backbone_block4_1_conv",
        "backbone_block4_2_conv",
    ]
    assert not any(layer.trainable for layer in weighted[:-4])
    assert not any(
        layer.trainable for layer in backbone if isinstance(layer, keras.layers.BatchNormalization)
    )

    set_backbone_trainable(model, True, train_batch_norm=True)
    assert all(layer.trainable for layer in weighted)
    with pytest.raises(ValueError, match="fine_tune_fraction"):
        set_backbone_trainable(model, True, fine_tune_fraction=1.5)


def test_frozen_batch_norm_keeps_statistics_in_fit() -> None:
    model = build_classifier("synth-backbone", (32, 32, 1), 1)
    set_backbone_trainable(model, True, fine_tune_fraction=1.0)
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    bn = model.get_layer("backbone_block1_1_bn")
    before = [np.copy(w) for w in bn.get_weights()]
    model.fit(_images(8, (32, 32, 1)) * 5, np.ones((8, 1)), epochs=1, verbose=0)
    for old, new in zip(before, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_unet_shapes() -> None:
    model = build_unet((64, 48, 1), 2, base_filters=8, depth=3)
    out = np.asarray(model(_images(2, (64, 48, 1)), training=False))
    assert out.shape == (2, 64, 48, 2)
    assert np.all((out >= 0) & (out <= 1))


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="3 input channels"):
        build_classifier("mobilenetv2", (64, 64, 1), 1)
    with pytest.raises(ValueError, match="seed-cnn, synth-backbone"):
        build_classifier("resnet9000", SHAPE, 1)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_backbone("unet", SHAPE)
    with pytest.raises(ValueError, match="divisible by 8"):
        build_unet((60, 64, 1), 1, depth=3)
    with pytest.raises(ValueError, match="n_outputs"):
        build_classifier("seed-cnn", SHAPE, 0)
