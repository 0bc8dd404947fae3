"""Loading: a completed series (stored instance files) -> model-ready frames or a volume.

Two shapes come out of here:

* :func:`load_frames` -- every frame of every file as a 2D (or colour) array, in InstanceNumber
  then frame order; for classification of projection images (CR/DX/US/SC) and slice-wise models.
* :func:`load_volume` -- one 3D array ``(slices, rows, cols)`` with its geometry, slices ordered by
  position along the slice normal (PS3.3 C.7.6.2.1.1), never by InstanceNumber; from classic
  single-frame slices (Image Plane module, PS3.3 C.7.6.2) or enhanced multi-frame objects
  (Multi-frame Functional Groups module, PS3.3 C.7.6.16).

Pixel data is decoded by pydicom's pixel backends; a transfer syntax that no installed plugin can
decode raises :class:`DecodeError` naming the transfer syntax and the package that would decode it
(:data:`dicom_ai.transfer_syntaxes.DECODERS`).
Reading is tolerant; the geometry a volume needs is not optional (:class:`LoadError`).

Nothing is decoded before its size is known to be acceptable: :func:`check_pixel_limits` reads the
declared matrix from the header (Image Pixel module, PS3.3 C.7.6.3) and, for JPEG and JPEG 2000
frames, from the codestream's own header, and refuses with :class:`PixelLimitError` what is above
``[limits]`` (``max_frame_pixels``, ``max_pixel_bytes``). Decoders size their output from these
numbers, so a few bytes declaring a huge matrix would otherwise cost gigabytes. Files are read
with the pixel data deferred, so a refused file's pixel bytes are never loaded either.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames, get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import pixel_array
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGExtended12Bit

from dicom_ai.config import LimitsSettings
from dicom_ai.exceptions import DicomAIError
from dicom_ai.transfer_syntaxes import (
    DECODER_12BIT_JPEG,
    DECODERS,
    JPEG2000_FAMILY,
    JPEG_FAMILY,
)

LOGGER = logging.getLogger(__name__)

#: Largest difference between two direction cosines still taken as the same orientation.
ORIENTATION_TOLERANCE = 1e-3
#: Slices closer than this (mm) along the normal are duplicates.
DUPLICATE_TOLERANCE_MM = 1e-3
#: Spacing that differs from the median by more than this fraction is reported as uneven.
UNEVEN_FRACTION = 0.10
#: A gap larger than this multiple of the median spacing is reported as missing slices.
MISSING_FACTOR = 1.5

#: Elements larger than this are read from the file only when used: the pixel data of a file
#: whose declared size is refused is never loaded.
DEFER_BYTES = 64 * 1024

# What pydicom and its plugins raise when pixel data cannot be decoded.
_DECODE_ERRORS = (
    AttributeError, KeyError, NotImplementedError, OSError, RuntimeError, TypeError, ValueError,
)


class DecodeError(DicomAIError):
    """The pixel data of an instance cannot be decoded.

    The message names the transfer syntax (UID and name, PS3.5 section 10) and the plugin
    package that would decode it.

    Parameters
    ----------
    message : str
        What failed, with the transfer syntax and plugin.
    transfer_syntax_uid : str
        The instance's Transfer Syntax UID (0002,0010), empty if unknown.
    """

    def __init__(self, message: str, transfer_syntax_uid: str = "") -> None:
        super().__init__(message)
        self.transfer_syntax_uid = transfer_syntax_uid


class PixelLimitError(DecodeError):
    """The declared size of an instance's pixel data is above a ``[limits]`` setting.

    Raised before anything is decoded. The message names the instance (SOP Instance UID), the
    declared sizes and the setting; these are attributes of the image matrix, never patient
    data. Retrying cannot help: the job fails for good.
    """


class LoadError(DicomAIError):
    """A series cannot be loaded as asked: no files, an unreadable file, a mixed series,
    duplicate slice positions, or missing geometry when a volume is requested."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame of one instance.

    Attributes
    ----------
    array : NDArray
        ``(rows, cols)`` or ``(rows, cols, samples)``; YBR colour is converted to RGB, no
        modality or VOI LUT applied (that is preprocessing's job).
    dataset : Dataset
        The dataset of the instance; for an enhanced multi-frame object, a shallow copy carrying
        this frame's pixel value transformation and VOI at top level (:func:`frame_header`).
    sop_instance_uid : str
        SOP Instance UID (0008,0018) of the instance.
    frame_index : int
        0-based frame index within the instance (Referenced Frame Number is this + 1).
    """

    array: NDArray[Any]
    dataset: Dataset
    sop_instance_uid: str
    frame_index: int


@dataclass(frozen=True)
class Volume:
    """A 3D volume of slices ordered along the slice normal (PS3.3 C.7.6.2.1.1).

    Attributes
    ----------
    array : NDArray
        ``(slices, rows, cols)``.
    spacing : tuple of float
        ``(slice, row, col)`` in mm: median distance between slice positions, then Pixel
        Spacing (0028,0030) -- row spacing (between rows) first, column spacing second.
    origin : tuple of float
        Image Position (Patient) (0020,0032) of the first slice, mm.
    orientation : tuple of float
        Image Orientation (Patient) (0020,0037): row then column direction cosines.
    sop_instance_uids : list of str
        SOP Instance UID of each slice, in slice order (repeats for a multi-frame object).
    frame_indices : list of int
        0-based frame index of each slice within its instance, in slice order.
    warnings : list of str
        Uneven spacing and missing slices; empty for a regular volume.
    datasets : list of Dataset
        Dataset of each slice, in slice order (per frame, see :func:`frame_header`).
    slice_positions : tuple of float
        Distance (mm) of each slice from the first along :attr:`normal` (0 for the first), as
        the slices' Image Position (Patient) gives it: uneven gaps and missing slices show
        here, while :attr:`spacing` holds their median. Empty when unknown (a volume built by
        hand): then the slices are taken as evenly spaced.
    """

    array: NDArray[Any]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    sop_instance_uids: list[str]
    frame_indices: list[int]
    warnings: list[str] = field(default_factory=list)
    datasets: list[Dataset] = field(default_factory=list)
    slice_positions: tuple[float, ...] = ()

    @property
    def normal(self) -> NDArray[np.float64]:
        """The slice normal: row cosines x column cosines (PS3.3 C.7.6.2.1.1)."""
        return _normal(self.orientation)


# -- limits -----------------------------------------------------------------------------------
#: The limits that apply when a caller gives none: the ``[limits]`` defaults.
DEFAULT_LIMITS = LimitsSettings()

# Start of frame markers: SOF0-SOF15 less DHT (C4), JPG (C8) and DAC (CC); SOF55 of JPEG-LS.
_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                       *range(0xCD, 0xD0), 0xF7})


@dataclass(frozen=True)
class PixelGeometry:
    """The size of an instance's pixel data as its header declares it (PS3.3 C.7.6.3, C.7.6.6).

    Attributes
    ----------
    rows, columns : int
        Rows (0028,0010) and Columns (0028,0011); 0 when absent or unreadable.
    frames : int
        Number of Frames (0028,0008); 1 when absent.
    samples : int
        Samples per Pixel (0028,0002); 1 when absent.
    bits_allocated : int
        Bits Allocated (0028,0100); 8 when absent.
    """

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int

    @property
    def frame_pixels(self) -> int:
        """Rows x Columns."""
        return self.rows * self.columns

    @property
    def pixel_bytes(self) -> int:
        """Bytes of all frames once decoded: Rows x Columns x frames x samples x bytes per
        sample, where a sample takes ``ceil(Bits Allocated / 8)`` bytes, at least one (pydicom
        decodes 1-bit data to one byte per pixel)."""
        per_sample = max((self.bits_allocated + 7) // 8, 1)
        return self.frame_pixels * self.frames * self.samples * per_sample


def _header_int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def declared_geometry(ds: Dataset) -> PixelGeometry:
    """The pixel matrix `ds` declares, from its header only (nothing is decoded).

    Parameters
    ----------
    ds : Dataset
        An image dataset (Image Pixel module, PS3.3 C.7.6.3; Multi-frame module, C.7.6.6).

    Returns
    -------
    PixelGeometry
    """
    return PixelGeometry(
        rows=max(_header_int(ds, "Rows", 0), 0),
        columns=max(_header_int(ds, "Columns", 0), 0),
        frames=max(_header_int(ds, "NumberOfFrames", 1), 1),
        samples=max(_header_int(ds, "SamplesPerPixel", 1), 1),
        bits_allocated=max(_header_int(ds, "BitsAllocated", 8), 1),
    )


def check_pixel_limits(ds: Dataset, limits: LimitsSettings | None = None) -> PixelGeometry:
    """Refuse an instance whose declared pixel data is larger than `limits` allow.

    Decoders size their output from Rows (0028,0010), Columns (0028,0011), Number of Frames
    (0028,0008), Samples per Pixel (0028,0002) and Bits Allocated (0028,0100) (PS3.3 C.7.6.3),
    not from the bytes present: a 1.5 KB RLE file may declare half a gigapixel. This reads those
    attributes only; the pixel data is not touched.

    Parameters
    ----------
    ds : Dataset
        The instance (its pixel data may be deferred).
    limits : LimitsSettings, optional
        ``max_frame_pixels`` (Rows x Columns) and ``max_pixel_bytes`` (all frames decoded, see
        :attr:`PixelGeometry.pixel_bytes`); default :data:`DEFAULT_LIMITS`.

    Returns
    -------
    PixelGeometry
        The declared size, within the limits.

    Raises
    ------
    PixelLimitError
        A limit is exceeded; the message names the declared sizes and the setting.
    """
    limits = limits or DEFAULT_LIMITS
    size = declared_geometry(ds)
    where = _where_ds(ds)
    syntax = str(_transfer_syntax(ds) or "")
    if size.frame_pixels > limits.max_frame_pixels:
        raise PixelLimitError(
            f"{where} declares {size.rows} x {size.columns} pixels per frame "
            f"({size.frame_pixels:,}), above limits.max_frame_pixels "
            f"({limits.max_frame_pixels:,}): not decoded", syntax)
    if size.pixel_bytes > limits.max_pixel_bytes:
        raise PixelLimitError(
            f"{where} declares {size.rows} x {size.columns} pixels x {size.frames} frames x "
            f"{size.samples} samples x {size.bits_allocated} bits allocated = "
            f"{size.pixel_bytes:,} bytes decoded, above limits.max_pixel_bytes "
            f"({limits.max_pixel_bytes:,}): not decoded", syntax)
    return size


def _check_codestreams(ds: Dataset, size: PixelGeometry, index: int | None) -> None:
    """Refuse JPEG / JPEG 2000 frames whose codestream declares more than the header does.

    Their decoders size the output from the codestream's own header (JPEG SOF, ITU-T T.81
    B.2.2; JPEG-LS SOF55; JPEG 2000 SIZ, ISO/IEC 15444-1 A.5.1), not from Rows and Columns;
    a codestream larger than the header it came with is never a valid image (PS3.5 8.2).
    """
    uid = _transfer_syntax(ds)
    if uid is None or (uid not in JPEG2000_FAMILY and uid not in JPEG_FAMILY):
        return
    if "PixelData" not in ds:
        return
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        if index is None:  # every frame: its first fragment holds the codestream's header
            frames: Iterable[tuple[int, bytes]] = (
                (i, fragments[0] if fragments else b"") for i, fragments in enumerate(
                    generate_fragmented_frames(ds.PixelData, number_of_frames=size.frames,
                                               extended_offsets=extended)))
        else:
            frames = [(index, get_frame(ds.PixelData, index, number_of_frames=size.frames,
                                        extended_offsets=extended))]
        for i, data in frames:
            shape = _codestream_shape(data, uid)
            if shape is None:
                continue
            rows, columns, components = shape
            if rows * columns * components > size.frame_pixels * size.samples:
                raise PixelLimitError(
                    f"{_where_ds(ds)}: the {uid.name} codestream of frame {i + 1} declares "
                    f"{rows} x {columns} pixels x {components} components, the header "
                    f"{size.rows} x {size.columns} x {size.samples}: not decoded", str(uid))
    except (ValueError, TypeError, IndexError, struct.error):
        return  # framing the decoder cannot read either; it reports that itself


def _codestream_shape(data: bytes, uid: UID) -> tuple[int, int, int] | None:
    """``(rows, columns, components)`` from a codestream's header, None if not found."""
    if uid in JPEG2000_FAMILY:
        offset = 0
        if data[4:8] == b"jP  ":  # a JP2 file: skip boxes to the codestream box (jp2c)
            while offset + 8 <= len(data):
                length = int.from_bytes(data[offset:offset + 4], "big")
                if data[offset + 4:offset + 8] == b"jp2c":
                    offset += 8
                    break
                if length < 8:
                    return None
                offset += length
        # SOC, then SIZ: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz
        if data[offset:offset + 4] != b"\xff\x4f\xff\x51":
            return None
        x, y, x0, y0 = struct.unpack(">IIII", data[offset + 8:offset + 24])
        (components,) = struct.unpack(">H", data[offset + 40:offset + 42])
        return max(y - y0, 0), max(x - x0, 0), components
    if data[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker in _JPEG_SOF:
            rows, columns = struct.unpack(">HH", data[offset + 5:offset + 9])
            return rows, columns, data[offset + 9]
        (length,) = struct.unpack(">H", data[offset + 2:offset + 4])
        offset += 2 + length
    return None


# -- decoding ---------------------------------------------------------------------------------
def plugin_for(ds: Dataset) -> str:
    """The package that would decode the pixel data of `ds`.

    Parameters
    ----------
    ds : Dataset
        A dataset with its file meta (Transfer Syntax UID, PS3.10 section 7.1).

    Returns
    -------
    str
        A package name, e.g. ``"pylibjpeg-openjpeg"``.
    """
    uid = _transfer_syntax(ds)
    if uid == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8:
        return DECODER_12BIT_JPEG
    return DECODERS.get(str(uid), "no known plugin")


def decode(ds: Dataset, index: int | None = None, *,
           limits: LimitsSettings | None = None) -> NDArray[Any]:
    """Decode the pixel data of `ds` (all frames, or the frame `index`), within `limits`.

    The declared size is checked first (:func:`check_pixel_limits`, and for JPEG and JPEG 2000
    the codestream's own header against Rows and Columns): nothing above the limits is decoded.

    Parameters
    ----------
    ds : Dataset
        A dataset with Pixel Data (7FE0,0010) and its file meta.
    index : int, optional
        0-based frame of a multi-frame image; all frames if None.
    limits : LimitsSettings, optional
        ``[limits]``; default :data:`DEFAULT_LIMITS`.

    Returns
    -------
    NDArray
        As pydicom returns it: YBR converted to RGB, no LUTs applied.

    Raises
    ------
    PixelLimitError
        The declared size is above a limit (a :class:`DecodeError`).
    DecodeError
        No installed plugin decodes the transfer syntax, or the data is corrupt.
    """
    if not any(keyword in ds for keyword in ("PixelData", "FloatPixelData",
                                             "DoubleFloatPixelData")):
        raise DecodeError(
            f"{ds.get('SOPInstanceUID', '?')} has no pixel data (SOP class "
            f"{UID(str(ds.get('SOPClassUID', ''))).name or '?'}): nothing to decode",
            str(_transfer_syntax(ds) or ""),
        )
    size = check_pixel_limits(ds, limits)
    _check_codestreams(ds, size, index)
    try:
        return pixel_array(ds, index=index)
    except _DECODE_ERRORS as exc:
        uid = _transfer_syntax(ds)
        name = uid.name if uid else "unknown"
        sop = ds.get("SOPInstanceUID", "?")
        raise DecodeError(
            f"cannot decode pixel data of {sop}: transfer syntax {uid or '?'} ({name}) "
            f"needs {plugin_for(ds)}; pydicom said: {_first_line(exc)}",
            str(uid),
        ) from exc


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[:3]).strip()
    return text or type(exc).__name__


