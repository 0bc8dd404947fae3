"""The self-supervised pretraining task: corruption and the autoencoder around the backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")

from dicom_ai.training.architectures import build_classifier
from dicom_ai.training.pretrain import NOISE_SD, PATCHES, _autoencoder, corrupt


def test_corrupt_adds_noise_and_blanks_patches_without_touching_the_input() -> None:
    clean = np.full((3, 64, 64, 1), 0.5, dtype=np.float32)
    before = clean.copy()
    out = corrupt(clean, np.random.default_rng(1))
    assert out.dtype == np.float32
    assert out.shape == clean.shape
    np.testing.assert_array_equal(clean, before)
    side = 64 // 8
    for image in out[..., 0]:
        blank = image == 0.0
        # Patches may overlap: between one and PATCHES patches' worth of exact zeros.
        assert side * side <= blank.sum() <= PATCHES * side * side
        rows, cols = np.nonzero(blank)
        assert rows.max() - rows.min() + 1 >= side
        assert cols.max() - cols.min() + 1 >= side
        assert np.std(image[~blank] - 0.5) == pytest.approx(NOISE_SD, rel=0.1)
    np.testing.assert_array_equal(out, corrupt(clean, np.random.default_rng(1)))
    assert not np.array_equal(out, corrupt(clean, np.random.default_rng(2)))


def test_autoencoder_restores_the_input_shape_and_trains_the_backbone(tmp_path: Path) -> None:
    import keras

    backbone, model = _autoencoder(64, seed=0)
    assert model.output_shape == (None, 64, 64, 1)
    before = [w.copy() for w in backbone.get_weights()]
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    rng = np.random.default_rng(0)
    clean = rng.random((8, 64, 64, 1), dtype=np.float32)
    model.fit(corrupt(clean, rng), clean, epochs=1, batch_size=8, verbose=0)
    # The encoder *is* the backbone: training the autoencoder changed its weights, and what
    # it saves loads into a classifier of the same architecture.
    assert any(not np.array_equal(a, b) for a, b in zip(before, backbone.get_weights(),
                                                       strict=True))
    weights = tmp_path / "backbone.weights.h5"
    backbone.save_weights(weights)
    classifier = build_classifier("synth-backbone", (64, 64, 1), 1, backbone_weights=weights)
    conv = backbone.get_layer("backbone_block1_1_conv").get_weights()[0]
    np.testing.assert_array_equal(classifier.get_layer("backbone_block1_1_conv").get_weights()[0],
                                  conv)
