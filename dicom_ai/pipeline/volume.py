"""Volume inference core: resampling and its inverse, sliding windows, lesions; pure numpy.

The stages a volume model runs through, none of which needs a model runtime:

1. :func:`modality_volume` turns a loaded :class:`~dicom_ai.pipeline.loading.Volume` into
   ``float32`` modality values (HU for CT, PS3.3 C.11.1) one slice at a time.
2. :func:`resample` brings it to the model's ``target_spacing`` (in-plane with
   :func:`~dicom_ai.pipeline.preprocessing.resample_volume`'s kernel; across slices from the
   slices' real positions, so a series with uneven gaps or a missing slice becomes an even
   grid) and records the geometry of the resampled voxels (:class:`Grid`); :func:`to_source`
   maps a probability or mask volume back to the source slices' grid (shape and geometry of
   the original slices: PS3.3 C.7.6.2), so a mask row refers to a real SOP instance.
3. :func:`sliding_window` (3D patches, input kind ``volume``) and :func:`sliding_window_slices`
   (2.5D: ``k`` adjacent slices as channels, input kind ``slices``) run a
   ``predict(batch) -> batch`` callable over a volume larger than the model input: a patch grid
   with overlap, Gaussian, linear or constant blending weights, patches predicted in batches.
   The only full-size buffer is the ``float32`` accumulator of the resampled size: the blending
   weights are separable and the patch grid is a product of per-axis grids, so their sum (the
   normaliser) is the outer product of three 1D sums and never takes a volume of memory.
4. :func:`find_lesions` / :func:`measure_lesions`: connected components of a thresholded output
   (or a label volume) with voxel count, volume in mm3, centroid in voxel and patient
   coordinates, longest axial diameter in mm and the mean input intensity inside;
   :func:`source_lesions` finds them on the source slices straight from the model's grid,
   mapping back only the boxes where a lesion can be.

Voxel ``(s, r, c)`` of a :class:`Grid` lies at ``origin + c * dc * F_row + r * dr * F_col +
s * ds * N`` (PS3.3 C.7.6.2.1.1): ``F_row`` and ``F_col`` are the row and column direction
cosines of Image Orientation (Patient), ``N`` their cross product, ``(ds, dr, dc)`` the spacing;
on an uneven grid ``s * ds`` is the slice's real distance from the first (:attr:`Grid.positions`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage
from scipy.sparse.csgraph import connected_components
from scipy.spatial import ConvexHull, QhullError

from dicom_ai.exceptions import DicomAIError
from dicom_ai.pipeline.loading import Volume
from dicom_ai.pipeline.preprocessing import (
    apply_modality_lut,
    linear_window_of,
    mask_bits_stored,
    resample_volume,
)
from dicom_ai.values import PreprocessingSpec

__all__ = [
    "VOLUME_MODALITIES",
    "BlendMode",
    "Grid",
    "Lesion",
    "ModalityValues",
    "Predict",
    "Resampled",
    "SourceLesion",
    "SourceLesions",
    "VolumeError",
    "VolumeInput",
    "add_timing",
    "blend_weights",
    "find_lesions",
    "forms_volume",
    "label_lesions",
    "measure_lesions",
    "modality_values",
    "modality_volume",
    "normalize_volume",
    "patch_starts",
    "prepare_volume_input",
    "resample",
    "slice_stack",
    "sliding_window",
    "sliding_window_slices",
    "source_lesions",
    "to_source",
    "volume_window",
    "window_volume",
]

BlendMode = Literal["gaussian", "linear", "constant"]
#: Modalities whose series a volume model takes (PS3.3 C.7.6.2 slices in a patient frame).
VOLUME_MODALITIES = frozenset({"CT", "MR"})
#: Slices per in-plane resampling pass (bounded temporaries, see _in_plane).
SLAB = 16
#: A model's forward pass over one batch of patches: ``float32`` in, ``float32`` out.
Predict = Callable[[NDArray[np.float32]], NDArray[Any]]
Float32Array = NDArray[np.float32]

#: Gaussian blending: sigma as a fraction of the patch size (nnU-Net's choice).
GAUSSIAN_SIGMA_SCALE = 0.125
#: Floor of each axis' Gaussian weight relative to its centre: every voxel a patch covers keeps
#: a positive weight, so the normaliser never divides by zero (float32 holds its cube).
WEIGHT_FLOOR = 1e-3


def forms_volume(datasets: Sequence[Dataset]) -> str | None:
    """Why the instances of one series cannot be a volume, or None when they can.

    CT or MR (PS3.3 C.7.3.1) with Image Position (Patient) on every instance, or one
    enhanced multi-frame object (Per-frame Functional Groups, C.7.6.16) of several frames.
    Only the headers are read (the job runner and ``dicom-ai preview`` decide with it).

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        The headers of one series' instances.

    Returns
    -------
    str or None
        The reason, or None for a volume.
    """
    modalities = {str(ds.get("Modality", "")).strip().upper() for ds in datasets}
    if not modalities <= VOLUME_MODALITIES:
        return f"modality {', '.join(sorted(m or 'none' for m in modalities))} is not a volume"
    if len(datasets) == 1:
        ds = datasets[0]
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        if "PerFrameFunctionalGroupsSequence" in ds and frames > 1:
            return None
        return "a single slice is not a volume"
    if not all("ImagePositionPatient" in ds or "PerFrameFunctionalGroupsSequence" in ds
               for ds in datasets):
        return "not a volume: slices without Image Position (Patient)"
    return None


class VolumeError(DicomAIError):
    """A volume, patch size, overlap or model output that the volume core cannot work with."""


@dataclass(frozen=True)
class Grid:
    """Geometry of a voxel grid in the patient coordinate system (PS3.3 C.7.6.2.1.1).

    In-plane the grid is regular (Pixel Spacing); along the normal it is regular too unless
    :attr:`positions` is given: the real distance of each slice from the first, for a series
    with uneven gaps or missing slices (:attr:`~dicom_ai.pipeline.loading.Volume.slice_positions`).

    Attributes
    ----------
    shape : tuple of int
        ``(slices, rows, columns)``.
    spacing : tuple of float
        ``(slice, row, column)`` spacing in mm, as :attr:`Volume.spacing` (the median slice gap
        for an uneven grid).
    origin : tuple of float
        Patient position (mm) of the centre of voxel ``(0, 0, 0)``.
    orientation : tuple of float
        Image Orientation (Patient): row direction cosines, then column direction cosines.
    positions : tuple of float or None
        Uneven grids only: each slice's distance (mm) from the first along the normal
        (``positions[0] == 0``); None for evenly spaced slices.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    positions: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.positions is not None and len(self.positions) != self.shape[0]:
            raise VolumeError(f"{len(self.positions)} slice positions for {self.shape[0]} "
                              "slices")

    @classmethod
    def of(cls, volume: Volume) -> Grid:
        """The grid of a loaded volume (its slices in order along the normal).

        Slices whose gaps differ from the median by more than :data:`EVEN_TOLERANCE` of it
        (uneven spacing, a missing slice) keep their real positions (:attr:`positions`).
        """
        s, r, c = volume.array.shape[:3]
        positions = _uneven_positions(volume.slice_positions, volume.spacing[0])
        return cls((int(s), int(r), int(c)), volume.spacing, volume.origin, volume.orientation,
                   positions)

    def axes(self) -> NDArray[np.float64]:
        """``(3, 3)``: the patient-space step (mm) of one voxel along slice, row and column.

        For an uneven grid the slice step is the median gap (:meth:`to_patient` uses the real
        positions).
        """
        row_dir = np.asarray(self.orientation[:3], dtype=np.float64)
        col_dir = np.asarray(self.orientation[3:], dtype=np.float64)
        normal = np.cross(row_dir, col_dir)
        normal /= float(np.linalg.norm(normal)) or 1.0
        # Moving one slice goes along the normal; one row down the column cosines; one column
        # along the row cosines.
        return np.stack([normal * self.spacing[0], col_dir * self.spacing[1],
                         row_dir * self.spacing[2]])

    def slice_offsets(self) -> NDArray[np.float64]:
        """Each slice's distance (mm) from the first along the normal."""
        if self.positions is not None:
            return np.asarray(self.positions, dtype=np.float64)
        return np.arange(self.shape[0], dtype=np.float64) * self.spacing[0]

    def slice_extents(self) -> NDArray[np.float64]:
        """The thickness (mm) each slice stands for: half the gap to each neighbour.

        ``spacing[0]`` everywhere on an even grid; on an uneven one a slice next to a gap
        covers half of it (the slices' extents add up to the covered length), so a lesion's
        volume follows the real slice positions.
        """
        if self.positions is None or self.shape[0] < 2:
            return np.full(self.shape[0], self.spacing[0], dtype=np.float64)
        gaps = np.diff(np.asarray(self.positions, dtype=np.float64))
        extents = np.empty(self.shape[0], dtype=np.float64)
        extents[1:-1] = 0.5 * (gaps[:-1] + gaps[1:])
        # The end slices: half their one gap inward, half the median spacing outward.
        extents[0] = 0.5 * (gaps[0] + self.spacing[0])
        extents[-1] = 0.5 * (gaps[-1] + self.spacing[0])
        return extents

    def to_patient(self, index: NDArray[Any]) -> NDArray[np.float64]:
        """Patient coordinates (mm) of voxel indices ``(..., 3)`` given as ``(s, r, c)``.

        A fractional slice index of an uneven grid lies between its two slices' real positions
        (linearly; beyond the ends at the median spacing).
        """
        index = np.asarray(index, dtype=np.float64)
        if self.positions is None:
            return np.asarray(np.asarray(self.origin) + index @ self.axes(), dtype=np.float64)
        axes = self.axes()
        normal = axes[0] / self.spacing[0]
        along = _interp_slices(index[..., 0], self.slice_offsets(), self.spacing[0])
        return np.asarray(np.asarray(self.origin) + along[..., None] * normal
                          + index[..., 1:] @ axes[1:], dtype=np.float64)

    @property
    def voxel_volume(self) -> float:
        """mm3 of one voxel (at the median slice spacing on an uneven grid; see
        :meth:`slice_extents`)."""
        return float(self.spacing[0] * self.spacing[1] * self.spacing[2])


