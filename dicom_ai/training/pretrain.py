"""Pretraining the ``synth-backbone`` without labels (no downloads anywhere).

Transfer learning needs a pretrained backbone, and this project may not download ImageNet
weights. Hospitals hold far more unlabelled radiographs than labelled ones, so the backbone
learns from *unlabelled* chest radiographs, with a target computed from the pixels alone. Two
pretexts:

* ``blobs`` (shipped): predict, per 8x8 cell, the strongest bright blob at three sizes (the
  rectified, scale-normalised Laplacian of Gaussian, :func:`blob_targets`). The filters that do
  this are the ones a nodule detector starts from; fine-tuned on 50-100 labelled studies the
  backbone beats training from scratch by 0.04-0.12 test AUC (README, learning curve).
* ``inpainting``: restore images corrupted with Gaussian noise and blanked square patches
  through an upsampling decoder. It did not transfer: a nodule inside a blanked patch cannot be
  predicted from its surroundings and is a tiny share of the error, so nothing makes the
  encoder represent nodules.

The source images are ``dicom-ai synth`` CR studies from their own seed, never the labelled
training studies nor the test studies of the target task, and their labels are never read; no
lesion is inserted. An earlier source task (modality and lesion classification on synthetic
CT/MR slices) did not transfer either (README).

Inputs go through the same preprocessing functions as serving (:func:`load_inputs`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from dicom_ai.training.dataset import load_inputs, read_samples
from dicom_ai.training.synth import synthesize
from dicom_ai.values import PreprocessingSpec

__all__ = ["SOURCE_SEED_OFFSET", "Pretext", "blob_targets", "corrupt", "pretrain_backbone",
           "pretraining_report"]

#: The unlabelled source studies are synthesized with ``SOURCE_SEED_OFFSET + seed``: far from
#: the target task's training (1001) and test (2002) seeds.
SOURCE_SEED_OFFSET = 3000
#: Standard deviation of the added noise (inputs are min/max normalised to 0-1).
NOISE_SD = 0.05
#: Square patches blanked per image, each 1/8 of the image side.
PATCHES = 4
#: The ``blobs`` pretext: Gaussian scales (input pixels) of its Laplacian-of-Gaussian targets,
#: and the target grid's cell (the backbone's last block is at 1/8 resolution).
BLOB_SIGMAS = (1.0, 2.0, 4.0)
BLOB_CELL = 8
Pretext = Literal["inpainting", "blobs"]


def pretraining_report(weights: Path) -> Path:
    """The JSON report :func:`pretrain_backbone` writes beside backbone weights ``weights``."""
    return weights.with_suffix("").with_suffix(".json")


def corrupt(images: NDArray[np.float32], rng: np.random.Generator) -> NDArray[np.float32]:
    """The self-supervised task's input: noise plus :data:`PATCHES` blanked square patches.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, H, W, C)`` clean model inputs.
    rng : numpy.random.Generator
        Source of the noise and patch positions.

    Returns
    -------
    numpy.ndarray
        A corrupted float32 copy; ``images`` is not modified.
    """
    out = images + rng.normal(0.0, NOISE_SD, size=images.shape).astype(np.float32)
    n, height, width = images.shape[:3]
    side = max(1, min(height, width) // 8)
    for i in range(n):
        for _ in range(PATCHES):
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            out[i, top : top + side, left : left + side] = 0.0
    return out


def blob_targets(images: NDArray[np.float32]) -> NDArray[np.float32]:
    """The ``blobs`` pretext's targets: where the image's bright blobs are, per scale.

    For each of :data:`BLOB_SIGMAS`, the scale-normalised Laplacian of Gaussian
    ``-sigma^2 * LoG`` (positive on a bright blob of radius about ``sigma * sqrt(2)``),
    rectified, and its maximum over each ``BLOB_CELL`` x ``BLOB_CELL`` cell: a coarse map of
    the strongest blob of each size, computed from the pixels alone (no label, no lesion).

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, H, W, 1)`` model inputs; ``H`` and ``W`` multiples of :data:`BLOB_CELL`.

    Returns
    -------
    numpy.ndarray
        ``(N, H / BLOB_CELL, W / BLOB_CELL, len(BLOB_SIGMAS))`` float32.
    """
    from scipy.ndimage import gaussian_laplace

    n, height, width = images.shape[:3]
    rows, cols = height // BLOB_CELL, width // BLOB_CELL
    out = np.empty((n, rows, cols, len(BLOB_SIGMAS)), dtype=np.float32)
    for i in range(n):
        plane = images[i, :, :, 0].astype(np.float64)
        for k, sigma in enumerate(BLOB_SIGMAS):
            response = np.maximum(-sigma * sigma * gaussian_laplace(plane, sigma), 0.0)
            cells = response[: rows * BLOB_CELL, : cols * BLOB_CELL].reshape(
                rows, BLOB_CELL, cols, BLOB_CELL)
            out[i, :, :, k] = cells.max(axis=(1, 3))
    return out


def _blob_model(input_size: int, seed: int) -> tuple[Any, Any]:
    """(backbone, model): a 1x1 convolution maps the last block to the blob targets."""
    import keras

    from dicom_ai.training import architectures

    backbone = architectures.build_backbone("synth-backbone", (input_size, input_size, 1),
                                            seed=seed)
    x = backbone.get_layer("backbone_block4_2_relu").output
    blobs = keras.layers.Conv2D(len(BLOB_SIGMAS), 1, name="blob_output",
                                kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    return backbone, keras.Model(backbone.input, blobs, name="synth-backbone-blobs")


def _autoencoder(input_size: int, seed: int) -> tuple[Any, Any]:
    """(backbone, autoencoder): the decoder upsamples the last block's 1/8-resolution map."""
    import keras

    from dicom_ai.training import architectures

    backbone = architectures.build_backbone("synth-backbone", (input_size, input_size, 1),
                                            seed=seed)
    x = backbone.get_layer("backbone_block4_2_relu").output
    for level, filters in enumerate((64, 32, 16), start=1):
        x = keras.layers.UpSampling2D(2, name=f"decoder_up{level}")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                kernel_initializer=keras.initializers.HeNormal(seed + level),
                                name=f"decoder_conv{level}")(x)
    restored = keras.layers.Conv2D(1, 3, padding="same", name="decoder_output",
                                   kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    return backbone, keras.Model(backbone.input, restored, name="synth-backbone-autoencoder")


def pretrain_backbone(
    weights_out: Path,
    *,
    workdir: Path,
    studies: int = 700,
    epochs: int = 12,
    input_size: int = 128,
    seed: int = 3,
    batch_size: int = 32,
    say: Callable[[str], None] = print,
    pretext: Pretext = "blobs",
) -> dict[str, Any]:
    """Synthesize unlabelled radiographs, train the backbone on a pretext task, save it.

    Parameters
    ----------
    weights_out : Path
        Where the backbone weights (``.weights.h5``) go; a ``.json`` report lands beside them.
    workdir : Path
        Scratch folder for the synthetic studies and the input cache.
    studies : int
        Unlabelled CR studies (one image each); one in ten is held out to report the
        restoration error.
    epochs : int
        Passes over the training images.
    input_size : int
        Square input side; the backbone is for ``(input_size, input_size, 1)`` inputs.
    seed : int
        Synthesis (``SOURCE_SEED_OFFSET + seed``), split, corruption and initialisation seed.
    batch_size : int
    say : callable
        Progress lines.
    pretext : {"blobs", "inpainting"}
        ``blobs`` (the shipped backbone): predict :func:`blob_targets`, where the bright blobs
        of three sizes are, from the clean image. ``inpainting``: restore images corrupted with
        noise and blanked patches.

    Returns
    -------
    dict
        ``pretext``, ``images``, ``seconds``, the held-out mean squared error and a baseline's
        (inpainting: the corrupted input itself; blobs: the targets' mean), the weights file
        name.
    """
    import keras

    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    source = workdir / "cr-unlabelled"
    if not (source / "labels.csv").is_file():
        synthesize(source, studies=studies, seed=SOURCE_SEED_OFFSET + seed, modality="CR")
    # labels.csv only lists the files here: the label column is never read.
    samples = read_samples(source, source / "labels.csv")
    spec = PreprocessingSpec(input_shape=(input_size, input_size), channels=1)
    say(f"self-supervised source: {len(samples)} unlabelled synthetic CR images")
    inputs = np.asarray(load_inputs(samples, spec, cache=workdir / "cache"))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(inputs))
    held = max(1, len(inputs) // 10)
    x_val_clean, x_train = inputs[order[:held]], inputs[order[held:]]
    if pretext == "blobs":
        # Targets scaled by their training-set standard deviation per scale.
        targets = blob_targets(inputs)
        scale = targets[order[held:]].reshape(-1, targets.shape[-1]).std(axis=0) + 1e-6
        targets = targets / scale.astype(np.float32)
        y_val, y_train = targets[order[:held]], targets[order[held:]]
        x_val = x_val_clean
        backbone, model = _blob_model(input_size, seed)
    else:
        x_val = corrupt(x_val_clean, np.random.default_rng(seed + 1))
        y_val = x_val_clean
        backbone, model = _autoencoder(input_size, seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    steps = math.ceil(len(x_train) / batch_size)

    def batches() -> Any:
        epoch = 0
        while True:
            epoch_rng = np.random.default_rng(seed * 1000 + epoch)
            shuffled = epoch_rng.permutation(len(x_train))
            for i in range(steps):
                chosen = shuffled[i * batch_size : (i + 1) * batch_size]
                clean = x_train[chosen]
                if pretext == "blobs":
                    yield clean, y_train[chosen]
                else:
                    yield corrupt(clean, epoch_rng), clean
            epoch += 1

    stream = batches()
    for epoch in range(epochs):
        tick = time.perf_counter()
        history = model.fit(stream, steps_per_epoch=steps, epochs=1, verbose=0,
                            validation_data=(x_val, y_val))
        logs = {k: v[-1] for k, v in history.history.items()}
        say(f"pretrain epoch {epoch + 1}/{epochs}  loss {logs['loss']:.5f}  "
            f"val_loss {logs['val_loss']:.5f}  ({time.perf_counter() - tick:.1f} s)")
    predicted = np.asarray(model.predict(x_val, verbose=0, batch_size=batch_size))
    if pretext == "blobs":
        quality = {
            "task": "self-supervised: predict the strongest bright blob per 8x8 cell at Gaussian "
                    f"scales {list(BLOB_SIGMAS)} px (rectified, scale-normalised Laplacian of "
                    "Gaussian of the unlabelled synthetic CR image)",
            "val_mse": float(np.mean((predicted - y_val) ** 2)),
            # The error of always predicting the training targets' mean, per scale.
            "val_mse_mean_prediction": float(np.mean(
                (y_val - y_train.mean(axis=(0, 1, 2))) ** 2)),
        }
    else:
        quality = {
            "task": "self-supervised denoising + inpainting of unlabelled synthetic CR images "
                    f"(noise sd {NOISE_SD}, {PATCHES} blanked patches of 1/8 the side)",
            "val_mse": float(np.mean((predicted - x_val_clean) ** 2)),
            "val_mse_corrupted_input": float(np.mean((x_val - x_val_clean) ** 2)),
        }
    result = {
        **quality,
        "pretext": pretext,
        "images": len(samples),
        "validation_images": held,
        "source_seed": SOURCE_SEED_OFFSET + seed,
        "epochs": epochs,
        "input_shape": [input_size, input_size, 1],
        "seconds": round(time.perf_counter() - started, 1),
        "weights": weights_out.name,
    }
    weights_out.parent.mkdir(parents=True, exist_ok=True)
    backbone.save_weights(weights_out)
    pretraining_report(weights_out).write_text(json.dumps(result, indent=2))
    baseline = [f"{k} {v:.5f}" for k, v in result.items() if k.startswith("val_mse_")]
    say(f"backbone weights: {weights_out} (held-out MSE {result['val_mse']:.5f}; "
        f"{', '.join(baseline)})")
    return result