# -- frames -----------------------------------------------------------------------------------
def load_frames(paths: Iterable[str | PathLike[str]], *,
                limits: LimitsSettings | None = None) -> list[Frame]:
    """Every frame of every instance of one series, decoded.

    Instances are ordered by Instance Number (0020,0013) -- those without one last, in the
    order given -- and a multi-frame instance (PS3.3 C.7.6.6) yields its frames in order.

    Parameters
    ----------
    paths : iterable of path
        The stored files of one series.
    limits : LimitsSettings, optional
        ``[limits]``, checked on every file before any is decoded; default
        :data:`DEFAULT_LIMITS`.

    Returns
    -------
    list of Frame

    Raises
    ------
    LoadError
        No files, an unreadable file, or files of more than one series.
    PixelLimitError
        A file declares more pixels or bytes than `limits` allow (nothing was decoded).
    DecodeError
        Pixel data that cannot be decoded.
    """
    return frames_of(_read_series(paths, limits), limits=limits)


def read_study(paths: Iterable[str | PathLike[str]]) -> dict[str, list[Dataset]]:
    """The headers of a study's files grouped by series, pixel data deferred (not decoded).

    A job covers every series of a study that matched its route; a model runs on each series
    it can take (PS3.3 C.7.3.1: the series is the unit of one modality, body part and view), so
    the files are grouped by Series Instance UID (0020,000E) before anything is decoded.

    Parameters
    ----------
    paths : iterable of path
        The stored files, of one or several series.

    Returns
    -------
    dict of str to list of Dataset
        Series Instance UID -> its instances by Instance Number (those without one last), the
        series in the order their first file was given.

    Raises
    ------
    LoadError
        No files, or an unreadable file.
    """
    groups: dict[str, list[Dataset]] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(Path(path), defer_size=DEFER_BYTES)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise LoadError(f"cannot read {Path(path).name}: {_first_line(exc)}") from exc
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if not groups:
        raise LoadError("no files to load")
    for datasets in groups.values():
        datasets.sort(key=_instance_key)
    return groups