#: Slice gaps within this fraction of the median count as even (scanners round positions).
EVEN_TOLERANCE = 0.01


def _uneven_positions(positions: Sequence[float], spacing: float) -> tuple[float, ...] | None:
    """``positions`` when their gaps are uneven, else None (an even grid)."""
    if len(positions) < 3 or spacing <= 0:
        return None
    gaps = np.diff(np.asarray(positions, dtype=np.float64))
    if float(np.abs(gaps - spacing).max()) <= EVEN_TOLERANCE * spacing:
        return None
    return tuple(float(p) for p in positions)


def _interp_slices(s: NDArray[np.float64], offsets: NDArray[np.float64],
                   spacing: float) -> NDArray[np.float64]:
    """Distance (mm) along the normal of fractional slice indices ``s``."""
    n = len(offsets)
    inside = np.interp(s, np.arange(n, dtype=np.float64), offsets)
    below = offsets[0] + s * spacing
    above = offsets[-1] + (s - (n - 1)) * spacing
    return np.asarray(np.where(s < 0, below, np.where(s > n - 1, above, inside)),
                      dtype=np.float64)


@dataclass(frozen=True)
class Resampled:
    """A volume resampled to a model's spacing, with the grids to map results back.

    Attributes
    ----------
    array : numpy.ndarray
        ``float32`` ``(slices, rows, columns)`` on :attr:`grid`.
    grid : Grid
        Geometry of the resampled voxels: the spacing is ``source spacing * n_in / n_out`` per
        axis (the target spacing up to rounding of the shape), voxel centres aligned the way
        :func:`~dicom_ai.pipeline.preprocessing.resample_volume` aligns them.
    source : Grid
        Geometry of the source slices.
    """

    array: Float32Array
    grid: Grid
    source: Grid


@dataclass(frozen=True)
class Lesion:
    """One connected component of a thresholded output or a label volume.

    Attributes
    ----------
    label : int
        1-based index of the component (the label value for :func:`measure_lesions`).
    voxels : int
        Voxel count.
    volume_mm3 : float
        ``voxels`` x the voxel volume.
    centroid_voxel : tuple of float
        Mean voxel index ``(s, r, c)``.
    centroid_patient : tuple of float
        The centroid in patient coordinates (mm, PS3.3 C.7.6.2.1.1).
    longest_axial_diameter_mm : float
        The longest in-plane distance between two voxel centres of the component on any one
        slice (mm); 0 for a single voxel per slice.
    mean_intensity : float or None
        Mean of the intensity volume (HU for CT) inside, when one was given.
    bbox : tuple of tuple of int
        ``((s0, s1), (r0, r1), (c0, c1))``: half-open voxel bounds.
    """

    label: int
    voxels: int
    volume_mm3: float
    centroid_voxel: tuple[float, float, float]
    centroid_patient: tuple[float, float, float]
    longest_axial_diameter_mm: float
    mean_intensity: float | None
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# -- modality values and resampling ---------------------------------------------------------------
def modality_volume(volume: Volume) -> Float32Array:
    """The volume in modality values (HU for CT), ``float32``, converted slice by slice.

    Each slice goes through :func:`~dicom_ai.pipeline.preprocessing.mask_bits_stored` and
    :func:`~dicom_ai.pipeline.preprocessing.apply_modality_lut` with its own dataset (its own
    Rescale Slope/Intercept, PS3.3 C.11.1), so no ``float64`` copy of the whole volume exists.
    :func:`modality_values` gives the same values without the volume-sized array.

    Parameters
    ----------
    volume : Volume
        From :func:`~dicom_ai.pipeline.loading.load_volume`.

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(slices, rows, columns)``.
    """
    out = np.empty(volume.array.shape[:3], dtype=np.float32)
    for k, plane in enumerate(volume.array):
        _modality_plane(plane, volume.datasets[k] if volume.datasets else None, out[k])
    return out


def _modality_plane(plane: NDArray[Any], ds: Dataset | None, out: Float32Array) -> None:
    """One slice (or a crop of it) of stored values into ``out`` as modality values."""
    if ds is None:
        out[...] = plane
    elif "ModalityLUTSequence" in ds:
        out[...] = apply_modality_lut(mask_bits_stored(plane, ds), ds)
    else:
        # Rescale Slope/Intercept straight into float32 (C.11.1.1.2): the float64
        # detour of apply_modality_lut costs more than the arithmetic.
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        np.multiply(mask_bits_stored(plane, ds), np.float32(slope), out=out, casting="unsafe")
        out += np.float32(intercept)


class ModalityValues:
    """A volume's modality values (HU for CT), computed from its stored values when read.

    What :func:`modality_volume` returns, without its ``float32`` array: 300 MB for 300 x 512 x
    512, whose pages the kernel must first fault in (about as long as the conversion itself
    on a busy machine). Indexing with slices (``values[a:b]``, ``values[a:b, r0:r1, c0:c1]``)
    converts just those voxels, slice by slice with each slice's own rescale; ``np.asarray``
    gives the whole array. :func:`resample` reads it slab by slab and :func:`source_lesions`
    / :func:`measure_lesions` read the crops they average over.

    Parameters
    ----------
    volume : Volume
        From :func:`~dicom_ai.pipeline.loading.load_volume`; its stored values stay referenced.
    """

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        s, r, c = volume.array.shape[:3]
        self.shape: tuple[int, int, int] = (int(s), int(r), int(c))
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key: slice | tuple[slice, ...]) -> Float32Array:
        """The modality values of a box of slices (basic slices only, step 1)."""
        parts = key if isinstance(key, tuple) else (key,)
        if len(parts) > 3 or not all(isinstance(p, slice) for p in parts):
            raise VolumeError("modality values are read by slices (a box), not "
                              f"{type(key).__name__} indices")
        first = range(*parts[0].indices(self.shape[0])) if parts else range(self.shape[0])
        rest = tuple(parts[1:])
        if first.step != 1 or any(p.step not in (None, 1) for p in rest):
            raise VolumeError("modality values are read in steps of 1")
        stored = self.volume.array
        crop_shape = stored[0][rest].shape if len(stored) else (0, 0)
        out = np.empty((len(first), *crop_shape), dtype=np.float32)
        datasets = self.volume.datasets
        for i, k in enumerate(first):
            _modality_plane(stored[k][rest], datasets[k] if datasets else None, out[i])
        return out

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> NDArray[Any]:
        """All of it (:func:`modality_volume`)."""
        out = modality_volume(self.volume)
        return out if dtype is None else out.astype(dtype, copy=False)

    def copy(self) -> Float32Array:
        """All of it as a new ``float32`` array."""
        return modality_volume(self.volume)


