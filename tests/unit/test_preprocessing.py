"""Preprocessing: each step against an independent computation; the whole chain on real files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydantic import ValidationError
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.processing import apply_modality_lut as pydicom_modality_lut
from pydicom.pixels.processing import apply_voi_lut as pydicom_voi_lut
from pydicom.pixels.utils import pixel_array
from skimage import color as sk_color
from skimage import transform as sk_transform

from dicom_ai.exceptions import DicomAIError
from dicom_ai.pipeline.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessingError,
    apply_modality_lut,
    apply_voi,
    grey_to_unit,
    invert_monochrome1,
    luminance,
    mask_bits_stored,
    normalize,
    preprocess_frame,
    replicate_channels,
    resample_volume,
    resize,
    to_rgb,
)
from dicom_ai.values import PreprocessingSpec, Window
from tests.peers import sample_file


def read(name: str) -> tuple[NDArray[Any], Dataset]:
    """A test file's decoded pixels and its dataset."""
    ds = pydicom.dcmread(sample_file(name))
    return ds.pixel_array, ds


def grey_dataset(
    photometric: str = "MONOCHROME2", *, bits: int = 16, signed: bool = False
) -> Dataset:
    """A minimal grey image header (no pixel data)."""
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    return ds


# -- modality LUT ---------------------------------------------------------------------------------
def test_modality_lut_matches_hand_computed_rescale() -> None:
    ds = grey_dataset(signed=True)
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -1024
    arr = np.array([[0, 1], [1000, 2000]], dtype=np.int16)
    out = apply_modality_lut(arr, ds)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[-1024.0, -1022.0], [976.0, 2976.0]])


def test_modality_lut_without_rescale_is_float_identity() -> None:
    arr = np.array([[0, 7], [65535, 3]], dtype=np.uint16)
    out = apply_modality_lut(arr, grey_dataset())
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, arr.astype(np.float64))


# -- VOI ------------------------------------------------------------------------------------------
def hand_window(x: float, center: float, width: float) -> float:
    """PS3.3 C.11.2.1.2.1, written out for one value with output 0..1."""
    if x <= center - 0.5 - (width - 1) / 2:
        return 0.0
    if x > center - 0.5 + (width - 1) / 2:
        return 1.0
    return (x - (center - 0.5)) / (width - 1) + 0.5


def test_explicit_window_below_inside_above() -> None:
    center, width = 40.0, 400.0
    values = [-1000.0, -160.0, -159.0, 39.5, 100.0, 238.0, 239.0, 240.0, 3000.0]
    out = apply_voi(np.array(values), grey_dataset(), window=(center, width))
    expected = [hand_window(v, center, width) for v in values]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert out[0] == 0.0
    assert out[1] == 0.0
    assert out[-1] == 1.0
    assert out[-2] == 1.0
    assert out[3] == pytest.approx(0.5)


def test_explicit_window_overrides_dataset_window() -> None:
    ds = grey_dataset()
    ds.WindowCenter = 1000
    ds.WindowWidth = 10
    out = apply_voi(np.array([40.0]), ds, window=(40.0, 400.0))
    assert out[0] == pytest.approx(hand_window(40.0, 40.0, 400.0))


def test_explicit_window_width_below_one_is_refused() -> None:
    with pytest.raises(PreprocessingError, match="width"):
        apply_voi(np.zeros((2, 2)), grey_dataset(), window=(0.0, 0.5))


def test_dataset_window_matches_pydicom_on_ct_small() -> None:
    arr, ds = read("CT_small.dcm")
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    hu = pydicom_modality_lut(arr, ds)
    reference = pydicom_voi_lut(hu, ds)
    # CT_small: 16 bits stored, signed, slope 1, intercept -1024 -> pydicom's output range.
    y_min, y_max = -32768.0 - 1024.0, 32767.0 - 1024.0
    expected = (reference - y_min) / (y_max - y_min)
    out = apply_voi(apply_modality_lut(arr, ds), ds)
    assert out.dtype == np.float64
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_dataset_voi_lut_sequence() -> None:
    ds = grey_dataset()
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]
    item.add(DataElement(0x00283006, "US", [0, 85, 170, 255]))
    ds.VOILUTSequence = [item]
    arr = np.array([5.0, 10.0, 11.0, 12.0, 13.0, 99.0])
    np.testing.assert_allclose(
        apply_voi(arr, ds), np.array([0, 0, 85, 170, 255, 255]) / 255.0, atol=1e-12
    )