def frames_of(datasets: Sequence[Dataset], *,
              limits: LimitsSettings | None = None) -> list[Frame]:
    """Every frame of the given instances (read by :func:`read_study`), decoded.

    Every instance's declared size is checked against `limits` before any is decoded; a
    multi-frame instance (PS3.3 C.7.6.6) yields its frames in order.

    Raises
    ------
    PixelLimitError
        An instance declares more pixels or bytes than `limits` allow (nothing was decoded).
    DecodeError
        Pixel data that cannot be decoded.
    """
    for ds in datasets:
        check_pixel_limits(ds, limits)
    datasets = sorted(datasets, key=_instance_key)
    frames: list[Frame] = []
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        count = _frame_count(ds)
        if count == 1 and "NumberOfFrames" not in ds:
            frames.append(Frame(decode(ds, limits=limits), ds, uid, 0))
            continue
        for i in range(count):
            frames.append(Frame(decode(ds, i, limits=limits), frame_header(ds, i), uid, i))
    return frames


def _instance_key(ds: Dataset) -> tuple[int, int]:
    number = ds.get("InstanceNumber")
    try:
        return (0, int(number)) if number not in (None, "") else (1, 0)
    except (TypeError, ValueError):
        return (1, 0)


def _frame_count(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


# -- volume -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slice:
    ds: Dataset
    frame_index: int | None  # None: a single-frame instance
    position: NDArray[np.float64]
    orientation: NDArray[np.float64]
    pixel_spacing: tuple[float, float]


def load_volume(paths: Iterable[str | PathLike[str]], *,
                limits: LimitsSettings | None = None) -> Volume:
    """One series as a 3D volume ordered along the slice normal.

    Classic images give one slice per file with Image Position (Patient), Image Orientation
    (Patient) and Pixel Spacing from the Image Plane module (PS3.3 C.7.6.2). Enhanced
    multi-frame images (PS3.3 C.7.6.16) give one slice per frame: Plane Position Sequence from
    the Per-frame Functional Groups, Plane Orientation and Pixel Measures Sequences from the
    per-frame group or else the Shared Functional Groups.

    Slices are sorted by ``dot(ImagePositionPatient, normal)`` with ``normal`` the cross
    product of the row and column direction cosines (C.7.6.2.1.1), not by Instance Number.
    The slice spacing is the median distance between neighbours; spacing that varies by more
    than 10 % and gaps over 1.5x the median (missing slices) are reported in
    :attr:`Volume.warnings`.

    Parameters
    ----------
    paths : iterable of path
        The stored files of one series, as for :func:`load_frames`.
    limits : LimitsSettings, optional
        As for :func:`load_frames`.

    Returns
    -------
    Volume

    Raises
    ------
    LoadError
        No files, an unreadable file, a mixed series (Series Instance UID, orientation, rows or
        columns differ), missing geometry, or two slices at the same position.
    PixelLimitError
        A file declares more pixels or bytes than `limits` allow (nothing was decoded).
    DecodeError
        Pixel data that cannot be decoded.
    """
    datasets = _read_series(paths, limits)
    slices = [s for ds in datasets for s in _slices_of(ds)]
    first = slices[0]
    rows, cols = int(first.ds.Rows), int(first.ds.Columns)
    for s in slices[1:]:
        if (int(s.ds.Rows), int(s.ds.Columns)) != (rows, cols):
            raise LoadError(f"mixed series: {_where(s)} is {s.ds.Rows}x{s.ds.Columns}, "
                            f"{_where(first)} is {rows}x{cols}")
        if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_TOLERANCE):
            raise LoadError(f"mixed series: orientation of {_where(s)} differs from "
                            f"{_where(first)}")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise LoadError(f"mixed series: pixel spacing of {_where(s)} differs from "
                            f"{_where(first)}")

    normal = _normal(first.orientation)
    distances = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(distances, kind="stable")
    slices = [slices[i] for i in order]
    distances = distances[order]
    gaps = np.diff(distances)
    for k, gap in enumerate(gaps):
        if gap < DUPLICATE_TOLERANCE_MM:
            raise LoadError(f"duplicate slice position {distances[k]:.3f} mm along the normal: "
                            f"{_where(slices[k])} and {_where(slices[k + 1])}")

    warnings: list[str] = []
    if len(slices) > 1:
        slice_spacing = float(np.median(gaps))
        warnings.extend(_spacing_warnings(gaps, slice_spacing))
    else:
        slice_spacing, warning = _single_slice_spacing(first.ds)
        warnings.append(warning)

    array = _decode_volume(slices, limits)
    series_uid = first.ds.get("SeriesInstanceUID", "?")
    for warning in warnings:
        LOGGER.warning("series %s: %s", series_uid, warning)
    orientation = tuple(float(v) for v in first.orientation)
    origin = tuple(float(v) for v in slices[0].position)
    return Volume(
        array=array,
        spacing=(slice_spacing, first.pixel_spacing[0], first.pixel_spacing[1]),
        origin=(origin[0], origin[1], origin[2]),
        orientation=(orientation[0], orientation[1], orientation[2],
                     orientation[3], orientation[4], orientation[5]),
        sop_instance_uids=[str(s.ds.get("SOPInstanceUID", "")) for s in slices],
        frame_indices=[s.frame_index or 0 for s in slices],
        warnings=warnings,
        datasets=[s.ds if s.frame_index is None else frame_header(s.ds, s.frame_index)
                  for s in slices],
        slice_positions=tuple(float(d - distances[0]) for d in distances),
    )