def modality_values(volume: Volume) -> ModalityValues:
    """The volume's modality values, read when needed (:class:`ModalityValues`).

    Parameters
    ----------
    volume : Volume
        From :func:`~dicom_ai.pipeline.loading.load_volume`.

    Returns
    -------
    ModalityValues
    """
    return ModalityValues(volume)


def _z_positions(source: Grid, n_out: int) -> NDArray[np.float64]:
    """Distances (mm, from the first source slice) of ``n_out`` even slices over ``source``.

    They cover the source's extent, from half a (median) spacing before its first slice to
    half one after its last, in equal steps with voxel centres aligned: on an even grid output
    slice ``j`` lies at input index ``(j + 0.5) * n_in / n_out - 0.5``, as
    :func:`~dicom_ai.pipeline.preprocessing.resample_volume` aligns it.
    """
    offsets = source.slice_offsets()
    length = float(offsets[-1] - offsets[0]) + source.spacing[0]
    step = length / n_out
    return np.asarray(offsets[0] - 0.5 * source.spacing[0] + (np.arange(n_out) + 0.5) * step,
                      dtype=np.float64)


def _resampled_grid(source: Grid, shape: tuple[int, int, int]) -> Grid:
    """The even grid of ``source`` resampled to ``shape`` with centre-aligned voxels."""
    z = _z_positions(source, shape[0])
    length = float(source.slice_offsets()[-1]) + source.spacing[0]
    factors = [n_in / n_out for n_in, n_out in zip(source.shape[1:], shape[1:], strict=True)]
    spacing = (length / shape[0], source.spacing[1] * factors[0], source.spacing[2] * factors[1])
    axes = source.axes()
    normal = axes[0] / source.spacing[0]
    # In-plane, output voxel j sits at input index (j + 0.5) * n_in / n_out - 0.5.
    first = np.array([0.5 * f - 0.5 for f in factors])
    origin = np.asarray(source.origin) + float(z[0]) * normal + first @ axes[1:]
    return Grid(shape, spacing, (float(origin[0]), float(origin[1]), float(origin[2])),
                source.orientation)


def _axis_matrix(src: NDArray[np.float64], dst: NDArray[np.float64], src_step: float,
                 dst_step: float) -> NDArray[np.float64]:
    """The ``(len(dst), len(src))`` resampling matrix of one axis, rows summing to 1.

    Samples at positions ``src`` (mm, increasing, possibly uneven) are resampled to positions
    ``dst`` with a triangle kernel whose half-width is the larger of the destination's local
    spacing and the source gap around the destination sample: plain linear interpolation
    between the two real neighbours when enlarging (across a missing slice too), an average
    of every sample covered when shrinking (anti-aliasing). On even positions this is the
    kernel of :func:`~dicom_ai.pipeline.preprocessing.resample_volume` (taps outside dropped,
    the rest renormalised). ``src_step`` / ``dst_step`` stand in for a local spacing where an
    axis has a single sample.
    """
    n_src, n_dst = len(src), len(dst)
    if n_dst > 1:
        gaps = np.diff(dst)
        local = np.empty(n_dst)
        local[1:-1] = 0.5 * (gaps[:-1] + gaps[1:])
        local[0], local[-1] = gaps[0], gaps[-1]
    else:
        local = np.array([dst_step])
    if n_src > 1:
        below = np.clip(np.searchsorted(src, dst, side="right") - 1, 0, n_src - 2)
        around = src[below + 1] - src[below]
    else:
        around = np.full(n_dst, src_step)
    support = np.maximum(local, around)
    weights = np.maximum(0.0, 1.0 - np.abs(src[None, :] - dst[:, None]) / support[:, None])
    totals = weights.sum(axis=1)
    empty = totals <= 0.0  # cannot happen (a neighbour is within the support): a guard
    if empty.any():
        nearest = np.abs(src[None, :] - dst[empty][:, None]).argmin(axis=1)
        weights[empty] = 0.0
        weights[np.flatnonzero(empty), nearest] = 1.0
        totals = weights.sum(axis=1)
    return np.asarray(weights / totals[:, None], dtype=np.float64)


def _slice_matrix(resampled: Resampled) -> NDArray[np.float64]:
    """``(source slices, resampled slices)``: from the even resampled slices to the real ones."""
    source = resampled.source
    return _axis_matrix(_z_positions(source, resampled.grid.shape[0]), source.slice_offsets(),
                        resampled.grid.spacing[0], source.spacing[0])


def _plane_matrix(n_in: int, n_out: int) -> NDArray[np.float64]:
    """``(n_out, n_in)``: one in-plane axis, centre-aligned (pixel centres at ``i + 0.5``)."""
    scale = n_in / n_out
    centres = np.arange(max(n_in, n_out), dtype=np.float64) + 0.5
    return _axis_matrix(centres[:n_in], centres[:n_out] * scale, 1.0, scale)


def _apply_slices(src: NDArray[Any], matrix: NDArray[np.float64]) -> Float32Array:
    """``matrix @ src`` along the slice axis, one output slice at a time (``float32``).

    Each output slice reads the few input slices its row of the (banded) matrix names, so no
    temporary larger than a slice exists.
    """
    out = np.empty((matrix.shape[0], *src.shape[1:]), dtype=np.float32)
    scratch = np.empty(src.shape[1:], dtype=np.float32)
    for j, row in enumerate(matrix):
        taps = np.flatnonzero(row)
        target = out[j]
        np.multiply(src[taps[0]], np.float32(row[taps[0]]), out=target, casting="unsafe")
        for i in taps[1:]:
            np.multiply(src[i], np.float32(row[i]), out=scratch, casting="unsafe")
            target += scratch
    return out


def resample(array: NDArray[Any] | ModalityValues, source: Grid,
             target_spacing: tuple[float, float, float]) -> Resampled:
    """Resample a volume on ``source`` to ``target_spacing`` (a model spec's ``target_spacing``).

    In-plane with :func:`~dicom_ai.pipeline.preprocessing.resample_volume`'s kernel; across
    slices from the slices' real positions (:attr:`Grid.positions` of an uneven series: a
    missing slice or a change of spacing) onto evenly spaced slices covering the same extent
    (:func:`_axis_matrix`), so the model always sees an even grid.

    Parameters
    ----------
    array : numpy.ndarray or ModalityValues
        ``(slices, rows, columns)`` on ``source``, normally :func:`modality_values` (read slab
        by slab) or :func:`modality_volume`; converted to ``float32`` slab by slab (never to
        ``float64``).
    source : Grid
        Its geometry (:meth:`Grid.of`).
    target_spacing : tuple of float
        ``(slice, row, column)`` spacing in mm.

    Returns
    -------
    Resampled
        The ``float32`` resampled volume with its (even) grid and the source grid.

    Raises
    ------
    VolumeError
        If the array's shape is not the grid's.
    """
    if tuple(array.shape) != source.shape:
        raise VolumeError(f"array shape {array.shape} is not the grid's {source.shape}")
    offsets = source.slice_offsets()
    length = float(offsets[-1] - offsets[0]) + source.spacing[0]
    shape = (max(1, round(length / target_spacing[0])),
             *_new_shape(source.shape[1:], source.spacing[1:], target_spacing[1:]))
    grid = _resampled_grid(source, (shape[0], shape[1], shape[2]))
    # In-plane first (shrinking first keeps the intermediate small), then across slices.
    plane = _in_plane(array, source.spacing, shape[1:])
    if source.positions is None and shape[0] == source.shape[0]:
        return Resampled(plane, grid, source)
    matrix = _axis_matrix(offsets, _z_positions(source, shape[0]), source.spacing[0],
                          grid.spacing[0])
    return Resampled(_apply_slices(plane, matrix), grid, source)


