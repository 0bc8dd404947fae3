"""Loading a series: frames in instance order, volumes in position order, decoders, errors."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_ai.exceptions import DicomAIError
from dicom_ai.pipeline.loading import (
    DecodeError,
    LoadError,
    decode,
    frame_header,
    load_frames,
    load_volume,
    plugin_for,
)
from dicom_ai.pipeline.preprocessing import grey_to_unit, preprocess_frame
from dicom_ai.values import PreprocessingSpec
from tests.peers import make_ct_series, sample_file


def _rewrite(path: Path, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _pixels(path: Path | str) -> NDArray[np.generic]:
    return np.asarray(pydicom.dcmread(path).pixel_array)


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- classic single-frame series ----------------------------------------------------------------
def test_volume_sorts_by_position_not_instance_number(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 7, size=32, seed=1)
    numbers = list(range(1, 8))
    random.Random(3).shuffle(numbers)
    for path, number in zip(paths, numbers, strict=True):
        _rewrite(path, InstanceNumber=number)
    given = list(reversed(paths))

    volume = load_volume(given)

    assert volume.array.shape == (7, 32, 32)
    assert volume.sop_instance_uids == [_uid(p) for p in paths]
    for k, path in enumerate(paths):
        np.testing.assert_array_equal(volume.array[k], _pixels(path))
    template = pydicom.dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    row, col = (float(v) for v in template.PixelSpacing)
    assert volume.spacing == pytest.approx((1.0, row, col))
    assert volume.origin == pytest.approx((0.0, 0.0, 0.0))
    assert volume.orientation == pytest.approx(
        tuple(float(v) for v in template.ImageOrientationPatient))
    assert volume.warnings == []
    assert [ds.SOPInstanceUID for ds in volume.datasets] == volume.sop_instance_uids


def test_frames_follow_instance_number(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 5, size=32, seed=2)
    numbers = [3, 5, 1, 4, 2]
    for path, number in zip(paths, numbers, strict=True):
        _rewrite(path, InstanceNumber=number)

    frames = load_frames(paths)

    assert [int(f.dataset.InstanceNumber) for f in frames] == [1, 2, 3, 4, 5]
    by_number = {n: p for p, n in zip(paths, numbers, strict=True)}
    for frame in frames:
        path = by_number[int(frame.dataset.InstanceNumber)]
        assert frame.sop_instance_uid == _uid(path)
        assert frame.frame_index == 0
        np.testing.assert_array_equal(frame.array, _pixels(path))
        assert "PixelData" in frame.dataset  # the whole dataset, not only the header


def test_missing_slice_is_reported(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 8, size=32, seed=4)
    del paths[3]

    volume = load_volume(paths)

    assert volume.array.shape[0] == 7
    assert volume.spacing[0] == pytest.approx(1.0)
    assert len(volume.warnings) == 1
    assert "missing slices" in volume.warnings[0]
    assert "about 1 missing" in volume.warnings[0]


def test_two_missing_slices_are_counted(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 10, size=32, seed=5)
    del paths[4:6]

    volume = load_volume(paths)

    assert any("about 2 missing" in w for w in volume.warnings)


def test_uneven_spacing_is_reported(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 6, size=32, seed=6)
    for i, path in enumerate(paths[3:], start=3):
        _rewrite(path, ImagePositionPatient=[0.0, 0.0, i + 0.3])

    volume = load_volume(paths)

    assert volume.spacing[0] == pytest.approx(1.0)
    assert len(volume.warnings) == 1
    assert "uneven slice spacing" in volume.warnings[0]


def test_duplicate_position_is_refused(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 5, size=32, seed=7)
    _rewrite(paths[2], ImagePositionPatient=[0.0, 0.0, 1.0])

    with pytest.raises(LoadError, match="duplicate slice position"):
        load_volume(paths)


def test_mixed_series_is_refused(tmp_path: Path) -> None:
    first = make_ct_series(tmp_path / "a", 3, size=32, seed=8)
    second = make_ct_series(tmp_path / "b", 3, size=32, seed=9)
    for i, path in enumerate(second):
        _rewrite(path, ImagePositionPatient=[0.0, 0.0, 10.0 + i])

    with pytest.raises(LoadError, match="mixed series"):
        load_volume(first + second)
    with pytest.raises(LoadError, match="mixed series"):
        load_frames(first + second)


def test_mixed_orientation_or_size_is_refused(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 4, size=32, seed=10)
    _rewrite(paths[1], ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
    with pytest.raises(LoadError, match="orientation"):
        load_volume(paths)

    paths = make_ct_series(tmp_path / "ct2", 4, size=32, seed=11)
    other = make_ct_series(tmp_path / "small", 1, size=16, seed=12)[0]
    ds = pydicom.dcmread(other)
    ds.SeriesInstanceUID = pydicom.dcmread(paths[0]).SeriesInstanceUID
    ds.ImagePositionPatient = [0.0, 0.0, 9.0]
    ds.save_as(other)
    with pytest.raises(LoadError, match="16x16"):
        load_volume([*paths, other])


def test_missing_geometry_and_no_files(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 3, size=32, seed=13)
    _rewrite(paths[1], ImagePositionPatient=None)
    with pytest.raises(LoadError, match=r"missing geometry.*ImagePositionPatient"):
        load_volume(paths)
    assert len(load_frames(paths)) == 3  # frames need no geometry

    with pytest.raises(LoadError, match="no files"):
        load_volume([])
    with pytest.raises(LoadError, match="no files"):
        load_frames([])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom")
    with pytest.raises(LoadError, match=r"cannot read garbage\.dcm"):
        load_frames([garbage])


def _rotation(degrees_x: float, degrees_z: float) -> NDArray[np.float64]:
    ax, az = math.radians(degrees_x), math.radians(degrees_z)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return np.asarray(rz @ rx, dtype=np.float64)


def test_oblique_series_sorts_along_the_normal(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 6, size=32, seed=14)
    rotation = _rotation(30.0, 30.0)
    row, col = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row, col)
    # In-plane offsets scramble the z order: sorting by z or InstanceNumber would be wrong.
    offsets = [0.0, 8.0, -8.0, 8.0, -8.0, 8.0]
    numbers = [6, 1, 5, 2, 4, 3]
    origin = np.array([-20.0, 15.0, 40.0])
    for i, path in enumerate(paths):
        position = origin + 2.5 * i * normal + offsets[i] * col
        _rewrite(path, ImageOrientationPatient=[round(float(v), 6) for v in (*row, *col)],
                 ImagePositionPatient=[round(float(v), 4) for v in position],
                 InstanceNumber=numbers[i])
    z = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in paths]
    assert sorted(range(6), key=lambda k: z[k]) != list(range(6))

    volume = load_volume(list(reversed(paths)))

    assert volume.sop_instance_uids == [_uid(p) for p in paths]
    assert volume.spacing[0] == pytest.approx(2.5, abs=1e-3)
    assert volume.origin == pytest.approx(tuple(origin), abs=1e-3)
    np.testing.assert_allclose(volume.normal, normal, atol=1e-5)
    assert volume.warnings == []


# -- enhanced multi-frame ---------------------------------------------------------------------
def test_enhanced_ct_geometry_from_functional_groups() -> None:
    path = sample_file("eCT_Supplemental.dcm")
    pixels = _pixels(path)

    volume = load_volume([path])
    frames = load_frames([path])

    # Orientation [-1,0,0, 0,1,0]: normal is -z, so z = -149 comes before z = -159.
    assert volume.frame_indices == [1, 0]
    np.testing.assert_array_equal(volume.array, pixels[::-1])
    assert volume.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert volume.origin == pytest.approx((99.5, -301.5, -149.0))
    assert [f.frame_index for f in frames] == [0, 1]
    np.testing.assert_array_equal(np.stack([f.array for f in frames]), pixels)


def _with_functional_groups(source: str, target: Path, order: list[int]) -> Path:
    """A copy of an emri file with Multi-frame Functional Groups (PS3.3 C.7.6.16): frame i is
    at z = 1.2 * order[i], shared orientation and pixel measures."""
    ds = pydicom.dcmread(source)
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing = [0.5, 0.6]
    measures.SliceThickness = 1.2
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    groups = []
    for k in order:
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = [-16.0, -16.0, 1.2 * k]
        group.PlanePositionSequence = [position]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.save_as(target)
    return target


@pytest.mark.parametrize(
    "name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_enhanced_mr_frames_and_volume(tmp_path: Path, name: str) -> None:
    reference = _pixels(sample_file("emri_small.dcm"))
    assert reference.shape == (10, 64, 64)

    frames = load_frames([sample_file(name)])
    assert [f.frame_index for f in frames] == list(range(10))
    np.testing.assert_array_equal(np.stack([f.array for f in frames]), reference)
    with pytest.raises(LoadError, match="functional groups"):
        load_volume([sample_file(name)])

    order = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]
    path = _with_functional_groups(sample_file(name), tmp_path / name, order)
    volume = load_volume([path])

    assert volume.array.shape == (10, 64, 64)
    assert volume.spacing == pytest.approx((1.2, 0.5, 0.6))
    assert volume.origin == pytest.approx((-16.0, -16.0, 0.0))
    assert volume.frame_indices == [order.index(k) for k in range(10)]
    for k, index in enumerate(volume.frame_indices):
        np.testing.assert_array_equal(volume.array[k], reference[index])
    assert volume.warnings == []


def test_enhanced_per_frame_rescale_and_window_reach_preprocessing(tmp_path: Path) -> None:
    # Frame i has Rescale Slope i + 1 (per-frame Pixel Value Transformation macro) and a window
    # shared by all frames (Frame VOI LUT macro in the shared groups), PS3.3 C.7.6.16.2.9/.10.
    path = _with_functional_groups(sample_file("emri_small.dcm"), tmp_path / "e.dcm",
                                   list(range(10)))
    ds = pydicom.dcmread(path)
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        transform = Dataset()
        transform.RescaleSlope = i + 1
        transform.RescaleIntercept = -5
        transform.RescaleType = "US"
        group.PixelValueTransformationSequence = [transform]
    voi = Dataset()
    voi.WindowCenter = 300
    voi.WindowWidth = 500
    ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence = [voi]
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path)

    frames = load_frames([path])
    spec = PreprocessingSpec(input_shape=(64, 64), channels=1)
    for frame in frames:
        i = frame.frame_index
        assert float(frame.dataset.RescaleSlope) == i + 1
        assert float(frame.dataset.WindowCenter) == 300
        values = frame.array.astype(np.float64) * (i + 1) - 5
        expected = np.clip((values - 299.5) / 499 + 0.5, 0, 1)
        unit = grey_to_unit(frame.array, frame.dataset)
        np.testing.assert_allclose(unit, expected, atol=1e-6)
        assert preprocess_frame(frame.array, frame.dataset, spec).shape == (64, 64, 1)
    # The file's own dataset is untouched (each frame gets a shallow copy).
    assert "RescaleSlope" not in frames[0].dataset.PerFrameFunctionalGroupsSequence[0]
    assert "RescaleSlope" not in pydicom.dcmread(path, stop_before_pixels=True)
    volume = load_volume([path])
    assert [float(d.RescaleSlope) for d in volume.datasets] == [i + 1.0 for i in range(10)]


def test_frame_header_without_macros_is_the_dataset() -> None:
    ds = pydicom.dcmread(sample_file("emri_small.dcm"))
    assert frame_header(ds, 0) is ds


# -- decoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "JPEG2000.dcm", "US1_J2KR.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm",
])
def test_compressed_samples_decode(name: str) -> None:
    path = sample_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)

    frames = load_frames([path])

    assert len(frames) == int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.SamplesPerPixel)
    shape = (ds.Rows, ds.Columns) if samples == 1 else (ds.Rows, ds.Columns, samples)
    assert all(f.array.shape == shape for f in frames)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_lossless_equals_uncompressed_twin(name: str) -> None:
    (frame,) = load_frames([sample_file(name)])
    np.testing.assert_array_equal(frame.array, _pixels(sample_file("MR_small.dcm")))


def test_12_bit_jpeg_extended_names_the_plugin() -> None:
    path = sample_file("JPEG-lossy.dcm")

    with pytest.raises(DecodeError) as caught:
        load_frames([path])

    message = str(caught.value)
    assert "JPEG Extended" in message
    assert "pylibjpeg-libjpeg" in message
    assert "1.2.840.10008.1.2.4.51" in message
    assert caught.value.transfer_syntax_uid == "1.2.840.10008.1.2.4.51"
    assert isinstance(caught.value, DicomAIError)


def test_plugin_names() -> None:
    def plugin(name: str) -> str:
        return plugin_for(pydicom.dcmread(sample_file(name), stop_before_pixels=True))

    assert plugin("SC_rgb_jpeg_dcmtk.dcm") == "pillow or python-gdcm"
    assert plugin("JPEG-LL.dcm") == "python-gdcm"
    assert plugin("MR_small_jpeg_ls_lossless.dcm") == "pyjpegls or python-gdcm"
    assert plugin("JPEG2000.dcm") == "pylibjpeg-openjpeg"
    assert plugin("MR_small_RLE.dcm").startswith("pylibjpeg-rle")
    assert plugin("JPEG-lossy.dcm").startswith("pylibjpeg-libjpeg (GPL")


def test_a_dataset_without_pixel_data_says_so() -> None:
    """An RT Plan has nothing to decode: the error says that, not that a plugin is missing."""
    ds = pydicom.dcmread(sample_file("rtplan.dcm"))
    with pytest.raises(DecodeError, match=r"has no pixel data .*RT Plan Storage"):
        load_frames([sample_file("rtplan.dcm")])
    with pytest.raises(DecodeError, match="nothing to decode"):
        decode(ds)


@pytest.mark.parametrize(("signed", "syntax"), [(1, "1.2.840.10008.1.2.1"),
                                                (0, "1.2.840.10008.1.2")])
def test_native_slices_read_into_the_volume_as_pydicom_decodes_them(
        tmp_path: Path, signed: int, syntax: str) -> None:
    """Uncompressed slices go from the file straight into the volume (no per-slice array):
    the values are pydicom's, bits above Bits Stored masked (unsigned) or sign-extended
    (signed), for explicit and implicit VR little endian."""
    paths = make_ct_series(tmp_path / "ct", 5, size=32, seed=9)
    rng = np.random.default_rng(2)
    for path in paths:
        ds = pydicom.dcmread(path)
        dtype = np.int16 if signed else np.uint16
        # 12 bits stored, garbage (an overlay, say) in the 4 bits above.
        raw = rng.integers(0, 1 << 16, (32, 32), dtype=np.uint32).astype(np.uint16)
        ds.PixelData = raw.astype(dtype).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = signed
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        ds.save_as(path, enforce_file_format=True)

    volume = load_volume(paths)

    expected = np.stack([pydicom.dcmread(p).pixel_array for p in paths])
    assert volume.array.dtype == expected.dtype
    assert np.array_equal(volume.array, expected)
    assert volume.slice_positions == pytest.approx((0.0, 1.0, 2.0, 3.0, 4.0))


def test_slice_positions_keep_the_gap_of_a_missing_slice(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 6, size=32, seed=5)
    del paths[2]

    volume = load_volume(list(reversed(paths)))

    assert volume.slice_positions == pytest.approx((0.0, 1.0, 3.0, 4.0, 5.0))
    assert volume.spacing[0] == pytest.approx(1.0)