def _spacing_warnings(gaps: NDArray[np.float64], median: float) -> list[str]:
    warnings: list[str] = []
    missing = gaps > MISSING_FACTOR * median
    if missing.any():
        count = int(sum(max(round(float(g) / median) - 1, 1) for g in gaps[missing]))
        where = ", ".join(f"after slice {int(k)}" for k in np.flatnonzero(missing))
        warnings.append(f"missing slices: about {count} missing ({where}); gaps up to "
                        f"{float(gaps.max()):.3f} mm against a median spacing of {median:.3f} mm")
    uneven = ~missing & (np.abs(gaps - median) > UNEVEN_FRACTION * median)
    if uneven.any():
        present = gaps[~missing]
        warnings.append(f"uneven slice spacing: {float(present.min()):.3f} to "
                        f"{float(present.max()):.3f} mm against a median of {median:.3f} mm "
                        f"(more than {UNEVEN_FRACTION:.0%} apart)")
    return warnings


def _single_slice_spacing(ds: Dataset) -> tuple[float, str]:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        if value not in (None, "") and float(value) > 0:
            return float(value), f"single slice: slice spacing taken from {keyword}"
    return 1.0, "single slice: no SpacingBetweenSlices or SliceThickness, slice spacing set to 1"


def _decode_slice(s: _Slice, limits: LimitsSettings | None) -> NDArray[Any]:
    return decode(s.ds, s.frame_index, limits=limits)