def _new_shape(shape: tuple[int, ...], spacing: tuple[float, ...],
               target: tuple[float, ...]) -> tuple[int, ...]:
    """The shape resample_volume gives: ``round(n * spacing / target)``, at least 1."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))


def _in_plane(array: NDArray[Any] | ModalityValues, spacing: tuple[float, float, float],
              shape: tuple[int, ...], threshold: float | None = None) -> NDArray[Any]:
    """Resample rows and columns to ``shape`` with resample_volume, :data:`SLAB` slices at a
    time: bounded temporaries, the same numbers as one call on the whole volume. With
    ``threshold`` each slab is thresholded as it is written (a boolean result, no full-size
    float copy)."""
    ds, dr, dc = spacing
    rows, cols = array.shape[1:3]
    if (rows, cols) == tuple(shape) and threshold is None:
        return np.array(array, dtype=np.float32)  # a new array: callers window it in place
    # Target spacing that gives exactly shape (see _new_shape).
    target = (ds, dr * rows / shape[0], dc * cols / shape[1])
    out = np.empty((array.shape[0], shape[0], shape[1]),
                   dtype=bool if threshold is not None else np.float32)
    for k in range(0, array.shape[0], SLAB):
        slab = np.asarray(array[k:k + SLAB], dtype=np.float32)
        if (rows, cols) != tuple(shape):
            slab = resample_volume(slab, (ds, dr, dc), target)
        out[k:k + SLAB] = slab >= threshold if threshold is not None else slab
    return out


def to_source(values: NDArray[Any], resampled: Resampled, *,
              threshold: float | None = None) -> NDArray[Any]:
    """Map a volume on the resampled grid back to the source slices' grid.

    The inverse of :func:`resample`: across slices from the even resampled slices to the real
    slice positions (uneven ones included), then in-plane with the same centre-aligned
    triangle kernel, so voxel ``(s, r, c)`` of the result lies on slice ``s`` of the source
    volume (its SOP instance in :attr:`Volume.sop_instance_uids`).

    Parameters
    ----------
    values : numpy.ndarray
        ``(slices, rows, columns)`` or ``(slices, rows, columns, channels)`` on
        ``resampled.grid``: probabilities, or a mask (give ``threshold``).
    resampled : Resampled
        What :func:`resample` returned.
    threshold : float, optional
        When given, the result is the boolean ``value >= threshold`` (0.5 for a mask).

    Returns
    -------
    numpy.ndarray
        ``float32`` (or ``bool`` with ``threshold``) of the source shape (plus channels).

    Raises
    ------
    VolumeError
        If ``values`` is not on the resampled grid.
    """
    if tuple(values.shape[:3]) != resampled.grid.shape or values.ndim not in (3, 4):
        raise VolumeError(f"values of shape {values.shape} are not on the resampled grid "
                          f"{resampled.grid.shape}")
    if values.ndim == 3:
        # Across slices first, at the (smaller) resampled in-plane size, then in-plane by slabs.
        return _back(values, resampled, threshold)
    out = np.empty((*resampled.source.shape, values.shape[3]),
                   dtype=bool if threshold is not None else np.float32)
    for ch in range(values.shape[3]):
        out[..., ch] = _back(values[..., ch], resampled, threshold)
    return out


def _back(values: NDArray[Any], resampled: Resampled, threshold: float | None) -> NDArray[Any]:
    source = resampled.source
    if source.positions is None and values.shape[0] == source.shape[0]:
        across: NDArray[Any] = values
    else:
        across = _apply_slices(values, _slice_matrix(resampled))
    back = _in_plane(across, resampled.grid.spacing, source.shape[1:], threshold)
    if back.shape != source.shape:  # guard against a rounding surprise
        raise VolumeError(f"inverse resampling gave {back.shape}, not {source.shape}")
    return back


# -- sliding window ---------------------------------------------------------------------------
def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of patches of ``patch`` voxels covering ``size`` with ``overlap``.

    The step is at most ``patch * (1 - overlap)`` (at least 1); the starts are spread evenly
    from 0 to ``size - patch`` so the last patch ends at the border. An axis shorter than the
    patch has one start, 0 (the patch is padded by edge replication).

    Parameters
    ----------
    size, patch : int
        Axis length and patch length (voxels).
    overlap : float
        Fraction of a patch shared with its neighbour, ``0 <= overlap < 1``.

    Returns
    -------
    list of int
    """
    if patch < 1 or size < 1:
        raise VolumeError(f"patch ({patch}) and axis ({size}) must be at least 1")
    if not 0.0 <= overlap < 1.0:
        raise VolumeError(f"overlap must be within [0, 1), not {overlap}")
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


def blend_weights(patch: tuple[int, ...], mode: BlendMode) -> tuple[Float32Array, ...]:
    """Per-axis blending weights of a patch; the patch weight is their outer product.

    ``gaussian``: ``exp(-d^2 / 2 sigma^2)`` with ``sigma = patch / 8`` around the patch centre,
    relative to the centre and floored at :data:`WEIGHT_FLOOR`; ``linear``: a tent, ``min(i + 1,
    n - i)`` over its maximum; ``constant``: ones. All strictly positive.

    Parameters
    ----------
    patch : tuple of int
        Patch size per axis.
    mode : {"gaussian", "linear", "constant"}

    Returns
    -------
    tuple of numpy.ndarray
        One ``float32`` vector per axis.
    """
    weights = []
    for n in patch:
        i = np.arange(n, dtype=np.float64)
        if mode == "gaussian":
            sigma = max(n * GAUSSIAN_SIGMA_SCALE, 1e-6)
            w = np.exp(-((i - (n - 1) / 2.0) ** 2) / (2.0 * sigma ** 2))
            w = np.maximum(w / w.max(), WEIGHT_FLOOR)
        elif mode == "linear":
            w = np.minimum(i + 1.0, n - i)
            w /= w.max()
        elif mode == "constant":
            w = np.ones(n)
        else:
            raise VolumeError(f"blend must be gaussian, linear or constant, not {mode!r}")
        weights.append(w.astype(np.float32))
    return tuple(weights)


