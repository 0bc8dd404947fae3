"""Grad-CAM: a classifier trained to find a bright disk looks at the disk."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras

from dicom_ai.inference.explain import GradCam, gradcam
from dicom_ai.training.architectures import build_classifier

Array = np.ndarray[Any, Any]
SIZE = 64
RADIUS = 6


def _disks(n: int, seed: int) -> tuple[Array, Array, Array]:
    """Noisy images, the first half with a bright disk at a random position; labels; disk masks."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    centres = rng.integers(RADIUS * 2, SIZE - RADIUS * 2, (n, 2))
    masks = (rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2 <= RADIUS**2
    labels = (np.arange(n) < n // 2).astype(np.float32)
    images = rng.normal(0.2, 0.05, (n, SIZE, SIZE, 1)).astype(np.float32)
    images[..., 0] += 0.6 * masks * labels[:, None, None]
    return images, labels, masks


@pytest.fixture(scope="module")
def trained() -> tuple[Any, Array, Array]:
    """A seed-cnn trained (a few epochs) until it separates disk from no disk."""
    images, labels, _ = _disks(200, seed=0)
    keras.utils.set_random_seed(0)
    model = build_classifier("seed-cnn", (SIZE, SIZE, 1), 1, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    for _ in range(10):
        model.fit(images, labels[:, None], epochs=1, batch_size=32, verbose=0)
        scores = np.asarray(model(images, training=False))[:, 0]
        if ((scores > 0.5) == (labels > 0.5)).mean() >= 0.95:
            break
    test_images, test_labels, test_masks = _disks(20, seed=1)
    scores = np.asarray(model(test_images, training=False))[:, 0]
    assert scores[test_labels > 0.5].min() > scores[test_labels < 0.5].max(), "not separated"
    positives = test_labels > 0.5
    return model, test_images[positives], test_masks[positives]


def test_heat_is_on_the_disk(trained: tuple[Any, Array, Array]) -> None:
    model, images, masks = trained
    maps = gradcam(model, images)
    assert maps.shape == (len(images), SIZE, SIZE)
    assert maps.dtype == np.float32
    assert np.all(np.isfinite(maps))
    assert maps.min() >= 0.0
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0, rtol=1e-6)
    ratios = [m[disk].mean() / m[~disk].mean() for m, disk in zip(maps, masks, strict=True)]
    assert min(ratios) > 2.0, ratios


def test_single_image_and_cache(trained: tuple[Any, Array, Array]) -> None:
    model, images, _ = trained
    batch = gradcam(model, images[:3])
    single = gradcam(model, images[1])
    assert single.shape == (SIZE, SIZE)
    np.testing.assert_allclose(single, batch[1], atol=1e-5)
    explainer = GradCam(model, "backbone_conv2", batch_size=2)
    assert explainer.layer_name == "backbone_conv2"
    coarse = explainer(images[:3])  # three images in two compiled calls
    assert coarse.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(
        coarse, gradcam(model, images[:3], layer_name="backbone_conv2"), atol=1e-5
    )


def test_zero_map_stays_zero() -> None:
    # Untrained seed-cnn: zero biases, so a black image gives all-zero activations.
    model = build_classifier("seed-cnn", (SIZE, SIZE, 1), 2, seed=0)
    maps = gradcam(model, np.zeros((2, SIZE, SIZE, 1), np.float32), output_index=1)
    assert maps.shape == (2, SIZE, SIZE)
    assert not np.isnan(maps).any()
    assert not maps.any()


def test_bad_arguments() -> None:
    model = build_classifier("seed-cnn", (32, 32, 1), 2, seed=0)
    image = np.zeros((32, 32, 1), np.float32)
    with pytest.raises(ValueError, match="output_index"):
        gradcam(model, image, output_index=2)
    with pytest.raises(ValueError, match="do not fit"):
        gradcam(model, np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="no layer"):
        gradcam(model, image, layer_name="nonexistent")
    with pytest.raises(ValueError, match="not"):
        GradCam(model, "head_output")
