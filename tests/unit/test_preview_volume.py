"""``dicom-ai preview`` of a volume model shows what serving feeds it (issue 21).

A synthetic chest CT (64 x 64 slices, 2.5 mm apart) goes through the preview and through the
job runner's own path to a real Keras model whose output is its input (a 1x1x1 convolution of
weight 1: the sliding window blends the patches back into the model input). The montage tiles
must be those numbers, slice for slice, and the numbers of the volume core's functions composed
by hand (modality values, resample, window, normalise). The steps name the shapes before and
after resampling, the window and the patch count of the sliding window.
"""

from __future__ import annotations

import math
import os
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_ai.inference import volumes as runner_volumes
from dicom_ai.inference.runtime import load_predictor
from dicom_ai.inference.spec import ModelSpec, OutputLabel, write_spec
from dicom_ai.pipeline.loading import LoadError, load_volume
from dicom_ai.pipeline.preview import (
    MONTAGE_SLICES,
    model_inputs,
    preview,
    volume_montage,
)
from dicom_ai.pipeline.volume import (
    Grid,
    modality_volume,
    normalize_volume,
    patch_starts,
    resample,
    window_volume,
)
from dicom_ai.training.synth import ChestCT, synthesize
from dicom_ai.values import CodedConcept, PreprocessingSpec
from tests.peers import make_ct_series, sample_file

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: 64-matrix phantom at 6 mm pixels and 2.5 mm slices (as tests/unit/test_volume_runner.py).
CHEST = replace(ChestCT.for_matrix(64), pixel_spacing=(6.0, 6.0), slice_spacings=(2.5,),
                lesions=(2, 3), lesion_diameter_mm=(15.0, 30.0))
WINDOW = {"center": -600.0, "width": 1500.0}
VOLUME = PreprocessingSpec.model_validate({
    "input_shape": (32, 32), "channels": 1, "window": WINDOW, "normalization": "none",
    "input_kind": "volume", "target_spacing": (5.0, 4.0, 4.0), "patch_size": (16, 32, 32),
    "overlap": 0.5, "min_input_size": 8})


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The slices of one synthetic chest CT series (uncompressed)."""
    out = tmp_path_factory.mktemp("chest-preview")
    synthesize(out, studies=1, seed=5, modality="CT", positive_fraction=1.0, compress=False,
               chest_ct=CHEST)
    return sorted(out.glob("*/*/*.dcm"))


def _by_hand(files: list[Path], prep: PreprocessingSpec) -> np.ndarray[Any, Any]:
    """The model input composed from the volume core's functions, step by step."""
    volume = load_volume(files)
    hu = modality_volume(volume)
    array = hu if prep.target_spacing is None else resample(
        hu, Grid.of(volume), prep.target_spacing).array
    window_volume(array, prep.window_values)
    normalize_volume(array, prep.normalization)
    return array


def _identity_model(folder: Path, prep: PreprocessingSpec) -> Path:
    """A model folder whose network returns its input: the runner's model input comes back."""
    keras: Any = pytest.importorskip("keras")
    spec = ModelSpec(name="identity-ct", version="1.0.0", task="segmentation",
                     outputs=[OutputLabel(name="x", finding=CodedConcept(
                         value="27925004", scheme="SCT", meaning="Nodule"))],
                     modalities=["CT"], preprocessing=prep)
    inputs = keras.Input(spec.input_shape)
    layer = keras.layers.Conv3D(1, 1, activation="linear")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.ones((1, 1, 1, 1, 1), np.float32), np.zeros(1, np.float32)])
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    write_spec(spec, folder)
    return folder


def test_the_montage_is_the_input_the_runner_gives_the_model(
        chest: list[Path], tmp_path: Path) -> None:
    montage = volume_montage(chest, VOLUME)
    expected = _by_hand(chest, VOLUME)
    assert montage.shape == expected.shape
    assert len(montage.tiles) == min(MONTAGE_SLICES, expected.shape[0])
    assert montage.indices[0] == 0
    assert montage.indices[-1] == expected.shape[0] - 1
    for k, tile in zip(montage.indices, montage.tiles, strict=True):
        assert tile.dtype == np.float32
        np.testing.assert_array_equal(tile, expected[k])  # the same numbers, not close ones

    # What the runner fed a real model: an identity network gives its input back through the
    # sliding window (blended patches renormalised), on the resampled grid.
    predictor = load_predictor(_identity_model(tmp_path / "identity", VOLUME), batch_size=4)
    volume = load_volume(chest)
    output, resampled, _ = runner_volumes._probabilities(
        predictor, volume, Grid.of(volume), {}, time.perf_counter())
    assert resampled is not None
    assert output.shape == montage.shape
    for k, tile in zip(montage.indices, montage.tiles, strict=True):
        np.testing.assert_allclose(tile, output[k], atol=1e-5)

    # The tiles lie where the resampled slices are: z of each tile from the resampled grid.
    z = [resampled.grid.to_patient(np.array([k, 0, 0]))[2] for k in montage.indices]
    assert [p[2] for p in montage.positions] == pytest.approx(z)