def slice_stack(volume: NDArray[Any], index: int, k: int) -> Float32Array:
    """Slices ``index - k//2 .. index + k//2`` as channels: ``(rows, columns, k)`` ``float32``.

    The 2.5D input of one slice; beyond the first and last slice the edge slice is repeated.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(slices, rows, columns)``.
    index : int
        The centre slice.
    k : int
        Odd number of slices.

    Returns
    -------
    numpy.ndarray
    """
    _check_k(k)
    picks = np.clip(np.arange(index - k // 2, index + k // 2 + 1), 0, volume.shape[0] - 1)
    return np.ascontiguousarray(np.moveaxis(volume[picks], 0, -1), dtype=np.float32)


def _check_k(k: int) -> None:
    if k < 1 or k % 2 == 0:
        raise VolumeError(f"k (adjacent slices) must be odd and positive, not {k}")


def _positions(starts: tuple[list[int], list[int], list[int]]
               ) -> Iterator[tuple[int, int, int]]:
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                yield z, y, x


def _normaliser(shape: tuple[int, int, int], patch: tuple[int, int, int],
                starts: tuple[list[int], list[int], list[int]],
                weights: tuple[Float32Array, ...]) -> list[NDArray[np.float64]]:
    """Per-axis sums of the weights over the patch grid (their outer product normalises)."""
    sums = []
    for axis in range(3):
        total = np.zeros(shape[axis], dtype=np.float64)
        for start in starts[axis]:
            stop = min(start + patch[axis], shape[axis])
            total[start:stop] += weights[axis][: stop - start]
        sums.append(total)
    return sums


def _run_window(
    shape: tuple[int, int, int],
    patch: tuple[int, int, int],
    starts: tuple[list[int], list[int], list[int]],
    weights: tuple[Float32Array, Float32Array, Float32Array],
    extract: Callable[[int, int, int, Float32Array], None],
    batch_shape: tuple[int, ...],
    predict: Predict,
    batch_size: int,
    out_patch: tuple[int, ...],
) -> Float32Array:
    """Accumulate weighted predictions over the patch grid and normalise in place.

    ``extract(z, y, x, dest)`` fills one batch row; ``out_patch`` is the shape of one predicted
    patch as the accumulator sees it, ``(pd, ph, pw)`` (a 2.5D prediction gets a depth of 1).
    """
    if batch_size < 1:
        raise VolumeError(f"batch_size must be at least 1, not {batch_size}")
    weight = (weights[0][:, None, None] * weights[1][None, :, None]
              * weights[2][None, None, :]).astype(np.float32)
    batch = np.empty((batch_size, *batch_shape), dtype=np.float32)
    acc: Float32Array | None = None
    channels = 0
    pending: list[tuple[int, int, int]] = []

    def flush() -> None:
        nonlocal acc, channels
        n = len(pending)
        result = np.asarray(predict(batch[:n]))
        if result.shape[0] != n:
            raise VolumeError(f"predict returned {result.shape[0]} patches for {n}")
        spatial = int(np.prod(out_patch))
        per_patch = int(np.prod(result.shape[1:])) if result.ndim > 1 else 1
        if per_patch % spatial:
            raise VolumeError(f"predict returned patches of shape {result.shape[1:]}; "
                              f"expected {out_patch} (plus channels)")
        got_channels = per_patch // spatial
        if acc is None:
            channels = got_channels
            # The one full-size buffer: float32, the resampled size.
            acc = np.zeros(shape + ((channels,) if channels > 1 else ()), dtype=np.float32)
        elif got_channels != channels:
            raise VolumeError(f"predict changed its channel count from {channels} to "
                              f"{got_channels}")
        result = result.reshape((n, *out_patch) + ((channels,) if channels > 1 else ()))
        for i, (z, y, x) in enumerate(pending):
            dz, dy, dx = (min(p, s - o) for p, s, o in zip(patch, shape, (z, y, x), strict=True))
            w = weight[:dz, :dy, :dx]
            part = np.asarray(result[i, :dz, :dy, :dx], dtype=np.float32)
            target = acc[z:z + dz, y:y + dy, x:x + dx]
            if channels > 1:
                target += part * w[..., None]
            else:
                target += part * w
        pending.clear()

    for z, y, x in _positions(starts):
        extract(z, y, x, batch[len(pending)])
        pending.append((z, y, x))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    assert acc is not None  # at least one patch always exists
    nz, ny, nx = _normaliser(shape, patch, starts, weights)
    plane = np.outer(ny, nx)
    for k in range(shape[0]):  # in place, one slice at a time: no second full-size array
        denominator = (plane * nz[k]).astype(np.float32)
        if channels > 1:
            acc[k] /= denominator[..., None]
        else:
            acc[k] /= denominator
    return acc


def _patch3(patch_size: tuple[int, ...], n: int, what: str) -> tuple[int, ...]:
    if len(patch_size) != n or any(int(p) < 1 for p in patch_size):
        raise VolumeError(f"{what} needs {n} positive patch sizes, not {patch_size}")
    return tuple(int(p) for p in patch_size)


def _fill(source: NDArray[Any], dest: NDArray[Any]) -> None:
    """Copy ``source`` into the leading corner of ``dest``, replicating its edges beyond."""
    pads = [(0, d - s) for s, d in zip(source.shape, dest.shape, strict=True)]
    if any(after for _, after in pads):
        dest[...] = np.pad(source, pads, mode="edge")
    else:
        dest[...] = source


def sliding_window(volume: NDArray[Any], predict: Predict,
                   patch_size: tuple[int, int, int], *, overlap: float = 0.5,
                   blend: BlendMode = "gaussian", batch_size: int = 2) -> Float32Array:
    """Run a 3D model over a volume by overlapping patches (model input kind ``volume``).

    Patches of ``patch_size`` start at :func:`patch_starts` along each axis; a patch that runs
    past the border of an axis shorter than the patch is padded by edge replication and cropped
    after prediction. Predictions are blended with :func:`blend_weights` and normalised by the
    sum of weights, so a ``predict`` that returns its input gives the input back (up to
    ``float32`` rounding).

    Parameters
    ----------
    volume : numpy.ndarray
        ``(slices, rows, columns)`` or ``(slices, rows, columns, channels)``, e.g. the
        normalised :attr:`Resampled.array`.
    predict : callable
        Takes ``float32`` ``(batch, pd, ph, pw, channels)`` (channels 1 for a 3D input) and
        returns ``(batch, pd, ph, pw)`` or ``(batch, pd, ph, pw, K)``; a batch has at most
        ``batch_size`` patches (fewer in the last one).
    patch_size : tuple of int
        ``(pd, ph, pw)``: the model's input size.
    overlap : float
        Fraction of a patch shared with its neighbour along each axis, ``[0, 1)``.
    blend : {"gaussian", "linear", "constant"}
        Blending weights.
    batch_size : int
        Patches per ``predict`` call.

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(slices, rows, columns)``, or with a last axis of K outputs. The
        accumulator is the only full-size array this function allocates.

    Raises
    ------
    VolumeError
        Bad shapes, overlap or batch size, or a ``predict`` output of the wrong shape.
    """
    if volume.ndim not in (3, 4):
        raise VolumeError(f"a volume must be 3D (plus channels), not {volume.ndim}D")
    patch = _patch3(patch_size, 3, "sliding_window")
    p3 = (patch[0], patch[1], patch[2])
    shape = (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))
    channels = int(volume.shape[3]) if volume.ndim == 4 else 1
    starts = (patch_starts(shape[0], p3[0], overlap), patch_starts(shape[1], p3[1], overlap),
              patch_starts(shape[2], p3[2], overlap))
    wz, wy, wx = blend_weights(p3, blend)

    def extract(z: int, y: int, x: int, dest: Float32Array) -> None:
        region = volume[z:z + p3[0], y:y + p3[1], x:x + p3[2]]
        if volume.ndim == 3:
            region = region[..., None]
        _fill(region, dest)

    return _run_window(shape, p3, starts, (wz, wy, wx), extract, (*p3, channels), predict,
                       batch_size, p3)


def sliding_window_slices(volume: NDArray[Any], predict: Predict,
                          patch_size: tuple[int, int], *, k: int = 3, overlap: float = 0.5,
                          blend: BlendMode = "gaussian", batch_size: int = 8) -> Float32Array:
    """Run a 2.5D model slice by slice (model input kind ``slices``).

    Each slice's input is :func:`slice_stack`: the ``k`` slices around it as channels, the edge
    slices repeated beyond the first and last. In-plane the slice is covered by overlapping
    ``patch_size`` windows blended as in :func:`sliding_window`; each slice is predicted once.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(slices, rows, columns)``.
    predict : callable
        Takes ``float32`` ``(batch, ph, pw, k)`` and returns ``(batch, ph, pw)`` or
        ``(batch, ph, pw, K)``.
    patch_size : tuple of int
        ``(ph, pw)``: the model's input size.
    k : int
        Odd number of adjacent slices (channels).
    overlap, blend, batch_size
        As for :func:`sliding_window` (in-plane).

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(slices, rows, columns)``, or with a last axis of K outputs.

    Raises
    ------
    VolumeError
        As for :func:`sliding_window`, or an even ``k``.
    """
    _check_k(k)
    if volume.ndim != 3:
        raise VolumeError(f"a volume for 2.5D input must be 3D, not {volume.ndim}D")
    ph, pw = _patch3(patch_size, 2, "sliding_window_slices")
    shape = (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))
    p3 = (1, ph, pw)
    starts = (list(range(shape[0])), patch_starts(shape[1], ph, overlap),
              patch_starts(shape[2], pw, overlap))
    _, wy, wx = blend_weights(p3, blend)
    wz = np.ones(1, dtype=np.float32)
    last = shape[0] - 1

    def extract(z: int, y: int, x: int, dest: Float32Array) -> None:
        picks = np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, last)
        region = np.moveaxis(volume[picks, y:y + ph, x:x + pw], 0, -1)
        _fill(region, dest)

    return _run_window(shape, p3, starts, (wz, wy, wx), extract, (ph, pw, k), predict,
                       batch_size, p3)