def test_no_voi_scales_by_min_and_max() -> None:
    out = apply_voi(np.array([-10.0, 0.0, 30.0]), grey_dataset())
    np.testing.assert_allclose(out, [0.0, 0.25, 1.0])


# -- MONOCHROME1 ----------------------------------------------------------------------------------
def test_invert_monochrome1_flips_about_min_and_max() -> None:
    arr = np.array([[5, 10], [20, 30]], dtype=np.uint16)
    out = invert_monochrome1(arr, grey_dataset("MONOCHROME1"))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[30, 25], [15, 5]])


def test_invert_monochrome1_leaves_monochrome2_alone() -> None:
    arr = np.array([[5, 10], [20, 30]], dtype=np.uint16)
    np.testing.assert_array_equal(invert_monochrome1(arr, grey_dataset("MONOCHROME2")), arr)


def test_invert_monochrome1_unit_range_is_one_minus_x() -> None:
    arr = np.array([0.0, 0.25, 1.0])
    out = invert_monochrome1(arr, grey_dataset("MONOCHROME1"), value_range=(0.0, 1.0))
    np.testing.assert_array_equal(out, [1.0, 0.75, 0.0])


def test_preprocess_frame_monochrome1_is_inverse_of_monochrome2() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 4096, size=(40, 40), dtype=np.uint16)
    window = Window(center=2048, width=2000)
    spec = PreprocessingSpec(input_shape=(32, 32), channels=1, window=window)
    mono1 = grey_dataset("MONOCHROME1", bits=12)
    mono1.PixelData = arr.tobytes()
    mono2 = grey_dataset("MONOCHROME2", bits=12)
    mono2.PixelData = arr.tobytes()
    np.testing.assert_allclose(
        preprocess_frame(arr, mono1, spec), 1.0 - preprocess_frame(arr, mono2, spec), atol=1e-6
    )


# -- bits stored ----------------------------------------------------------------------------------
def test_mask_bits_stored_sign_extends_12_bit_signed() -> None:
    raw = np.array([0x0FFF, 0x0800, 0x07FF, 0x0000, 0xF001, 0x7801], dtype=np.uint16)
    arr = raw.view(np.int16)
    out = mask_bits_stored(arr, grey_dataset(bits=12, signed=True))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [-1, -2048, 2047, 0, 1, -2047])


def test_mask_bits_stored_unsigned_drops_high_bits() -> None:
    arr = np.array([0xF123, 0x0FFF, 0x1000], dtype=np.uint16)
    out = mask_bits_stored(arr, grey_dataset(bits=12))
    np.testing.assert_array_equal(out, [0x0123, 0x0FFF, 0x0000])


def test_mask_bits_stored_full_width_is_unchanged() -> None:
    arr = np.array([-32768, -1, 32767], dtype=np.int16)
    np.testing.assert_array_equal(mask_bits_stored(arr, grey_dataset(signed=True)), arr)


# -- geometry -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("src", "dst"),
    [((512, 512), (224, 224)), ((50, 70), (32, 40)), ((30, 20), (64, 48)), ((97, 61), (40, 61))],
)
def test_resize_matches_pillow_bilinear(src: tuple[int, int], dst: tuple[int, int]) -> None:
    # Pillow's C resampler (double precision) is the independent implementation of the same
    # anti-aliased triangle filter, for shrinking and enlarging.
    rng = np.random.default_rng(1)
    arr = (rng.random(src) * 1000.0).astype(np.float32)
    image = Image.fromarray(arr, mode="F")
    expected = np.asarray(image.resize((dst[1], dst[0]), Image.Resampling.BILINEAR))
    out = resize(arr, dst)
    assert out.shape == dst
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


def test_resize_is_close_to_skimage_antialiased() -> None:
    # A second, differently built anti-aliased resize (Gaussian prefilter + bilinear) agrees on
    # a smooth image: no shift, no aliasing.
    yy, xx = np.mgrid[0:300, 0:400]
    arr = np.sin(xx / 37.0) + np.cos(yy / 23.0)
    sk_resize = cast(Callable[..., Any], sk_transform.resize)
    expected = sk_resize(arr, (120, 160), order=1, anti_aliasing=True, preserve_range=True)
    out = resize(arr, (120, 160))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[4:-4, 4:-4], expected[4:-4, 4:-4], atol=0.02)


def test_resize_averages_away_a_checkerboard() -> None:
    # Nearest or plain bilinear sampling would keep the pattern (aliasing); anti-aliasing
    # averages it to the mean.
    board = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float64)
    out = resize(board, (16, 16))
    np.testing.assert_allclose(out[1:-1, 1:-1], 0.5, atol=1e-6)
    np.testing.assert_allclose(out, 0.5, atol=0.01)  # corners: taps cut by the edge