def test_the_steps_name_shapes_window_and_patches(chest: list[Path], tmp_path: Path) -> None:
    source = load_volume(chest)
    expected = _by_hand(chest, VOLUME)
    arrays, steps = model_inputs(chest, VOLUME)
    source_shape = "x".join(map(str, source.array.shape))
    model_shape = "x".join(map(str, expected.shape))
    assert steps[0].startswith(f"load: {source.array.shape[0]} slices of 64x64, spacing (2.5, ")
    assert any(s.startswith("HU (modality LUT): slope 1 intercept ") for s in steps), steps
    assert (f"resample to target_spacing (5, 4, 4) mm: {source_shape} -> {model_shape}"
            in " ".join(steps))
    assert "window: C -600, W 1500 -> 0..1" in steps
    assert "normalise: none (the windowed values kept)" in steps
    per_axis = [len(patch_starts(n, p, 0.5)) for n, p in zip(expected.shape, (16, 32, 32),
                                                             strict=True)]
    assert any(s.startswith(f"patches: {math.prod(per_axis)} 3D patches of 16x32x32 "
                            f"({' x '.join(map(str, per_axis))}), overlap 0.5, gaussian")
               for s in steps), steps
    assert steps[-1].startswith(f"montage: {len(arrays)} of {expected.shape[0]} slices")

    # 2.5D without target_spacing: the series' own grid, a stack per slice and in-plane patch.
    slices = VOLUME.model_copy(update={"input_kind": "slices", "patch_size": None,
                                       "target_spacing": None, "slices_k": 3,
                                       "normalization": "minmax"})
    montage = volume_montage(chest, slices, slices=4)
    hand = _by_hand(chest, slices)
    assert montage.shape == source.array.shape
    assert len(montage.tiles) == 4
    for k, tile in zip(montage.indices, montage.tiles, strict=True):
        np.testing.assert_array_equal(tile, hand[k])
    count = source.array.shape[0] * len(patch_starts(64, 32, 0.5)) ** 2
    assert any(s.startswith(f"patches: {count} 2.5D stacks of 3 adjacent slices")
               for s in montage.steps), montage.steps
    assert "resample: none (no target_spacing): the series' grid " + source_shape in montage.steps

    out = tmp_path / "montage.png"
    assert preview(chest[0].parent, VOLUME, out) == steps
    columns = math.ceil(math.sqrt(len(arrays)))
    with Image.open(out) as image:
        assert image.mode == "L"
        assert image.size == (columns * expected.shape[2],
                              math.ceil(len(arrays) / columns) * expected.shape[1])


def test_the_slices_window_is_used_and_a_sigmoid_one_is_not(
        chest: list[Path], tmp_path: Path) -> None:
    """Without a spec window the first slice's LINEAR window applies; a SIGMOID window is not
    read as a linear one: the values stay HU (pipeline.volume.volume_window, one rule)."""
    own = VOLUME.model_copy(update={"window": None})
    steps = volume_montage(chest, own, slices=2).steps
    ds = pydicom.dcmread(chest[0], stop_before_pixels=True)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert f"window: the first slice's (C {center:g}, W {width:g}, LINEAR) -> 0..1" in steps
    sigmoid = tmp_path / "sigmoid"
    sigmoid.mkdir()
    for path in chest:
        each = pydicom.dcmread(path)
        each.VOILUTFunction = "SIGMOID"
        each.save_as(sigmoid / path.name, enforce_file_format=True)
    montage = volume_montage(sorted(sigmoid.iterdir()), own, slices=2)
    assert "window: none (the slices' window is SIGMOID): modality values kept" in montage.steps
    assert float(montage.tiles[0].min()) <= -900.0  # air in HU, not windowed to 0..1


def test_a_volume_model_refuses_what_is_not_a_volume(tmp_path: Path) -> None:
    """As serving skips such a series, the preview says why instead of showing 2D frames."""
    with pytest.raises(LoadError, match="a volume model takes a CT or MR volume: a single"):
        model_inputs([Path(sample_file("CT_small.dcm"))], VOLUME)
    files = make_ct_series(tmp_path / "cr", 2, size=32)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.Modality = "CR"
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(LoadError, match="modality CR is not a volume"):
        model_inputs(files, VOLUME)


def test_preview_memory_is_bounded_by_float32_grids(tmp_path: Path) -> None:
    """No float64 copy of the volume: the traced peak stays within the float32 grids.

    Upsampled 1.74x (0.66 -> 0.5 mm in-plane) the stored int16 values, the float32 HU, the
    resampling pass in between and its float32 result are about 30 bytes per source voxel;
    the old preview (a float64 stack of slices resampled in float64) peaked at 61.
    """
    files = make_ct_series(tmp_path / "ct", 48, size=128)
    spec = VOLUME.model_copy(update={"target_spacing": (1.0, 0.5, 0.5),
                                     "normalization": "minmax"})
    voxels = 48 * 128 * 128
    tracemalloc.start()
    try:
        montage = volume_montage(files, spec, slices=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert montage.shape == (48, 169, 169)
    assert peak < voxels * 36, f"peak {peak / voxels:.1f} bytes per source voxel"