def _decode_volume(slices: Sequence[_Slice], limits: LimitsSettings | None) -> NDArray[Any]:
    """Every slice decoded into one preallocated ``(slices, rows, columns)`` array.

    The first slice is decoded by :func:`decode` and fixes the dtype; a native little-endian
    single-frame slice of that dtype is then read straight from its file into its row of the
    array (:func:`_read_native_into`), the others decoded and copied in. No per-slice array
    is kept and no second volume-sized copy is made (``np.stack`` of a list made both: 300
    freshly allocated slices, then the stack).
    """
    first = _decode_slice(slices[0], limits)
    if first.ndim != 2:
        raise LoadError(f"a volume needs one sample per pixel; got frames of shape "
                        f"{first.shape}")
    array = np.empty((len(slices), *first.shape), dtype=first.dtype)
    array[0] = first
    del first
    for k, s in enumerate(slices[1:], start=1):
        if _read_native_into(s, array[k]):
            continue
        plane = _decode_slice(s, limits)
        if plane.shape != array.shape[1:]:
            raise LoadError(f"a volume needs one sample per pixel; got frames of shape "
                            f"{plane.shape}")
        if not np.can_cast(plane.dtype, array.dtype, casting="safe"):
            # Mixed Pixel Representation within a series: widen once, as np.stack did.
            array = array.astype(np.result_type(array.dtype, plane.dtype))
        array[k] = plane
    return array