def test_resize_keeps_channels() -> None:
    out = resize(np.ones((20, 30, 3)), (16, 16))
    assert out.shape == (16, 16, 3)


def test_resize_keep_aspect_pads_centred() -> None:
    arr = np.ones((20, 40))
    out = resize(arr, (32, 32), keep_aspect=True, pad_value=-1.0)
    assert out.shape == (32, 32)
    # 20x40 scaled by 0.8 -> 16x32, centred with 8 rows of padding above and below.
    np.testing.assert_array_equal(out[:8], -1.0)
    np.testing.assert_array_equal(out[24:], -1.0)
    np.testing.assert_allclose(out[8:24], 1.0)


def test_resize_keep_aspect_tall_image() -> None:
    out = resize(np.ones((40, 10)), (20, 20), keep_aspect=True)
    # 40x10 scaled by 0.5 -> 20x5, columns 7..12 hold the image.
    np.testing.assert_array_equal(out[:, :7], 0.0)
    np.testing.assert_array_equal(out[:, 12:], 0.0)
    np.testing.assert_allclose(out[:, 7:12], 1.0)


def test_resample_volume_shape_from_spacing() -> None:
    vol = np.zeros((10, 20, 30))
    assert resample_volume(vol, (2.5, 0.5, 0.5), (1.0, 1.0, 1.0)).shape == (25, 10, 15)
    assert resample_volume(vol, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)).shape == (10, 20, 30)


