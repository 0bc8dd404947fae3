"""The self-supervised pretraining task: corruption and the autoencoder around the backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")

from dicom_ai.training.architectures import build_classifier
from dicom_ai.training.pretrain import (
    BLOB_CELL,
    BLOB_SIGMAS,
    NOISE_SD,
    PATCHES,
    _autoencoder,
    _blob_model,
    blob_targets,
    corrupt,
)


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


def test_blob_targets_find_a_bright_blob_in_its_cell_at_its_scale() -> None:
    """A Gaussian spot of sigma 2 px lights the cell it is in, most at the 2 px scale."""
    yy, xx = np.mgrid[0:64, 0:64]
    image = 0.2 + 0.6 * np.exp(-((yy - 20) ** 2 + (xx - 44) ** 2) / (2 * 2.0**2))
    targets = blob_targets(image[None, :, :, None].astype(np.float32))
    assert targets.shape == (1, 64 // BLOB_CELL, 64 // BLOB_CELL, len(BLOB_SIGMAS))
    cell = (20 // BLOB_CELL, 44 // BLOB_CELL)
    for k in range(len(BLOB_SIGMAS)):
        assert tuple(int(i) for i in np.unravel_index(np.argmax(targets[0, :, :, k]),
                                                   targets.shape[1:3])) == cell
    assert int(np.argmax(targets[0, cell[0], cell[1]])) == BLOB_SIGMAS.index(2.0)
    # A flat image and a dark spot have no bright blob.
    flat = blob_targets(np.full((1, 64, 64, 1), 0.5, dtype=np.float32))
    assert flat.max() < 0.01 * targets.max()  # kernel truncation leaves a trace only
    dark = (1.0 - image)[None, :, :, None].astype(np.float32)
    # (only its surround responds, far less than a bright spot)
    assert blob_targets(dark)[0, cell[0], cell[1]].max() < 0.2 * targets.max()


def test_blob_model_predicts_the_target_grid_from_the_backbone() -> None:
    backbone, model = _blob_model(64, seed=0)
    assert model.output_shape == (None, 64 // BLOB_CELL, 64 // BLOB_CELL, len(BLOB_SIGMAS))
    assert model.get_layer("backbone_block4_2_relu") is backbone.get_layer(
        "backbone_block4_2_relu")