#: Transfer syntaxes whose pixel data is the bare little-endian values (PS3.5 A.1, A.2).
_NATIVE_LE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})


def _read_native_into(s: _Slice, dest: NDArray[Any]) -> bool:
    """Read the pixel values of a native single-frame slice straight into ``dest``.

    Only for uncompressed little-endian data whose Pixel Data was deferred when the header was
    read (its value still in the file): the bytes go from the file into ``dest`` with one
    ``readinto`` and the bits above Bits Stored are corrected in place, as pydicom's decoder
    does (PS3.5 8.1.1: masked for unsigned, sign-extended for signed data). Anything else
    (compressed, multi-frame, colour, already read, an unexpected size or dtype) returns
    False for :func:`decode` to handle.
    """
    ds = s.ds
    if s.frame_index is not None or _transfer_syntax(ds) not in _NATIVE_LE:
        return False
    # The element as read, without loading a deferred value (get_item would read it).
    raw = ds._dict.get(Tag(0x7FE00010))
    if not isinstance(raw, RawDataElement) or raw.value is not None or not raw.value_tell:
        return False
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or _frame_count(ds) != 1:
        return False
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if allocated not in (8, 16, 32) or dest.dtype != np.dtype(f"{'i' if signed else 'u'}"
                                                            f"{allocated // 8}"):
        return False
    nbytes = dest.size * dest.itemsize
    filename = getattr(ds, "filename", None)
    if not isinstance(filename, str | Path) or raw.length < nbytes or raw.length == 0xFFFFFFFF:
        return False
    view = dest.reshape(-1).view(np.uint8).data  # dest is a C-contiguous row
    try:
        with open(filename, "rb") as fh:
            fh.seek(raw.value_tell)
            if fh.readinto(view) != nbytes:
                return False
    except OSError:
        return False
    if not np.little_endian:
        dest.byteswap(inplace=True)
    bits = int(ds.get("BitsStored", allocated) or allocated)
    if bits < allocated:
        if signed:
            shift = allocated - bits
            np.left_shift(dest, shift, out=dest)
            np.right_shift(dest, shift, out=dest)
        else:
            np.bitwise_and(dest, np.array((1 << bits) - 1, dtype=dest.dtype), out=dest)
    return True


