"""From decoded DICOM pixels to a normalised model input: pure, typed ndarray functions.

Every function takes an array (and, where the DICOM header matters, the dataset it came from)
and returns a new array; none does I/O or changes its inputs. :func:`preprocess_frame` chains them
in the order of the DICOM grayscale pipeline (PS3.4 N.2, PS3.3 C.11):

1. refuse what a model cannot take (:class:`PreprocessingError` says why),
2. :func:`mask_bits_stored` (PS3.3 C.7.6.3.1),
3. :func:`apply_modality_lut` (PS3.3 C.11.1),
4. :func:`apply_voi` for grey images (PS3.3 C.11.2), giving values in 0..1,
5. MONOCHROME1 inversion (PS3.3 C.7.6.3.1.2) after the VOI, so the window applies to stored values,
6. :func:`to_rgb` for colour images (PS3.3 C.7.6.3.1.2, C.7.6.3.1.5), scaled to 0..1,
7. :func:`resize`, :func:`replicate_channels`, :func:`normalize`.

The result is ``float32`` of shape ``(H, W, channels)``, bit-identical for the same input.

Steps 2-7 up to the resize are :func:`unit_image`. A frame of more than
:data:`STRIP_ABOVE_PIXELS` pixels goes through them in strips of rows, each strip's share of the
resize accumulated as it goes, so memory stays bounded by a strip and the output (an 8192 x 8192
frame would otherwise take several full-size float copies); smaller frames are done whole.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, convert_color_space
from pydicom.pixels.processing import apply_modality_lut as _pydicom_modality_lut
from pydicom.pixels.processing import apply_voi_lut as _pydicom_voi_lut
from scipy import sparse

from dicom_ai.exceptions import DicomAIError
from dicom_ai.values import NormalizationMode, PreprocessingSpec

__all__ = [
    "PreprocessingError",
    "apply_modality_lut",
    "apply_voi",
    "fit_shape",
    "grey_to_unit",
    "invert_monochrome1",
    "linear_window_of",
    "luminance",
    "mask_bits_stored",
    "normalize",
    "preprocess_frame",
    "replicate_channels",
    "resample_volume",
    "resize",
    "to_rgb",
    "unit_image",
]

FloatArray = NDArray[np.floating[Any]]
#: ImageNet per-channel statistics of 0..1 RGB images.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

GREY_INTERPRETATIONS = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: Colour interpretations whose decoded array is RGB already (pydicom converts YBR_FULL and
#: YBR_FULL_422 by default; JPEG 2000 decoders undo the YBR_ICT/YBR_RCT component transform).
COLOUR_INTERPRETATIONS = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}
)
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Frames with more pixels than this are taken in strips of rows by :func:`unit_image` (bounded
#: memory); smaller ones whole, exactly as before strips existed.
STRIP_ABOVE_PIXELS = 4096 * 4096
#: Pixels (rows x columns) per strip: 16 MB of ``float32`` per sample.
STRIP_PIXELS = 1 << 22


class PreprocessingError(DicomAIError):
    """An image a model cannot take; the message says why (never holds patient data)."""


# -- DICOM pixel transforms -----------------------------------------------------------------------
def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def mask_bits_stored(arr: NDArray[Any], ds: Dataset) -> NDArray[Any]:
    """Keep only the *Bits Stored* bits of each value, sign-extending signed data.

    Implements PS3.3 C.7.6.3.1 (*Bits Allocated*, *Bits Stored*, *High Bit*, *Pixel
    Representation*): bits above *Bits Stored* are not part of the pixel value and may hold
    anything (e.g. overlays). For *Pixel Representation* 1 the value is two's complement in
    *Bits Stored* bits.

    Parameters
    ----------
    arr : numpy.ndarray
        Decoded integer pixel values.
    ds : pydicom.dataset.Dataset
        The dataset the array came from.

    Returns
    -------
    numpy.ndarray
        A new array of the same dtype (the signed integer of the same width for signed data
        decoded into an unsigned dtype); floating point arrays, or datasets without *Bits
        Stored*, come back as an unchanged copy.
    """
    bits = ds.get("BitsStored")
    if bits is None or not np.issubdtype(arr.dtype, np.integer):
        return arr.copy()
    bits = int(bits)
    width = arr.dtype.itemsize * 8
    if bits >= width:
        return arr.copy()
    if int(ds.get("PixelRepresentation", 0)) == 1 and np.issubdtype(arr.dtype, np.signedinteger):
        # Shift the sign bit of Bits Stored to the top, then shift back arithmetically: this
        # drops the high bits and sign-extends in the array's own dtype (no int64 copy).
        shift = width - bits
        shifted: NDArray[Any] = np.right_shift(np.left_shift(arr, shift), shift)
        return shifted
    values: NDArray[Any] = np.bitwise_and(arr, np.array((1 << bits) - 1, dtype=arr.dtype))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        # Signed data decoded into an unsigned dtype: two's complement in Bits Stored bits.
        signed: NDArray[Any] = values.astype(np.int64)
        signed[signed >= (1 << (bits - 1))] -= 1 << bits
        return signed.astype(np.dtype(f"int{width}"))
    return values


def apply_modality_lut(arr: NDArray[Any], ds: Dataset) -> NDArray[np.float64]:
    """Map stored values to modality values (e.g. Hounsfield units).

    Implements PS3.3 C.11.1 (Modality LUT module): the *Modality LUT Sequence* if present, else
    *Rescale Slope* and *Rescale Intercept*; delegates to :func:`pydicom.pixels.apply_modality_lut`.

    Parameters
    ----------
    arr : numpy.ndarray
        Stored pixel values.
    ds : pydicom.dataset.Dataset
        The dataset the array came from.

    Returns
    -------
    numpy.ndarray
        ``float64`` modality values (stored values unchanged when neither is present).
    """
    out = _pydicom_modality_lut(arr, ds)
    return np.array(out, dtype=np.float64, copy=True)


def _linear_window(arr: NDArray[Any], center: float, width: float) -> NDArray[np.float64]:
    """The LINEAR VOI function of PS3.3 C.11.2.1.2.1 with output range 0..1."""
    x = np.asarray(arr, dtype=np.float64)
    lower = center - 0.5 - (width - 1.0) / 2.0
    upper = center - 0.5 + (width - 1.0) / 2.0
    denominator = max(width - 1.0, 1e-12)
    inside = (x - (center - 0.5)) / denominator + 0.5
    out = np.where(x <= lower, 0.0, np.where(x > upper, 1.0, inside))
    return np.clip(out, 0.0, 1.0)


def _dataset_voi_range(ds: Dataset) -> tuple[float, float]:
    """The output range pydicom gives a dataset window (mirrors ``apply_windowing``)."""
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        half = 2 ** (int(ds.BitsStored) - 1)
        y_min, y_max = float(-half), float(half - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    return y_min, y_max


def apply_voi(
    arr: NDArray[Any], ds: Dataset, *, window: tuple[float, float] | None = None
) -> NDArray[np.float64]:
    """Apply a VOI transform to modality values, giving values in 0..1.

    Implements PS3.3 C.11.2 (VOI LUT module). With an explicit ``window`` (center, width) the
    LINEAR function of PS3.3 C.11.2.1.2.1 is computed here. Otherwise the dataset's *VOI LUT
    Sequence*, else its first *Window Center*/*Window Width* (with *VOI LUT Function*), is
    applied by :func:`pydicom.pixels.apply_voi_lut` and rescaled from its output range to 0..1.
    A dataset that defines neither is scaled by the array's own minimum and maximum.

    Parameters
    ----------
    arr : numpy.ndarray
        Modality values (the output of :func:`apply_modality_lut`).
    ds : pydicom.dataset.Dataset
        The dataset the array came from.
    window : tuple of float, optional
        ``(center, width)`` in modality units; overrides the dataset; width must be >= 1.

    Returns
    -------
    numpy.ndarray
        ``float64`` values in 0..1.

    Raises
    ------
    PreprocessingError
        If the explicit window width is below 1.
    """
    if window is not None:
        center, width = float(window[0]), float(window[1])
        if width < 1.0:
            raise PreprocessingError(f"window width {width} is below 1 (PS3.3 C.11.2.1.2)")
        return _linear_window(arr, center, width)
    if ds.get("VOILUTSequence"):
        values = np.asarray(arr)
        if not np.issubdtype(values.dtype, np.integer):
            values = np.rint(values).astype(np.int64)
        out = np.asarray(_pydicom_voi_lut(values, ds), dtype=np.float64)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(out / float(2**bits - 1), 0.0, 1.0)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        out = np.asarray(
            _pydicom_voi_lut(np.asarray(arr, dtype=np.float64), ds.copy(), prefer_lut=False),
            dtype=np.float64,
        )
        y_min, y_max = _dataset_voi_range(ds)
        if y_max == y_min:
            return np.zeros_like(out)
        return np.clip((out - y_min) / (y_max - y_min), 0.0, 1.0)
    return normalize(np.asarray(arr, dtype=np.float64), "minmax").astype(np.float64)


def invert_monochrome1(
    arr: NDArray[Any], ds: Dataset, *, value_range: tuple[float, float] | None = None
) -> NDArray[Any]:
    """Turn MONOCHROME1 (minimum is white) into MONOCHROME2 (minimum is black).

    Implements the MONOCHROME1 definition of PS3.3 C.7.6.3.1.2 by flipping values about the
    range: ``lo + hi - x``. Arrays of any other *Photometric Interpretation* come back unchanged
    (as a copy).

    Parameters
    ----------
    arr : numpy.ndarray
        Grey values.
    ds : pydicom.dataset.Dataset
        The dataset the array came from.
    value_range : tuple of float, optional
        ``(lo, hi)`` to flip about, e.g. ``(0, 1)`` after :func:`apply_voi`; by default the
        array's own minimum and maximum.

    Returns
    -------
    numpy.ndarray
        The flipped array (``float64`` when ``value_range`` is given, else the input dtype).
    """
    if _photometric(ds) != "MONOCHROME1":
        return arr.copy()
    if value_range is not None:
        lo, hi = float(value_range[0]), float(value_range[1])
        return (lo + hi) - np.asarray(arr, dtype=np.float64)
    if arr.size == 0:
        return arr.copy()
    lo_v, hi_v = arr.min(), arr.max()
    if np.issubdtype(arr.dtype, np.integer):
        flipped = (int(lo_v) + int(hi_v)) - arr.astype(np.int64)
        return flipped.astype(arr.dtype)
    return np.asarray((lo_v + hi_v) - arr, dtype=arr.dtype)


def to_rgb(arr: NDArray[Any], ds: Dataset, *, is_ybr: bool = False) -> NDArray[Any]:
    """Give a colour image as RGB.

    Implements PS3.3 C.7.6.3.1.2 (*Photometric Interpretation*) and C.7.6.3.1.5 (palette colour
    lookup tables): PALETTE COLOR goes through :func:`pydicom.pixels.apply_color_lut`; YBR_FULL and
    YBR_FULL_422 through :func:`pydicom.pixels.convert_color_space` when ``is_ybr`` says the array
    is still YBR (``ds.pixel_array`` converts to RGB by default); RGB passes through.

    Parameters
    ----------
    arr : numpy.ndarray
        Decoded pixels: indices for PALETTE COLOR, else ``(H, W, 3)``.
    ds : pydicom.dataset.Dataset
        The dataset the array came from.
    is_ybr : bool
        The array was decoded without colour conversion (``as_rgb=False``).

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` RGB in the integer dtype of the input or of the palette.

    Raises
    ------
    PreprocessingError
        If the photometric interpretation is not a colour one this function handles.
    """
    photometric = _photometric(ds)
    if photometric == "PALETTE COLOR":
        return np.asarray(apply_color_lut(arr, ds))
    if photometric in {"YBR_FULL", "YBR_FULL_422"}:
        if is_ybr:
            return np.asarray(convert_color_space(arr, "YBR_FULL", "RGB"))
        return arr.copy()
    if photometric in {"RGB", "YBR_ICT", "YBR_RCT"}:
        return arr.copy()
    raise PreprocessingError(f"photometric interpretation {photometric!r} is not a colour one")


def _colour_bits(rgb: NDArray[Any], ds: Dataset) -> int:
    if _photometric(ds) == "PALETTE COLOR":
        return 8 if rgb.dtype == np.uint8 else 16
    return int(ds.get("BitsStored", rgb.dtype.itemsize * 8))


# -- geometry -------------------------------------------------------------------------------------
def _triangle(x: NDArray[Any]) -> NDArray[np.float64]:
    return np.maximum(0.0, 1.0 - np.abs(np.asarray(x, dtype=np.float64)))


@lru_cache(maxsize=64)
def _axis_weights(n_in: int, n_out: int) -> sparse.csr_matrix:
    """The ``(n_out, n_in)`` resampling matrix of one axis, rows summing to 1.

    Pixel centres at ``i + 0.5``; a triangle (bilinear) kernel whose support grows with the
    reduction factor, so a downscale averages every input pixel it covers (anti-aliasing);
    taps outside the image are dropped and the rest renormalised. This is the convolution
    Pillow's ``Image.resize(BILINEAR)`` computes (the tests pin it against Pillow).
    """
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    support = filter_scale  # the triangle's support is 1 input pixel at scale 1
    rows: list[NDArray[np.int64]] = []
    cols: list[NDArray[np.int64]] = []
    vals: list[NDArray[np.float64]] = []
    for j in range(n_out):
        center = (j + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.arange(lo, hi, dtype=np.int64)
        weights = _triangle((taps - center + 0.5) / filter_scale)
        total = weights.sum()
        if total <= 0.0:  # cannot happen for n_out >= 1, kept as a guard against 0/0
            taps, weights, total = np.array([min(int(center), n_in - 1)]), np.ones(1), 1.0
        rows.append(np.full(taps.size, j, dtype=np.int64))
        cols.append(taps)
        vals.append(weights / total)
    matrix = sparse.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_out, n_in),
    )
    return matrix


#: Output samples per dense block of :func:`_last_axis_blocks`.
_BLOCK = 32


@lru_cache(maxsize=64)
def _last_axis_blocks(
    n_in: int, n_out: int, dtype: np.dtype[Any]
) -> tuple[tuple[int, int, int, int, NDArray[Any]], ...]:
    """:func:`_axis_weights` cut into dense ``(in, out)`` blocks along its band.

    Each block covers ``_BLOCK`` output samples and the input samples they read: ``(out_lo,
    out_hi, in_lo, in_hi, weights)`` with ``weights`` of shape ``(in_hi - in_lo, out_hi -
    out_lo)``, so a row-major array is resampled along its last axis by a few small matrix
    products on column slices, with no transposed copy (which costs more than the arithmetic).
    """
    weights = _axis_weights(n_in, n_out)
    blocks = []
    for lo in range(0, n_out, _BLOCK):
        hi = min(lo + _BLOCK, n_out)
        rows = weights[lo:hi]
        in_lo, in_hi = int(rows.indices.min()), int(rows.indices.max()) + 1
        dense = np.ascontiguousarray(rows[:, in_lo:in_hi].toarray().T, dtype=dtype)
        blocks.append((lo, hi, in_lo, in_hi, dense))
    return tuple(blocks)


def _resample_last_axis(arr: NDArray[Any], n_out: int) -> NDArray[Any]:
    """Resample the last axis of a C-contiguous float array (see :func:`_last_axis_blocks`)."""
    flat = arr.reshape(-1, arr.shape[-1])
    out = np.empty((flat.shape[0], n_out), dtype=arr.dtype)
    for lo, hi, in_lo, in_hi, dense in _last_axis_blocks(arr.shape[-1], n_out, arr.dtype):
        np.matmul(flat[:, in_lo:in_hi], dense, out=out[:, lo:hi])
    return out.reshape(*arr.shape[:-1], n_out)


def _resample_axis(arr: NDArray[Any], axis: int, n_out: int) -> NDArray[Any]:
    """Resample one axis of a float array to ``n_out`` samples (see :func:`_axis_weights`)."""
    n_in = arr.shape[axis]
    if n_in == n_out:
        return arr
    if axis == arr.ndim - 1 and arr.flags.c_contiguous:
        return _resample_last_axis(arr, n_out)
    moved = np.moveaxis(arr, axis, 0)
    flat = np.ascontiguousarray(moved).reshape(n_in, -1)
    out = np.asarray(_axis_weights(n_in, n_out) @ flat, dtype=arr.dtype)
    return np.moveaxis(out.reshape(n_out, *moved.shape[1:]), 0, axis)


def _as_float(arr: NDArray[Any]) -> NDArray[np.floating[Any]]:
    """``float32`` and ``float64`` arrays as they are, anything else as ``float64``."""
    if arr.dtype in (np.float32, np.float64):
        return arr
    return np.asarray(arr, dtype=np.float64)


def _resample(arr: NDArray[Any], shape: tuple[int, ...]) -> NDArray[np.floating[Any]]:
    """Resample the leading ``len(shape)`` axes of ``arr``, one separable pass per axis."""
    out = _as_float(arr)
    for axis, n_out in enumerate(shape):
        out = _resample_axis(out, axis, n_out)
    return np.ascontiguousarray(out) if out is not arr else out.copy()


def resize(
    arr: NDArray[Any],
    shape: tuple[int, int],
    *,
    keep_aspect: bool = False,
    pad_value: float = 0.0,
) -> NDArray[np.floating[Any]]:
    """Resize the first two axes of an image with anti-aliased bilinear interpolation.

    Separable: each axis is convolved with a triangle kernel whose support widens by the
    reduction factor when shrinking (every input pixel contributes, so there is no aliasing) and
    is the plain bilinear kernel when enlarging; pixel centres are aligned, taps beyond the edge
    are dropped and the weights renormalised. The same arithmetic as Pillow's
    ``Image.resize(..., BILINEAR)``, done as sparse matrix products. With ``keep_aspect`` the
    image is scaled to fit inside ``shape`` and padded, centred, with ``pad_value`` (the extra
    row or column of an odd margin goes to the bottom or right).

    Parameters
    ----------
    arr : numpy.ndarray
        ``(H, W)`` or ``(H, W, C)``.
    shape : tuple of int
        The output ``(height, width)``.
    keep_aspect : bool
        Keep the aspect ratio, padding the rest.
    pad_value : float
        The value of the padding.

    Returns
    -------
    numpy.ndarray
        Shape ``shape + arr.shape[2:]``; ``float32`` for ``float32`` input, else ``float64``.
    """
    src = _as_float(arr)
    height, width = int(shape[0]), int(shape[1])
    if not keep_aspect:
        return _resample(src, (height, width))
    scaled = _resample(src, _aspect_shape((src.shape[0], src.shape[1]), (height, width)))
    return _pad(scaled, (height, width), pad_value)


def _aspect_shape(in_shape: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The largest shape of `in_shape`'s aspect inside `box` (what ``keep_aspect`` resizes to)."""
    height, width = box
    scale = min(height / in_shape[0], width / in_shape[1])
    return (min(height, max(1, round(in_shape[0] * scale))),
            min(width, max(1, round(in_shape[1] * scale))))


def _pad(scaled: NDArray[Any], shape: tuple[int, int], pad_value: float) -> NDArray[Any]:
    """`scaled` centred on a `shape` canvas of `pad_value` (an odd margin's extra at the end)."""
    height, width = shape
    new_h, new_w = int(scaled.shape[0]), int(scaled.shape[1])
    out = np.full((height, width, *scaled.shape[2:]), pad_value, dtype=scaled.dtype)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = scaled
    return out


def fit_shape(shape: tuple[int, int], longest: int) -> tuple[int, int]:
    """`shape` scaled down, aspect kept, so its longer side is at most `longest` (never up).

    Parameters
    ----------
    shape : tuple of int
        ``(rows, columns)``.
    longest : int
        The most pixels on the longer side.

    Returns
    -------
    tuple of int
        ``shape`` itself when it fits, else ``(rows, columns)`` rounded, each at least 1.
    """
    rows, columns = int(shape[0]), int(shape[1])
    if max(rows, columns) <= longest:
        return rows, columns
    scale = longest / max(rows, columns)
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def resample_volume(
    vol: NDArray[Any],
    spacing: tuple[float, float, float],
    target_spacing: tuple[float, float, float],
) -> NDArray[np.floating[Any]]:
    """Resample a volume to a new voxel spacing.

    The new shape along each axis is ``round(n * spacing / target_spacing)`` (at least 1); each
    axis is resampled with the anti-aliased triangle kernel of :func:`resize`. Spacing is in the
    axis order of ``vol``, e.g. (slice spacing from *Image Position (Patient)*, then *Pixel
    Spacing* row and column, PS3.3 C.7.6.2).

    Parameters
    ----------
    vol : numpy.ndarray
        A 3D array.
    spacing : tuple of float
        The current spacing per axis (mm).
    target_spacing : tuple of float
        The wanted spacing per axis (mm).

    Returns
    -------
    numpy.ndarray
        The volume of the new shape; ``float32`` for ``float32`` input, else ``float64``.

    Raises
    ------
    PreprocessingError
        If the volume is not 3D or a spacing is not positive.
    """
    if vol.ndim != 3:
        raise PreprocessingError(f"a volume must be 3D, not {vol.ndim}D")
    if len(spacing) != 3 or len(target_spacing) != 3:
        raise PreprocessingError("spacing and target spacing need 3 values each")
    if any(s <= 0 for s in (*spacing, *target_spacing)):
        raise PreprocessingError("spacings must be positive")
    new_shape = tuple(
        max(1, round(n * s / t)) for n, s, t in zip(vol.shape, spacing, target_spacing, strict=True)
    )
    return _resample(vol, new_shape)


def replicate_channels(arr: NDArray[Any], channels: int = 3) -> NDArray[Any]:
    """Give a grey image ``channels`` identical channels on a last axis.

    Parameters
    ----------
    arr : numpy.ndarray
        ``(H, W)``, ``(H, W, 1)`` or already ``(H, W, channels)``.
    channels : int
        How many channels the output has.

    Returns
    -------
    numpy.ndarray
        ``(H, W, channels)``, same dtype.

    Raises
    ------
    PreprocessingError
        If the array has another number of channels.
    """
    if arr.ndim == 2:
        arr = arr[..., np.newaxis]
    if arr.ndim != 3:
        raise PreprocessingError(f"an image must be 2D or 3D, not {arr.ndim}D")
    if arr.shape[2] == channels:
        return arr.copy()
    if arr.shape[2] == 1:
        return np.concatenate([arr] * channels, axis=2)
    raise PreprocessingError(f"cannot make {channels} channels from {arr.shape[2]}")


def normalize(arr: NDArray[Any], mode: NormalizationMode) -> NDArray[np.floating[Any]]:
    """Normalise intensities for a model.

    Parameters
    ----------
    arr : numpy.ndarray
        The image.
    mode : {'minmax', 'zscore', 'imagenet', 'none'}
        ``minmax`` scales to 0..1 (a constant image gives zeros); ``zscore`` subtracts the mean and
        divides by the standard deviation (a constant image gives zeros); ``imagenet`` expects a
        0..1 RGB ``(..., 3)`` image and applies ImageNet's per-channel mean and std; ``none``
        returns the values as they are (as floats): a fixed window already mapped them.

    Returns
    -------
    numpy.ndarray
        ``float32`` for ``float32`` input, else ``float64``.

    Raises
    ------
    PreprocessingError
        If ``imagenet`` is asked of an image without 3 channels, or the mode is unknown.
    """
    x = _as_float(arr)
    if mode == "none":  # a new array, as the other modes give: callers may work in place
        return x.copy() if x is arr else x
    if mode == "minmax":
        if x.size == 0:
            return x.copy()
        lo, hi = float(x.min()), float(x.max())
        if hi == lo:
            return np.zeros_like(x)
        scaled: NDArray[np.floating[Any]] = (x - x.dtype.type(lo)) * x.dtype.type(1.0 / (hi - lo))
        return scaled
    if mode == "zscore":
        if x.size == 0:
            return x.copy()
        mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
        if std == 0.0:
            return np.zeros_like(x)
        standard: NDArray[np.floating[Any]] = (x - x.dtype.type(mean)) * x.dtype.type(1.0 / std)
        return standard
    if mode == "imagenet":
        if x.ndim < 1 or x.shape[-1] != 3:
            raise PreprocessingError("imagenet normalisation needs an RGB image (..., 3)")
        mean_rgb = np.asarray(IMAGENET_MEAN, dtype=x.dtype)
        std_rgb = np.asarray(IMAGENET_STD, dtype=x.dtype)
        out: NDArray[np.floating[Any]] = (x - mean_rgb) / std_rgb
        return out
    raise PreprocessingError(f"unknown normalisation mode {mode!r}")


#: ITU-R BT.709 luma weights, as :func:`skimage.color.rgb2gray` uses.
LUMA_WEIGHTS: tuple[float, float, float] = (0.2125, 0.7154, 0.0721)


def luminance(rgb: NDArray[Any]) -> NDArray[np.floating[Any]]:
    """Grey values of an RGB image (ITU-R BT.709 luma, the weights of skimage's ``rgb2gray``).

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(..., 3)``.

    Returns
    -------
    numpy.ndarray
        ``(...)``; ``float32`` for ``float32`` input, else ``float64``.

    Raises
    ------
    PreprocessingError
        If the last axis does not have 3 channels.
    """
    x = _as_float(rgb)
    if x.ndim < 1 or x.shape[-1] != 3:
        raise PreprocessingError("luminance needs an RGB image (..., 3)")
    out: NDArray[np.floating[Any]] = x @ np.asarray(LUMA_WEIGHTS, dtype=x.dtype)
    return out


# -- the chain (its spec is dicom_ai.values.PreprocessingSpec) ----------------------------------
def _check_input(arr: NDArray[Any], ds: Dataset, spec: PreprocessingSpec) -> str:
    """Refuse what a model cannot take; return the photometric interpretation."""
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise PreprocessingError("the dataset has no pixel data (7FE0,0010)")
    photometric = _photometric(ds)
    if photometric not in GREY_INTERPRETATIONS | COLOUR_INTERPRETATIONS:
        raise PreprocessingError(
            f"unsupported photometric interpretation {photometric or '(none)'!r}"
        )
    if photometric in GREY_INTERPRETATIONS or photometric == "PALETTE COLOR":
        if arr.ndim != 2:
            raise PreprocessingError(
                f"a {photometric} frame must be 2D (rows, columns), not shape {arr.shape}"
            )
    elif arr.ndim != 3 or arr.shape[2] != 3:
        raise PreprocessingError(
            f"a {photometric} frame must be (rows, columns, 3), not shape {arr.shape}"
        )
    rows, columns = int(arr.shape[0]), int(arr.shape[1])
    if min(rows, columns) < spec.min_input_size:
        raise PreprocessingError(
            f"image too small: {rows}x{columns} pixels, the model needs at least "
            f"{spec.min_input_size} in each direction"
        )
    return photometric


def linear_window_of(
    ds: Dataset | None, window: tuple[float, float] | None = None, *, volume: bool = False
) -> tuple[float, float] | None:
    """The ``(center, width)`` of the LINEAR VOI to apply to modality values, or ``None``.

    One rule for the 2D path (:func:`grey_to_unit`) and volume models
    (:mod:`dicom_ai.inference.volumes`, ``dicom-ai preview``), PS3.3 C.11.2:

    * an explicit `window` (a model spec's) wins, returned as given (the caller checks its
      width: :func:`grey_to_unit` refuses one below 1, a spec's ``Window`` cannot hold one);
    * else the dataset's first Window Center / Window Width (VM 1-n: the first pair applies, as
      in pydicom), when its VOI LUT Function (0028,1056) is ``LINEAR`` or absent. ``SIGMOID``
      and ``LINEAR_EXACT`` give ``None``: they are not the function a model was trained with;
    * a dataset width below 1 (not a valid window, C.11.2.1.2) or an unreadable value gives
      ``None``;
    * a VOI LUT Sequence (0028,3010): in 2D it is what :func:`apply_voi` applies, so ``None``
      (no linear shortcut). A volume model windows in ``float32`` modality values and has no
      LUT path: with `volume` the sequence is ignored and the LINEAR window is used when the
      dataset also has one, else ``None`` (the volume keeps its modality values, HU for CT).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or None
        The dataset (for a volume its first slice's header, per frame for an enhanced object);
        None when there is none.
    window : tuple of float, optional
        The model spec's ``(center, width)``.
    volume : bool
        The volume path's rules for a VOI LUT Sequence (see above).

    Returns
    -------
    tuple of float or None
        ``(center, width)``, or None for no linear window.
    """
    if window is not None:
        return (float(window[0]), float(window[1]))
    if ds is None:
        return None
    if ds.get("VOILUTSequence") and not volume:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or function != "LINEAR":
        return None
    # Several windows may be given (VM 1-n); like pydicom, the first one applies.
    try:
        if isinstance(center, MultiValue | list | tuple):
            center = center[0]
        if isinstance(width, MultiValue | list | tuple):
            width = width[0]
        found = (float(center), float(width))
    except (TypeError, ValueError, IndexError):
        return None
    return found if found[1] >= 1.0 else None


def _has_dataset_voi(ds: Dataset) -> bool:
    return bool(ds.get("VOILUTSequence")) or (
        ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    )


def grey_to_unit(
    arr: NDArray[Any],
    ds: Dataset,
    *,
    window: tuple[float, float] | None = None,
    value_range: tuple[float, float] | None = None,
) -> NDArray[np.float32]:
    """Stored grey values to display values in 0..1: modality LUT, VOI and MONOCHROME1.

    The composition ``invert_monochrome1(apply_voi(apply_modality_lut(arr)), (0, 1))`` in
    ``float32``. When both the modality transform (rescale slope/intercept) and the VOI (an
    explicit window, a dataset LINEAR window, or none: min/max) are linear, they are folded
    into one multiply-add and a clip, which is why preprocessing costs little next to decoding;
    LUT sequences and non-linear VOI functions take the step-by-step path.

    Parameters
    ----------
    arr : numpy.ndarray
        Stored values with *Bits Stored* masked (:func:`mask_bits_stored`).
    ds : pydicom.dataset.Dataset
        The dataset the array came from.
    window : tuple of float, optional
        ``(center, width)`` in modality units overriding the dataset's VOI.
    value_range : tuple of float, optional
        ``(min, max)`` of the modality values of the whole frame, for the min/max scaling used
        when there is no VOI, when `arr` is only a part of the frame (a strip of rows, see
        :func:`unit_image`); by default `arr`'s own.

    Returns
    -------
    numpy.ndarray
        ``float32`` in 0..1, 0 = black.

    Raises
    ------
    PreprocessingError
        If the explicit window width is below 1.
    """
    if window is not None and float(window[1]) < 1.0:
        raise PreprocessingError(f"window width {window[1]} is below 1 (PS3.3 C.11.2.1.2)")
    linear_modality = not ds.get("ModalityLUTSequence")
    linear_voi = linear_window_of(ds, window)
    no_voi = window is None and not _has_dataset_voi(ds)
    if not linear_modality or not ((linear_voi is not None and linear_voi[1] >= 2.0) or no_voi):
        modality = apply_modality_lut(arr, ds)
        if no_voi and value_range is not None:  # apply_voi's min/max scaling, frame-wide
            lo, hi = float(value_range[0]), float(value_range[1])
            unit = (np.zeros_like(modality) if hi <= lo
                    else np.clip((modality - lo) * (1.0 / (hi - lo)), 0.0, 1.0))
        else:
            unit = apply_voi(modality, ds, window=window)
        flipped = invert_monochrome1(unit, ds, value_range=(0.0, 1.0))
        return np.asarray(flipped, dtype=np.float32)
    slope, intercept = 1.0, 0.0  # as pydicom: the rescale applies only when both are present
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if linear_voi is not None:
        center, width = linear_voi
        # PS3.3 C.11.2.1.2.1: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to 0..1.
        gain = slope / (width - 1.0)
        offset = (intercept - (center - 0.5)) / (width - 1.0) + 0.5
    else:
        if arr.size == 0:
            return np.zeros(arr.shape, dtype=np.float32)
        if value_range is not None:
            ends = sorted((float(value_range[0]), float(value_range[1])))
        else:
            ends = sorted((float(arr.min()) * slope + intercept,
                           float(arr.max()) * slope + intercept))
        if ends[1] == ends[0]:
            return np.zeros(arr.shape, dtype=np.float32)
        gain = slope / (ends[1] - ends[0])
        offset = (intercept - ends[0]) / (ends[1] - ends[0])
    if _photometric(ds) == "MONOCHROME1":  # 1 - (g x + o), folded in
        gain, offset = -gain, 1.0 - offset
    out = arr.astype(np.float32)
    out *= np.float32(gain)
    out += np.float32(offset)
    return np.clip(out, 0.0, 1.0, out=out)


def _unit_block(
    block: NDArray[Any],
    ds: Dataset,
    *,
    window: tuple[float, float] | None,
    is_ybr: bool,
    value_range: tuple[float, float] | None = None,
) -> NDArray[np.float32]:
    """Rows of a frame to display values 0..1: masked, then grey or colour (pointwise)."""
    bits = int(ds.get("BitsStored", 0) or 0)
    # Nothing to mask when Bits Stored fills the dtype; later steps never write to their input.
    full_width = np.issubdtype(block.dtype, np.integer) and bits >= block.dtype.itemsize * 8
    masked = block if full_width else mask_bits_stored(block, ds)
    if _photometric(ds) in GREY_INTERPRETATIONS:
        return grey_to_unit(masked, ds, window=window, value_range=value_range)
    rgb = to_rgb(masked, ds, is_ybr=is_ybr)
    scaled: NDArray[np.float32] = rgb.astype(np.float32) * np.float32(
        1.0 / float(2 ** _colour_bits(rgb, ds) - 1))
    return scaled


def _strip_rows(arr: NDArray[Any], strip_pixels: int) -> int:
    return max(1, strip_pixels // max(int(arr.shape[1]), 1))


def _modality_range(arr: NDArray[Any], ds: Dataset, step: int) -> tuple[float, float]:
    """``(min, max)`` of the modality values of a grey frame, strip by strip (PS3.3 C.11.1)."""
    bits = int(ds.get("BitsStored", 0) or 0)
    full_width = np.issubdtype(arr.dtype, np.integer) and bits >= arr.dtype.itemsize * 8
    linear = not ds.get("ModalityLUTSequence")
    lo, hi = np.inf, -np.inf
    for top in range(0, int(arr.shape[0]), step):
        block = arr[top : top + step]
        masked = block if full_width else mask_bits_stored(block, ds)
        if linear:  # rescale is monotonic: map the stored extremes, as grey_to_unit does
            lo, hi = min(lo, float(masked.min())), max(hi, float(masked.max()))
        else:
            modality = apply_modality_lut(masked, ds)
            lo, hi = min(lo, float(modality.min())), max(hi, float(modality.max()))
    if linear and ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def unit_image(
    arr: NDArray[Any],
    ds: Dataset,
    shape: tuple[int, int],
    *,
    window: tuple[float, float] | None = None,
    is_ybr: bool = False,
    keep_aspect: bool = False,
    pad_value: float = 0.0,
    strip_pixels: int = STRIP_PIXELS,
    strip_above: int = STRIP_ABOVE_PIXELS,
) -> NDArray[np.float32]:
    """A decoded frame as display values 0..1, resized to `shape`, in bounded memory.

    Grey frames: *Bits Stored* masked (PS3.3 C.7.6.3.1), modality LUT (C.11.1), VOI (C.11.2) and
    MONOCHROME1 inversion (C.7.6.3.1.2) by :func:`grey_to_unit`; colour frames: :func:`to_rgb`
    (C.7.6.3.1.2, C.7.6.3.1.5) scaled by the bit depth; then :func:`resize`. A frame of at most
    `strip_above` pixels is done whole, exactly so. A larger one is done in strips of
    `strip_pixels` pixels: each strip is converted and multiplied into the rows of the resize
    that read it, so no full-size float copy exists (the min/max of a frame without VOI is
    taken first, frame-wide). The result equals the whole-frame one to float rounding.

    Parameters
    ----------
    arr : numpy.ndarray
        One decoded frame, ``(rows, columns)`` or ``(rows, columns, 3)``.
    ds : pydicom.dataset.Dataset
        The dataset the frame came from.
    shape : tuple of int
        The output ``(height, width)``.
    window : tuple of float, optional
        ``(center, width)`` overriding the dataset's VOI (grey frames).
    is_ybr : bool
        A YBR_FULL/YBR_FULL_422 frame was decoded without conversion to RGB.
    keep_aspect : bool
        Keep the aspect ratio, padding the rest with `pad_value` (see :func:`resize`).
    pad_value : float
        The value of the padding.
    strip_pixels : int
        Pixels per strip.
    strip_above : int
        Frames of more pixels than this are taken in strips.

    Returns
    -------
    numpy.ndarray
        ``float32``, ``shape`` (plus the colour axis of a colour frame).

    Raises
    ------
    PreprocessingError
        A colour interpretation :func:`to_rgb` does not handle, or a bad explicit window.
    """
    height, width = int(shape[0]), int(shape[1])
    rows, columns = int(arr.shape[0]), int(arr.shape[1])
    target = _aspect_shape((rows, columns), (height, width)) if keep_aspect else (height, width)
    if rows * columns <= strip_above:
        whole = _unit_block(arr, ds, window=window, is_ybr=is_ybr)
        return resize(whole, (height, width), keep_aspect=keep_aspect,
                      pad_value=pad_value).astype(np.float32, copy=False)
    step = _strip_rows(arr, strip_pixels)
    value_range = None
    if _photometric(ds) in GREY_INTERPRETATIONS and window is None and not _has_dataset_voi(ds):
        value_range = _modality_range(arr, ds, step)
    # The row pass of the separable resize, one strip of input rows at a time (column slices
    # of a CSC matrix are cheap); then the column pass on the small result.
    weights = _axis_weights(rows, target[0]).tocsc()
    rows_done: NDArray[np.float32] | None = None
    tail: tuple[int, ...] = ()  # (columns,) or (columns, 3): palette indices become RGB
    for top in range(0, rows, step):
        block = _unit_block(arr[top : top + step], ds, window=window, is_ybr=is_ybr,
                            value_range=value_range)
        tail = block.shape[1:]
        part = np.asarray(weights[:, top : top + block.shape[0]]
                          @ block.reshape(block.shape[0], -1), dtype=np.float32)
        if rows_done is None:
            rows_done = part
        else:
            rows_done += part
    assert rows_done is not None  # rows >= 1: at least one strip
    resized = _resample_axis(rows_done.reshape(target[0], *tail), 1, target[1])
    out = np.ascontiguousarray(resized, dtype=np.float32)
    return _pad(out, (height, width), pad_value) if keep_aspect else out


def preprocess_frame(
    arr: NDArray[Any], ds: Dataset, spec: PreprocessingSpec, *, is_ybr: bool = False
) -> NDArray[np.float32]:
    """Turn one decoded frame into a model input.

    Applies, in order: the input checks, :func:`mask_bits_stored` (PS3.3 C.7.6.3.1), for grey
    images :func:`apply_modality_lut` (C.11.1), :func:`apply_voi` with the spec's window or the
    dataset's VOI (C.11.2) and MONOCHROME1 inversion as ``1 - x`` (C.7.6.3.1.2); for colour images
    :func:`to_rgb` (C.7.6.3.1.2, C.7.6.3.1.5) scaled to 0..1 by the bit depth; then
    :func:`resize`, channel handling (grey replicated, colour to luminance for one channel) and
    :func:`normalize`. Everything up to the resize is :func:`unit_image`: frames above
    :data:`STRIP_ABOVE_PIXELS` pixels go through it in strips of rows (bounded memory).

    Parameters
    ----------
    arr : numpy.ndarray
        One decoded frame, e.g. ``ds.pixel_array`` (or ``pixel_array(ds, index=i)``).
    ds : pydicom.dataset.Dataset
        The dataset the frame came from.
    spec : PreprocessingSpec
        What the model expects.
    is_ybr : bool
        A YBR_FULL/YBR_FULL_422 frame was decoded without conversion to RGB.

    Returns
    -------
    numpy.ndarray
        ``float32`` of shape ``(*spec.input_shape, spec.channels)``.

    Raises
    ------
    PreprocessingError
        No pixel data, an unsupported photometric interpretation, a frame of the wrong shape or
        smaller than ``spec.min_input_size``.
    """
    _check_input(arr, ds, spec)
    resized: NDArray[np.floating[Any]] = unit_image(
        arr, ds, spec.input_shape, window=spec.window_values, is_ybr=is_ybr,
        keep_aspect=spec.keep_aspect, pad_value=0.0)
    if resized.ndim == 3 and spec.channels == 1:
        resized = luminance(resized)
    if resized.ndim == 2 and spec.normalization != "imagenet":
        # Identical channels have the same statistics: normalise one, then replicate.
        return replicate_channels(normalize(resized, spec.normalization), spec.channels).astype(
            np.float32, copy=False
        )
    shaped = replicate_channels(resized, spec.channels)
    return normalize(shaped, spec.normalization).astype(np.float32, copy=False)