# -- lesions ----------------------------------------------------------------------------------
def _longest_axial_diameter(component: NDArray[np.bool_], row_mm: float,
                            col_mm: float) -> float:
    """Longest in-plane distance (mm) between voxel centres of ``component`` on one slice."""
    best = 0.0
    for plane in component:
        if not plane.any():
            continue
        # Only the outline can hold the farthest pair; the convex hull narrows it further.
        outline = plane & ~ndimage.binary_erosion(plane)
        points = np.argwhere(outline).astype(np.float64) * (row_mm, col_mm)
        if len(points) > 8:
            # Collinear points raise: then all of them are the hull.
            with contextlib.suppress(QhullError):
                points = points[ConvexHull(points).vertices]
        if len(points) < 2:
            continue
        diff = points[:, None, :] - points[None, :, :]
        best = max(best, float(np.sqrt((diff ** 2).sum(-1)).max()))
    return best


def measure_lesions(labels: NDArray[np.integer[Any]], grid: Grid, *,
                    intensity: NDArray[Any] | ModalityValues | None = None,
                    offset: tuple[int, int, int] = (0, 0, 0)) -> list[Lesion]:
    """Measure each labelled region of a label volume (0 background, 1..N lesions).

    Volumes follow the real slice positions of an uneven grid (each slice counts for its
    :meth:`Grid.slice_extents`), and so do the centroids.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer ``(slices, rows, columns)`` on ``grid``, or a crop of it at ``offset``.
    grid : Grid
        Its geometry.
    intensity : numpy.ndarray, optional
        A volume of the labels' shape (e.g. :func:`modality_volume`, HU) to average inside.
    offset : tuple of int
        Where ``labels[0, 0, 0]`` lies on ``grid``; bounding boxes and centroids are on
        ``grid``.

    Returns
    -------
    list of Lesion
        In label order; labels absent from the volume are skipped.
    """
    if any(o < 0 or o + n > g for o, n, g in zip(offset, labels.shape, grid.shape,
                                                 strict=True)) or labels.ndim != 3:
        raise VolumeError(f"labels of shape {labels.shape} at {offset} are not on the grid "
                          f"{grid.shape}")
    if intensity is not None and intensity.shape != labels.shape:
        raise VolumeError(f"intensity of shape {intensity.shape} is not on the grid "
                          f"{grid.shape}")
    extents = grid.slice_extents()
    in_plane = grid.spacing[1] * grid.spacing[2]
    lesions: list[Lesion] = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        component = labels[box] == index
        box = tuple(slice(b.start + o, b.stop + o) for b, o in zip(box, offset, strict=True))
        # Per-axis projections give the centroid without a (voxels x 3) index array; the
        # slice profile is weighted by each slice's extent (all equal on an even grid).
        profile = component.sum(axis=(1, 2), dtype=np.int64)
        voxels = int(profile.sum())
        weighted = profile * extents[box[0]]
        volume_mm3 = float(weighted.sum()) * in_plane
        centroid = np.array([
            float(np.dot(np.arange(len(p), dtype=np.float64), p)) / float(p.sum()) + b.start
            for p, b in zip((weighted, component.sum(axis=(0, 2), dtype=np.int64),
                             component.sum(axis=(0, 1), dtype=np.int64)), box, strict=True)
        ])
        patient = grid.to_patient(centroid)
        local = tuple(slice(b.start - o, b.stop - o) for b, o in zip(box, offset, strict=True))
        mean = (float(intensity[local][component].mean(dtype=np.float64))
                if intensity is not None else None)
        bounds = tuple((int(b.start), int(b.stop)) for b in box)
        lesions.append(Lesion(
            label=index, voxels=voxels, volume_mm3=volume_mm3,
            centroid_voxel=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
            centroid_patient=(float(patient[0]), float(patient[1]), float(patient[2])),
            longest_axial_diameter_mm=_longest_axial_diameter(component, grid.spacing[1],
                                                              grid.spacing[2]),
            mean_intensity=mean,
            bbox=(bounds[0], bounds[1], bounds[2]),
        ))
    return lesions


def find_lesions(values: NDArray[Any], grid: Grid, *, threshold: float = 0.5,
                 intensity: NDArray[Any] | None = None, min_voxels: int = 1,
                 connectivity: int = 3) -> list[Lesion]:
    """Connected components of ``values >= threshold``, measured (see :func:`measure_lesions`).

    :func:`label_lesions` gives the same lesions with their label volume.

    Parameters
    ----------
    values : numpy.ndarray
        Probabilities or a mask, ``(slices, rows, columns)`` on ``grid`` (normally the output
        mapped back by :func:`to_source`).
    grid : Grid
        Its geometry.
    threshold : float
        Voxels at or above it are foreground.
    intensity : numpy.ndarray, optional
        As for :func:`measure_lesions`.
    min_voxels : int
        Smaller components are dropped (noise).
    connectivity : {1, 2, 3}
        Neighbours that connect: faces (6), plus edges (18), plus corners (26).

    Returns
    -------
    list of Lesion
        Largest first, labels renumbered 1..N in that order.
    """
    return label_lesions(values, grid, threshold=threshold, intensity=intensity,
                         min_voxels=min_voxels, connectivity=connectivity, keep_labels=False)[1]


def label_lesions(values: NDArray[Any], grid: Grid, *, threshold: float = 0.5,
                  intensity: NDArray[Any] | None = None, min_voxels: int = 1,
                  connectivity: int = 3, keep_labels: bool = True
                  ) -> tuple[NDArray[np.integer[Any]] | None, list[Lesion]]:
    """:func:`find_lesions` plus the label volume: where each lesion is, voxel by voxel.

    Parameters
    ----------
    values, grid, threshold, intensity, min_voxels, connectivity
        As for :func:`find_lesions`.
    keep_labels : bool
        Return the label volume (else None, and no relabelling pass).

    Returns
    -------
    labels : numpy.ndarray or None
        Integer ``(slices, rows, columns)`` on ``grid`` (``uint16`` up to 65535 components):
        0 background (and components under ``min_voxels``), ``lesion.label`` inside each
        lesion. ``labels[lesion.bbox] == lesion.label`` is a lesion's cropped mask.
    lesions : list of Lesion
        As :func:`find_lesions` returns them (largest first, labels 1..N).
    """
    if not 1 <= connectivity <= 3:
        raise VolumeError(f"connectivity must be 1, 2 or 3, not {connectivity}")
    foreground = np.asarray(values) >= threshold
    structure = ndimage.generate_binary_structure(3, connectivity)
    try:  # uint16 labels take half the memory of the default int32
        labels, _ = ndimage.label(foreground, structure, output=np.uint16)
    except RuntimeError:  # more than 65535 components
        labels, _ = ndimage.label(foreground, structure)
    del foreground
    lesions = [le for le in measure_lesions(labels, grid, intensity=intensity)
               if le.voxels >= min_voxels]
    lesions.sort(key=lambda le: (-le.voxels, le.bbox))
    renumbered = [Lesion(i, le.voxels, le.volume_mm3, le.centroid_voxel, le.centroid_patient,
                         le.longest_axial_diameter_mm, le.mean_intensity, le.bbox)
                  for i, le in enumerate(lesions, start=1)]
    if not keep_labels:
        return None, renumbered
    # One lookup pass: old label -> its rank (0 for the dropped ones), in the labels' dtype.
    lookup = np.zeros(int(labels.max(initial=0)) + 1, dtype=labels.dtype)
    for new, old in zip(renumbered, lesions, strict=True):
        lookup[old.label] = new.label
    return lookup[labels], renumbered