def _slices_of(ds: Dataset) -> list[_Slice]:
    """The slices of one instance with their geometry (PS3.3 C.7.6.2 / C.7.6.16)."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_slices(ds)
    if _frame_count(ds) > 1:
        raise LoadError(f"{_where_ds(ds)} is multi-frame without functional groups: "
                        "no per-frame geometry for a volume")
    return [_Slice(
        ds, None,
        _vector(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", ds),
        _vector(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", ds),
        _pixel_spacing(ds.get("PixelSpacing"), ds),
    )]


def _enhanced_slices(ds: Dataset) -> list[_Slice]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else Dataset()
    per_frame = ds.PerFrameFunctionalGroupsSequence
    count = _frame_count(ds)
    if len(per_frame) != count:
        raise LoadError(f"{_where_ds(ds)}: {len(per_frame)} per-frame functional groups for "
                        f"{count} frames")
    slices = []
    for i, group in enumerate(per_frame):
        position = _macro(group, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _macro(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _macro(group, shared, "PixelMeasuresSequence", "PixelSpacing")
        where = f"frame {i} of {_where_ds(ds)}"
        slices.append(_Slice(
            ds, i,
            _vector(position, 3, "ImagePositionPatient", ds, where),
            _vector(orientation, 6, "ImageOrientationPatient", ds, where),
            _pixel_spacing(spacing, ds, where),
        ))
    return slices


#: Functional group macros that carry a frame's grey pipeline (PS3.3 C.7.6.16.2.9, .10) and the
#: top-level attributes preprocessing reads from them.
_FRAME_PIXEL_MACROS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
    ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
)


def frame_header(ds: Dataset, index: int) -> Dataset:
    """The header preprocessing should read for frame ``index`` of a multi-frame object.

    Enhanced CT/MR/XA objects keep *Rescale Slope/Intercept* (Pixel Value Transformation macro,
    PS3.3 C.7.6.16.2.9) and *Window Center/Width* (Frame VOI LUT macro, C.7.6.16.2.10) in the
    per-frame or shared functional groups, not at top level, and may vary them per frame. This
    returns a shallow copy of ``ds`` with frame ``index``'s values (per-frame group first, then
    shared) set at top level, so the modality and VOI steps apply the right ones; a dataset
    without these macros comes back as it is.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A multi-frame dataset.
    index : int
        0-based frame index.

    Returns
    -------
    pydicom.dataset.Dataset
        ``ds`` itself, or a shallow copy with the frame's values.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    if not per_frame and not shared_seq:
        return ds
    group = per_frame[index] if per_frame and index < len(per_frame) else Dataset()
    shared = shared_seq[0] if shared_seq else Dataset()
    values: dict[str, Any] = {}
    for sequence, keywords in _FRAME_PIXEL_MACROS:
        for keyword in keywords:
            value = _macro(group, shared, sequence, keyword)
            if value is not None:
                values[keyword] = value
    if not values:
        return ds
    # A new top-level element dict (Dataset.copy() would share it), the elements themselves
    # shared; the frame's values get new elements, so ``ds`` never changes.
    header = Dataset()
    for tag in list(ds.keys()):
        header[tag] = ds.get_item(tag)
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    for keyword, value in values.items():
        if keyword in header:
            del header[keyword]
        setattr(header, keyword, value)
    return header