def test_resample_volume_is_resize_along_each_axis() -> None:
    rng = np.random.default_rng(2)
    vol = rng.random((12, 40, 30))
    out = resample_volume(vol, (2.0, 0.5, 0.5), (1.0, 1.0, 1.0))
    assert out.shape == (24, 20, 15)
    in_plane = np.stack([resize(s, (20, 15)) for s in vol])
    expected = np.stack(
        [resize(np.ascontiguousarray(in_plane[:, r, :]), (24, 15)) for r in range(20)], axis=1
    )
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_resample_volume_refuses_bad_input() -> None:
    with pytest.raises(PreprocessingError, match="3D"):
        resample_volume(np.zeros((4, 4)), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(PreprocessingError, match="positive"):
        resample_volume(np.zeros((4, 4, 4)), (0.0, 1.0, 1.0), (1.0, 1.0, 1.0))


def test_replicate_channels() -> None:
    arr = np.arange(6.0).reshape(2, 3)
    out = replicate_channels(arr, 3)
    assert out.shape == (2, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)
    assert replicate_channels(arr, 1).shape == (2, 3, 1)
    with pytest.raises(PreprocessingError):
        replicate_channels(np.zeros((2, 3, 2)), 3)


# -- normalisation --------------------------------------------------------------------------------
def test_normalize_minmax_and_zscore_stats() -> None:
    rng = np.random.default_rng(2)
    arr = rng.normal(100.0, 20.0, size=(30, 30))
    minmax = normalize(arr, "minmax")
    assert minmax.min() == 0.0
    assert minmax.max() == 1.0
    zscore = normalize(arr, "zscore")
    assert zscore.mean() == pytest.approx(0.0, abs=1e-12)
    assert zscore.std() == pytest.approx(1.0)
    np.testing.assert_array_equal(normalize(np.full((3, 3), 5.0), "minmax"), 0.0)
    np.testing.assert_array_equal(normalize(np.full((3, 3), 5.0), "zscore"), 0.0)
    kept = normalize(arr, "none")
    np.testing.assert_array_equal(kept, arr)
    assert kept is not arr  # a new array, as the other modes give


def test_normalize_imagenet() -> None:
    arr = np.ones((4, 4, 3)) * np.array(IMAGENET_MEAN)
    np.testing.assert_allclose(normalize(arr, "imagenet"), 0.0, atol=1e-12)
    out = normalize(np.ones((2, 2, 3)), "imagenet")
    expected = [(1.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    np.testing.assert_allclose(out[0, 0], expected)
    with pytest.raises(PreprocessingError, match="RGB"):
        normalize(np.ones((4, 4)), "imagenet")


# -- colour ---------------------------------------------------------------------------------------
def test_to_rgb_converts_ybr_only_when_asked() -> None:
    rgb, ds = read("SC_rgb_jpeg_dcmtk.dcm")
    ybr = pixel_array(sample_file("SC_rgb_jpeg_dcmtk.dcm"), as_rgb=False)
    np.testing.assert_array_equal(to_rgb(rgb, ds), rgb)
    converted = to_rgb(ybr, ds, is_ybr=True)
    assert np.abs(converted.astype(int) - rgb.astype(int)).max() <= 1


def test_to_rgb_palette_uses_color_lut() -> None:
    arr, ds = read("OBXXXX1A.dcm")
    np.testing.assert_array_equal(to_rgb(arr, ds), apply_color_lut(arr, ds))


def test_to_rgb_refuses_grey() -> None:
    with pytest.raises(PreprocessingError, match="colour"):
        to_rgb(np.zeros((4, 4)), grey_dataset())


# -- spec -----------------------------------------------------------------------------------------
def test_spec_presets_and_explicit_window() -> None:
    assert PreprocessingSpec(input_shape=(64, 64), window="lung").window_values == (-600, 1500)
    assert PreprocessingSpec(input_shape=(64, 64), window="brain").window_values == (40, 80)
    spec = PreprocessingSpec.model_validate(
        {"input_shape": (64, 64), "window": {"center": 50, "width": 350}}
    )
    assert spec.window_values == (50.0, 350.0)
    assert PreprocessingSpec(input_shape=(64, 64)).window_values is None


@pytest.mark.parametrize(
    "fields",
    [
        {"input_shape": (4, 64)},
        {"input_shape": (64,)},
        {"input_shape": (64, 64, 3)},
        {"input_shape": (64, 64), "window": "liver"},
        {"input_shape": (64, 64), "window": {"center": 40, "width": 0}},
        {"input_shape": (64, 64), "window": {"center": 40, "width": 400, "level": 1}},
        {"input_shape": (64, 64), "channels": 2},
        {"input_shape": (64, 64), "normalization": "percentile"},
        {"input_shape": (64, 64), "channels": 1, "normalization": "imagenet"},
        {"input_shape": (64, 64), "target_spacing": (1.0, 1.0)},
        {"input_shape": (64, 64), "colour": True},
    ],
)
def test_spec_validation_errors(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PreprocessingSpec(**fields)


def test_spec_is_frozen() -> None:
    spec = PreprocessingSpec(input_shape=(64, 64))
    with pytest.raises(ValidationError):
        spec.channels = 1


# -- grey_to_unit: the folded fast path against the step-by-step composition ----------------------
def steps_to_unit(
    arr: NDArray[Any], ds: Dataset, window: tuple[float, float] | None = None
) -> NDArray[np.float64]:
    unit = apply_voi(apply_modality_lut(arr, ds), ds, window=window)
    return np.asarray(invert_monochrome1(unit, ds, value_range=(0.0, 1.0)), dtype=np.float64)


def with_header(ds: Dataset, **fields: Any) -> Dataset:
    out = ds.copy()
    for keyword, value in fields.items():
        setattr(out, keyword, value)
    return out


@pytest.mark.parametrize(
    ("photometric", "fields", "window"),
    [
        ("MONOCHROME2", {"RescaleSlope": 1, "RescaleIntercept": -1024}, (40.0, 400.0)),
        ("MONOCHROME1", {"RescaleSlope": 1, "RescaleIntercept": -1024}, (-600.0, 1500.0)),
        ("MONOCHROME2", {"RescaleSlope": 0.5, "RescaleIntercept": 10}, None),
        ("MONOCHROME1", {}, None),
        ("MONOCHROME2", {"WindowCenter": 1000, "WindowWidth": 600}, None),
        ("MONOCHROME2", {"WindowCenter": [1000, 50], "WindowWidth": [600, 100]}, None),
        ("MONOCHROME2", {"WindowCenter": 1000, "WindowWidth": 600, "VOILUTFunction": "SIGMOID"},
         None),
        ("MONOCHROME2", {"RescaleSlope": -2, "RescaleIntercept": 5000}, None),
        ("MONOCHROME2", {}, (2000.0, 1.5)),
    ],
)
def test_grey_to_unit_equals_the_steps(
    photometric: str, fields: dict[str, Any], window: tuple[float, float] | None
) -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 4096, (40, 50)).astype(np.uint16)
    ds = with_header(grey_dataset(photometric, bits=12), **fields)
    out = grey_to_unit(arr, ds, window=window)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, steps_to_unit(arr, ds, window), atol=2e-6)


def test_grey_to_unit_lut_sequences_take_the_step_path() -> None:
    arr, ds = read("mlut_18.dcm")
    np.testing.assert_allclose(grey_to_unit(arr, ds), steps_to_unit(arr, ds), atol=2e-6)
    arr, ds = read("vlut_04.dcm")
    np.testing.assert_allclose(grey_to_unit(arr, ds), steps_to_unit(arr, ds), atol=2e-6)


def test_grey_to_unit_refuses_narrow_window() -> None:
    with pytest.raises(PreprocessingError, match="below 1"):
        grey_to_unit(np.zeros((4, 4), np.uint16), grey_dataset(), window=(0.0, 0.5))


def test_luminance_matches_skimage() -> None:
    rgb = np.random.default_rng(4).random((16, 16, 3))
    rgb2gray = cast(Callable[..., Any], sk_color.rgb2gray)
    np.testing.assert_allclose(luminance(rgb), rgb2gray(rgb), atol=1e-12)
    with pytest.raises(PreprocessingError, match="RGB"):
        luminance(np.zeros((4, 4)))


# -- the chain ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("CT_small.dcm", PreprocessingSpec(input_shape=(64, 64), window="soft-tissue")),
        ("CT_small.dcm", PreprocessingSpec(input_shape=(48, 64), channels=1, keep_aspect=True)),
        ("MR_small_RLE.dcm", PreprocessingSpec(input_shape=(32, 32), normalization="zscore")),
        (
            "SC_rgb_jpeg_dcmtk.dcm",
            PreprocessingSpec(input_shape=(64, 64), normalization="imagenet"),
        ),
        ("SC_rgb_jpeg_dcmtk.dcm", PreprocessingSpec(input_shape=(64, 64), channels=1)),
        ("OBXXXX1A.dcm", PreprocessingSpec(input_shape=(96, 128))),
    ],
)
def test_preprocess_frame_shape_dtype_and_determinism(name: str, spec: PreprocessingSpec) -> None:
    arr, ds = read(name)
    first = preprocess_frame(arr, ds, spec)
    again_arr, again_ds = read(name)
    second = preprocess_frame(again_arr, again_ds, spec)
    assert first.dtype == np.float32
    assert first.shape == (*spec.input_shape, spec.channels)
    assert np.isfinite(first).all()
    assert first.tobytes() == second.tobytes()
    if spec.normalization == "minmax":
        assert first.min() == 0.0
        assert first.max() == 1.0