@dataclass(frozen=True)
class SourceLesion:
    """A lesion on the source grid, from :func:`source_lesions`.

    Attributes
    ----------
    lesion : Lesion
        Its measures; ``bbox`` and centroids on the source grid.
    mask : numpy.ndarray
        ``bool``, the lesion's voxels cropped to ``lesion.bbox``.
    probability : float
        The highest output inside the lesion (on the source grid).
    """

    lesion: Lesion
    mask: NDArray[np.bool_]
    probability: float


@dataclass(frozen=True)
class SourceLesions:
    """What :func:`source_lesions` found.

    Attributes
    ----------
    lesions : list of SourceLesion
        Largest first, labels 1..N (as :func:`label_lesions` orders them).
    peak : float
        The highest output on the source grid where a lesion could be; with no lesion, the
        highest output on the model's grid (which bounds every value mapped back from it).
    """

    lesions: list[SourceLesion]
    peak: float


def source_lesions(values: NDArray[Any], resampled: Resampled | None, grid: Grid, *,
                   threshold: float = 0.5,
                   intensity: NDArray[Any] | ModalityValues | None = None,
                   min_voxels: int = 1, connectivity: int = 3) -> SourceLesions:
    """The lesions of a model output, on the source slices, without mapping the whole volume.

    The same lesions as ``label_lesions(to_source(values, resampled), grid, ...)``, computed
    only where they can be. Every value :func:`to_source` produces is a weighted mean (weights
    positive, summing to 1) of the resampled values it reads, so a source voxel reaches
    ``threshold`` only if one of the resampled voxels it reads does. The components of
    ``values >= threshold`` are found on the (smaller) model grid; each gives the box of source
    voxels that read it; boxes that overlap or touch are merged (a source component never
    crosses between two boxes), and only those boxes are mapped back (small dense matrix
    products) and labelled. For a 300 x 512 x 512 series with a few nodules this touches a few
    MB instead of a 300 MB ``float32`` volume plus its labels.

    Parameters
    ----------
    values : numpy.ndarray
        One output channel ``(slices, rows, columns)``: on ``resampled.grid``, or on ``grid``
        when ``resampled`` is None (a model run on the source grid).
    resampled : Resampled or None
        What :func:`resample` returned, or None.
    grid : Grid
        The source grid (``resampled.source``).
    threshold, intensity, min_voxels, connectivity
        As for :func:`label_lesions`; ``intensity`` is on ``grid``.

    Returns
    -------
    SourceLesions

    Raises
    ------
    VolumeError
        Values, intensity or connectivity that do not fit.
    """
    if not 1 <= connectivity <= 3:
        raise VolumeError(f"connectivity must be 1, 2 or 3, not {connectivity}")
    expected = resampled.grid.shape if resampled is not None else grid.shape
    if values.ndim != 3 or tuple(values.shape) != expected:
        raise VolumeError(f"values of shape {values.shape} are not on the grid {expected}")
    if intensity is not None and tuple(intensity.shape) != grid.shape:
        raise VolumeError(f"intensity of shape {intensity.shape} is not on the grid "
                          f"{grid.shape}")
    structure = ndimage.generate_binary_structure(3, connectivity)
    foreground = np.asarray(values) >= threshold
    components, count = ndimage.label(foreground, ndimage.generate_binary_structure(3, 3))
    del foreground
    if count == 0:
        return SourceLesions([], float(np.max(values, initial=0.0)))
    if resampled is not None:
        matrices = [_slice_matrix(resampled).astype(np.float32),
                    _plane_matrix(values.shape[1], grid.shape[1]).astype(np.float32),
                    _plane_matrix(values.shape[2], grid.shape[2]).astype(np.float32)]
    boxes = []
    for found in ndimage.find_objects(components):
        if found is None:
            continue
        if resampled is None:
            boxes.append([(b.start, b.stop) for b in found])
        else:
            boxes.append([_rows_reading(m, b.start, b.stop) for m, b in
                          zip(matrices, found, strict=True)])
    del components
    found_lesions: list[tuple[Lesion, NDArray[np.bool_], float]] = []
    peak = 0.0
    for box in _merge_boxes(boxes, grid.shape):
        where = tuple(slice(a, b) for a, b in box)
        if resampled is None:
            mapped = np.asarray(values[where], dtype=np.float32)
        else:
            mapped = _map_box(values, matrices, box)
        peak = max(peak, float(mapped.max()))
        labels, _ = ndimage.label(mapped >= threshold, structure)
        crop = intensity[where] if intensity is not None else None
        start = (box[0][0], box[1][0], box[2][0])
        for lesion in measure_lesions(labels, grid, intensity=crop, offset=start):
            if lesion.voxels < min_voxels:
                continue
            local = tuple(slice(a - o, b - o) for (a, b), o in zip(lesion.bbox, start,
                                                                   strict=True))
            mask = np.ascontiguousarray(labels[local] == lesion.label)
            found_lesions.append((lesion, mask, float(mapped[local][mask].max())))
    found_lesions.sort(key=lambda item: (-item[0].voxels, item[0].bbox))
    return SourceLesions([SourceLesion(replace(le, label=i), mask, probability)
                          for i, (le, mask, probability) in enumerate(found_lesions, start=1)],
                         peak)


def _rows_reading(matrix: NDArray[np.float32], start: int, stop: int) -> tuple[int, int]:
    """The output rows of ``matrix`` with a tap among input columns ``start:stop``."""
    rows = np.flatnonzero(matrix[:, start:stop].any(axis=1))
    return int(rows[0]), int(rows[-1]) + 1


def _merge_boxes(boxes: list[list[tuple[int, int]]],
                 shape: tuple[int, int, int]) -> list[list[tuple[int, int]]]:
    """Merge boxes that overlap or touch (one voxel apart, 26-connected) until none do."""
    current = np.asarray(boxes, dtype=np.int64).reshape(-1, 3, 2)
    while len(current) > 1:
        lo, hi = current[:, :, 0], current[:, :, 1]
        # i and j touch when, on every axis, each starts at most one voxel after the other ends.
        touch = ((lo[:, None, :] <= hi[None, :, :]) & (lo[None, :, :] <= hi[:, None, :])).all(-1)
        groups, owner = connected_components(touch, directed=False)
        if groups == len(current):
            break
        merged = np.empty((groups, 3, 2), dtype=np.int64)
        for g in range(groups):
            members = current[owner == g]
            merged[g, :, 0] = members[:, :, 0].min(axis=0)
            merged[g, :, 1] = members[:, :, 1].max(axis=0)
        current = merged
    limit = np.asarray(shape, dtype=np.int64)
    current[:, :, 1] = np.minimum(current[:, :, 1], limit)
    return [[(int(a), int(b)) for a, b in box] for box in current]


def _map_box(values: NDArray[Any], matrices: Sequence[NDArray[np.float32]],
             box: Sequence[tuple[int, int]]) -> Float32Array:
    """:func:`to_source`'s values on one source box: the resampled voxels it reads, mapped by
    the box's rows of the three axis matrices."""
    rows = []
    reads = []
    for matrix, (a, b) in zip(matrices, box, strict=True):
        part = matrix[a:b]
        used = np.flatnonzero(part.any(axis=0))
        lo, hi = int(used[0]), int(used[-1]) + 1
        rows.append(np.ascontiguousarray(part[:, lo:hi]))
        reads.append(slice(lo, hi))
    crop = np.asarray(values[tuple(reads)], dtype=np.float32)
    # Across slices, then columns, then rows: (s, r', c') -> (S, r', c') -> (S, r', C) -> (S, R, C)
    out = np.tensordot(rows[0], crop, axes=(1, 0))
    out = np.matmul(out, rows[2].T)
    return np.asarray(np.matmul(rows[1], out), dtype=np.float32)