def _macro(group: Dataset, shared: Dataset, sequence: str, keyword: str) -> Any:
    """`keyword` of the functional group macro `sequence`: per-frame first, then shared."""
    for source in (group, shared):
        items = source.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def _vector(value: Any, size: int, keyword: str, ds: Dataset,
            where: str | None = None) -> NDArray[np.float64]:
    try:
        vector = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        vector = np.array([], dtype=np.float64)
    if vector.shape != (size,) or not np.isfinite(vector).all():
        raise LoadError(f"missing geometry for a volume: {keyword} of {where or _where_ds(ds)} "
                        f"is {value!r}")
    if size == 6:
        norms = np.linalg.norm(vector.reshape(2, 3), axis=1)
        if (norms < 1e-6).any():
            raise LoadError(f"{keyword} of {where or _where_ds(ds)} has a zero direction")
        vector = (vector.reshape(2, 3) / norms[:, None]).reshape(6)
    return vector


def _pixel_spacing(value: Any, ds: Dataset, where: str | None = None) -> tuple[float, float]:
    vector = _vector(value, 2, "PixelSpacing", ds, where)
    if (vector <= 0).any():
        raise LoadError(f"PixelSpacing of {where or _where_ds(ds)} is not positive: {value!r}")
    return float(vector[0]), float(vector[1])


def _normal(orientation: Sequence[float] | NDArray[np.float64]) -> NDArray[np.float64]:
    cosines = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise LoadError(f"row and column directions are parallel: {list(cosines)}")
    return np.asarray(normal / length, dtype=np.float64)


def _where(s: _Slice) -> str:
    if s.frame_index is None:
        return _where_ds(s.ds)
    return f"frame {s.frame_index} of {_where_ds(s.ds)}"


def _where_ds(ds: Dataset) -> str:
    return f"instance {ds.get('SOPInstanceUID', '?')}"


# -- reading ----------------------------------------------------------------------------------
def _read_series(paths: Iterable[str | PathLike[str]],
                 limits: LimitsSettings | None) -> list[Dataset]:
    """Read every file (pixel data deferred), check its declared size against `limits` and
    that they belong to one series."""
    datasets: list[Dataset] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(Path(path), defer_size=DEFER_BYTES)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise LoadError(f"cannot read {Path(path).name}: {_first_line(exc)}") from exc
        check_pixel_limits(ds, limits)
        datasets.append(ds)
    if not datasets:
        raise LoadError("no files to load")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise LoadError(f"mixed series: {len(datasets)} files from {len(series)} series "
                        f"({', '.join(sorted(series))})")
    return datasets