def test_preprocess_frame_does_not_change_its_inputs() -> None:
    arr, ds = read("CT_small.dcm")
    before = arr.copy()
    preprocess_frame(arr, ds, PreprocessingSpec(input_shape=(64, 64), window="lung"))
    np.testing.assert_array_equal(arr, before)
    assert "WindowCenter" not in ds


def test_preprocess_frame_ct_window_matches_steps() -> None:
    arr, ds = read("CT_small.dcm")
    spec = PreprocessingSpec(input_shape=(64, 64), channels=1, window="bone")
    hu = arr.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    windowed = np.vectorize(lambda v: hand_window(v, 400.0, 1800.0))(hu)
    expected = normalize(resize(windowed, (64, 64)), "minmax")[..., np.newaxis]
    np.testing.assert_allclose(preprocess_frame(arr, ds, spec), expected, atol=1e-6)


def test_refuses_dataset_without_pixel_data() -> None:
    arr, ds = read("CT_small.dcm")
    del ds.PixelData
    with pytest.raises(PreprocessingError, match="no pixel data"):
        preprocess_frame(arr, ds, PreprocessingSpec(input_shape=(64, 64)))


def test_refuses_too_small_image() -> None:
    arr, ds = read("MR_small_RLE.dcm")
    spec = PreprocessingSpec(input_shape=(64, 64), min_input_size=128)
    with pytest.raises(PreprocessingError, match=r"too small: 64x64 .* at least 128"):
        preprocess_frame(arr, ds, spec)


def test_refuses_unsupported_photometric_interpretation() -> None:
    arr, ds = read("CT_small.dcm")
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    with pytest.raises(PreprocessingError, match="unsupported photometric interpretation"):
        preprocess_frame(arr, ds, PreprocessingSpec(input_shape=(64, 64)))


def test_refuses_wrong_frame_shape() -> None:
    arr, ds = read("CT_small.dcm")
    with pytest.raises(PreprocessingError, match="must be 2D"):
        preprocess_frame(np.stack([arr, arr]), ds, PreprocessingSpec(input_shape=(64, 64)))


def test_preprocessing_error_is_a_dicom_ai_error() -> None:
    assert issubclass(PreprocessingError, DicomAIError)