def window_volume(array: Float32Array, window: tuple[float, float] | None) -> Float32Array:
    """Window a ``float32`` volume of modality values to 0..1, in place (no ``float64`` copy).

    The LINEAR VOI function of PS3.3 C.11.2.1.2.1, as
    :func:`~dicom_ai.pipeline.preprocessing.apply_voi` computes it for an explicit window
    (the same numbers up to ``float32`` rounding), one slab of :data:`SLAB` slices at a time.

    Parameters
    ----------
    array : numpy.ndarray
        ``float32`` modality values (HU for CT), overwritten.
    window : tuple of float or None
        ``(center, width)``, width at least 1; None leaves the values as they are.

    Returns
    -------
    numpy.ndarray
        ``array``.

    Raises
    ------
    VolumeError
        A window narrower than 1 or an array that is not ``float32``.
    """
    if window is None:
        return array
    if array.dtype != np.float32:
        raise VolumeError(f"window_volume works in place on float32, not {array.dtype}")
    center, width = float(window[0]), float(window[1])
    if width < 1.0:
        raise VolumeError(f"window width {width} is below 1 (PS3.3 C.11.2.1.2)")
    # inside = (x - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1] (the bounds of C.11.2.1.2.1)
    scale = np.float32(1.0 / max(width - 1.0, 1e-12))
    shift = np.float32(0.5 - (center - 0.5) / max(width - 1.0, 1e-12))
    for k in range(0, array.shape[0], SLAB):
        slab = array[k:k + SLAB]  # a view: the arithmetic lands in `array`
        slab *= scale
        slab += shift
        np.clip(slab, 0.0, 1.0, out=slab)
    return array


def normalize_volume(array: Float32Array, mode: str) -> Float32Array:
    """:func:`~dicom_ai.pipeline.preprocessing.normalize` over a whole volume, in place.

    The statistics are the volume's (``minmax``: its minimum and maximum; ``zscore``: its mean
    and standard deviation, accumulated in ``float64``); a constant volume gives zeros, as
    ``normalize`` does. Slab by slab, so no second volume-sized array exists.

    Parameters
    ----------
    array : numpy.ndarray
        ``float32`` volume, overwritten.
    mode : {'minmax', 'zscore', 'none'}
        ``none`` leaves the (windowed) values as they are; ``imagenet`` needs RGB images and
        does not apply to volumes.

    Returns
    -------
    numpy.ndarray
        ``array``.

    Raises
    ------
    VolumeError
        Another mode, or an array that is not ``float32``.
    """
    if array.dtype != np.float32:
        raise VolumeError(f"normalize_volume works in place on float32, not {array.dtype}")
    if array.size == 0 or mode == "none":
        return array
    if mode == "minmax":
        lo, hi = float(array.min()), float(array.max())
        shift, scale = lo, (1.0 / (hi - lo) if hi != lo else 0.0)
    elif mode == "zscore":
        mean = float(array.mean(dtype=np.float64))
        std = float(array.std(dtype=np.float64))
        shift, scale = mean, (1.0 / std if std != 0.0 else 0.0)
    else:
        raise VolumeError(f"normalization {mode!r} does not apply to a volume")
    for k in range(0, array.shape[0], SLAB):
        slab = array[k:k + SLAB]
        slab -= np.float32(shift)
        slab *= np.float32(scale)
    return array


# -- a volume model's input: the runner's chain, also dicom-ai preview's -------------------------
def volume_window(volume: Volume, wanted: tuple[float, float] | None) -> tuple[float, float] | None:
    """The window a volume model applies: the spec's, else the first slice's LINEAR window.

    :func:`~dicom_ai.pipeline.preprocessing.linear_window_of` with the volume rules: a VOI LUT
    Sequence is ignored (the LINEAR window is used if the slice has one), a ``SIGMOID`` or
    ``LINEAR_EXACT`` function or a width below 1 gives no window (the modality values, HU for
    CT, go to the normalisation as they are). ``dicom-ai preview`` calls this too.

    Parameters
    ----------
    volume : Volume
        The loaded volume (its first slice's header is read).
    wanted : tuple of float or None
        The spec's ``window_values``.

    Returns
    -------
    tuple of float or None
        ``(center, width)`` or None.
    """
    first = volume.datasets[0] if volume.datasets else None
    return linear_window_of(first, wanted, volume=True)


def add_timing(timings: dict[str, float], stage: str, started: float) -> float:
    """Add the seconds since `started` to ``timings[stage]``; returns now (the next start)."""
    now = time.perf_counter()
    timings[stage] = timings.get(stage, 0.0) + now - started
    return now


@dataclass(frozen=True)
class VolumeInput:
    """A volume model's input, before the sliding window (:func:`prepare_volume_input`).

    Attributes
    ----------
    array : numpy.ndarray
        ``float32`` ``(slices, rows, columns)``: modality values resampled to the spec's
        ``target_spacing`` (the source grid without it), windowed and normalised -- exactly
        what the patches are cut from.
    grid : Grid
        Geometry of :attr:`array` (the resampled grid, or the source grid).
    resampled : Resampled or None
        The resampling (to map outputs back with :func:`~dicom_ai.pipeline.volume.to_source`);
        None without ``target_spacing``. Its ``array`` is :attr:`array`.
    modality : ModalityValues or None
        Modality values (HU for CT) on the source grid, when asked to keep them: read when
        needed (:func:`~dicom_ai.pipeline.volume.modality_values`), no volume-sized array.
    window : tuple of float or None
        The ``(center, width)`` applied (:func:`volume_window`), or None.
    """

    array: NDArray[np.float32]
    grid: Grid
    resampled: Resampled | None
    modality: ModalityValues | None
    window: tuple[float, float] | None


def prepare_volume_input(volume: Volume, grid: Grid, prep: PreprocessingSpec, *,
                         keep_modality: bool = True,
                         timings: dict[str, float] | None = None) -> VolumeInput:
    """Modality values -> resample to ``target_spacing`` -> window -> normalise, in ``float32``.

    The one chain from a loaded volume to a volume model's input: the job runner cuts its
    patches from the result and ``dicom-ai preview`` shows its slices, so the preview is the
    serving input. The window and normalisation run in place on the resampled array (no
    ``float64`` copy, no second volume-sized array beyond the modality values).

    Parameters
    ----------
    volume : Volume
        From :func:`~dicom_ai.pipeline.loading.load_volume`.
    grid : Grid
        ``Grid.of(volume)``.
    prep : PreprocessingSpec
        The model's preprocessing.
    keep_modality : bool
        Keep the source-grid modality values (the runner's mean HU per lesion); without,
        they are dropped as soon as they are resampled (the preview's bounded memory).
    timings : dict, optional
        Receives seconds under ``load`` (modality values), ``resample`` and ``window``.

    Returns
    -------
    VolumeInput
    """
    started = time.perf_counter()
    stages: dict[str, float] = {} if timings is None else timings
    # Converted slab by slab as resample reads it: no 300 MB float32 copy of a 300-slice CT.
    hu = modality_values(volume)
    started = add_timing(stages, "load", started)
    resampled: Resampled | None = None
    if prep.target_spacing is not None:
        resampled = resample(hu, grid, prep.target_spacing)
        model_input = resampled.array  # a new float32 array: windowed in place below
        model_grid = resampled.grid
    else:
        # `hu` stays in modality values for the lesions' mean HU, unless not wanted.
        model_input = hu.copy()  # the whole float32 array, windowed in place below
        model_grid = grid
    kept = hu if keep_modality else None
    del hu  # without keep_modality, freed here: the peak is the stored values + two grids
    started = add_timing(stages, "resample", started)
    window = volume_window(volume, prep.window_values)
    window_volume(model_input, window)
    normalize_volume(model_input, prep.normalization)
    add_timing(stages, "window", started)
    return VolumeInput(model_input, model_grid, resampled, kept, window)
