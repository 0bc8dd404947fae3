"""The inference runtime: Keras through tf.function, ONNX Runtime, the same outputs from both."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_ai.inference.runtime import InferenceError, load_predictor
from dicom_ai.inference.spec import NODULE, ModelSpec, OutputLabel, write_spec
from dicom_ai.values import PreprocessingSpec

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras: Any = pytest.importorskip("keras")


def tiny_classifier(input_shape: tuple[int, int, int]) -> Any:
    keras.utils.set_random_seed(3)
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, activation="relu", padding="same")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def keras_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    model = tiny_classifier((32, 32, 1))
    model.save(folder / "model.keras")
    write_spec(ModelSpec(
        name="tiny", version="1.0.0", task="classification",
        preprocessing=PreprocessingSpec(input_shape=(32, 32), channels=1),
        outputs=[OutputLabel(name="nodule", finding=NODULE)]), folder)
    return folder


def batch(n: int, seed: int = 0) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(seed).random((n, 32, 32, 1), dtype=np.float32)


def test_keras_predictor_equals_a_bare_model_call(keras_folder: Path) -> None:
    predictor = load_predictor(keras_folder, batch_size=4)
    assert predictor.backend == "keras"
    assert predictor.load_seconds > 0
    x = batch(10)
    bare = keras.saving.load_model(keras_folder / "model.keras", compile=False)
    expected = np.asarray(bare(x, training=False))
    out = predictor.predict(x)  # 10 inputs in chunks of 4, 4, 2
    assert out.shape == (10, 1)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predictor.predict(x[0]), expected[:1], rtol=1e-5, atol=1e-6)
    assert predictor.predict(x[:0]).shape == (0, 1)


def test_onnx_twin_gives_the_same_outputs(keras_folder: Path, tmp_path: Path) -> None:
    from dicom_ai.inference.keras_backend import export_onnx

    twin = export_onnx(keras_folder, tmp_path / "onnx")
    onnx = load_predictor(twin)
    assert onnx.backend == "onnx"
    assert onnx.spec.network == "model.onnx"
    x = batch(37, seed=1)
    np.testing.assert_allclose(onnx.predict(x), load_predictor(keras_folder).predict(x),
                               rtol=1e-4, atol=1e-5)


def test_wrong_input_shape_and_backend_are_refused(keras_folder: Path) -> None:
    predictor = load_predictor(keras_folder)
    with pytest.raises(InferenceError, match=r"takes inputs of shape \(N, 32, 32, 1\)"):
        predictor.predict(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(InferenceError, match="onnx backend cannot run"):
        load_predictor(keras_folder, backend="onnx")


def test_corrupt_network_is_a_clear_error(keras_folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "spec.json").write_text((keras_folder / "spec.json").read_text())
    (broken / "model.keras").write_bytes(b"not a keras file")
    with pytest.raises(InferenceError, match=r"cannot load tiny 1\.0\.0"):
        load_predictor(broken)
