"""From model outputs back to the image: detections from segmentation maps, image-space geometry.

A model sees the image resized to its input (optionally with aspect-preserving padding, see
:func:`dicom_ai.pipeline.preprocessing.resize`). Findings must be reported in the source image's
pixel coordinates (the SR's SCOORD, the heat-map Secondary Capture), so this module inverts that
geometry: :func:`to_image_space` for maps, :func:`point_to_image` for coordinates. Segmentation
detections are the connected components of the thresholded map (:func:`detections`); a
classifier's location is the region of its thresholded heat-map around the peak
(:func:`heat_region`). Pure numpy and scikit-image: no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from skimage import measure

from dicom_ai.pipeline.preprocessing import resize
from dicom_ai.values import PreprocessingSpec

__all__ = ["Detection", "HeatRegion", "detections", "heat_region", "point_to_image",
           "to_image_space"]


def _placement(spec: PreprocessingSpec, image_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where the image sits inside the model input: (top, left, height, width)."""
    height, width = spec.input_shape
    rows, cols = image_shape
    if not spec.keep_aspect:
        return 0, 0, height, width
    # Mirrors resize(keep_aspect=True): scaled to fit, centred, odd margins bottom/right.
    scale = min(height / rows, width / cols)
    new_h = min(height, max(1, round(rows * scale)))
    new_w = min(width, max(1, round(cols * scale)))
    return (height - new_h) // 2, (width - new_w) // 2, new_h, new_w


def to_image_space(
    arr: NDArray[Any], spec: PreprocessingSpec, image_shape: tuple[int, int]
) -> NDArray[np.float32]:
    """Map a 2D array in model-input space (a heat-map, a probability map) onto the image.

    Parameters
    ----------
    arr : numpy.ndarray
        ``spec.input_shape`` array.
    spec : PreprocessingSpec
        The model's preprocessing (its input size and aspect handling).
    image_shape : tuple of int
        ``(Rows, Columns)`` of the source image.

    Returns
    -------
    numpy.ndarray
        ``float32`` of ``image_shape``: the padding is cut off and the rest resized back with the
        same anti-aliased bilinear kernel.

    Raises
    ------
    ValueError
        ``arr`` does not have the model's input shape.
    """
    if tuple(arr.shape) != tuple(spec.input_shape):
        raise ValueError(f"expected a {spec.input_shape} map, got {arr.shape}")
    top, left, height, width = _placement(spec, image_shape)
    inside = np.asarray(arr, dtype=np.float32)[top : top + height, left : left + width]
    return np.asarray(resize(inside, image_shape), dtype=np.float32)


def point_to_image(
    row: float, col: float, spec: PreprocessingSpec, image_shape: tuple[int, int]
) -> tuple[float, float]:
    """A point in model-input pixel coordinates as (row, column) in the source image.

    Coordinates are continuous with pixel centres at ``i + 0.5`` in both spaces (the resize
    convention), so the centre of the input maps to the centre of the image.

    Parameters
    ----------
    row, col : float
        Position in the model input.
    spec : PreprocessingSpec
    image_shape : tuple of int
        ``(Rows, Columns)`` of the source image.

    Returns
    -------
    tuple of float
        ``(row, column)`` in image pixels, clipped to the image.
    """
    top, left, height, width = _placement(spec, image_shape)
    rows, cols = image_shape
    out_row = (row - top) * rows / height
    out_col = (col - left) * cols / width
    return float(np.clip(out_row, 0.0, rows)), float(np.clip(out_col, 0.0, cols))


@dataclass(frozen=True)
class Detection:
    """One connected component of a thresholded segmentation map, in image coordinates.

    Attributes
    ----------
    centroid : tuple of float
        ``(row, column)`` in source-image pixels.
    bbox : tuple of float
        ``(row_min, col_min, row_max, col_max)`` in source-image pixels (max exclusive).
    area_pixels : float
        Area in source-image pixels.
    max_probability, mean_probability : float
        Of the map inside the component.
    mask : numpy.ndarray
        Boolean mask of the component in source-image space.
    """

    centroid: tuple[float, float]
    bbox: tuple[float, float, float, float]
    area_pixels: float
    max_probability: float
    mean_probability: float
    mask: NDArray[np.bool_]


def detections(
    prob_map: NDArray[Any],
    spec: PreprocessingSpec,
    image_shape: tuple[int, int],
    *,
    threshold: float,
    min_component_pixels: int,
) -> list[Detection]:
    """Connected components of ``prob_map >= threshold`` as detections in image space.

    Components are found in model-input space (8-connectivity), those smaller than
    ``min_component_pixels`` input pixels are dropped, and each is mapped to the source image.
    Sorted by maximum probability, highest first.

    Parameters
    ----------
    prob_map : numpy.ndarray
        ``spec.input_shape`` probabilities.
    spec : PreprocessingSpec
    image_shape : tuple of int
        ``(Rows, Columns)`` of the source image.
    threshold : float
        The model's operating threshold.
    min_component_pixels : int
        The spec's minimum component size.

    Returns
    -------
    list of Detection
    """
    probs = np.asarray(prob_map, dtype=np.float32)
    label = cast(Callable[..., NDArray[np.intp]], measure.label)
    regionprops = cast(Callable[..., list[Any]], measure.regionprops)
    labelled = label(probs >= threshold, connectivity=2)
    found: list[Detection] = []
    for region in regionprops(labelled):
        if region.area < min_component_pixels:
            continue
        component = labelled == region.label
        image_mask = to_image_space(component.astype(np.float32), spec, image_shape) >= 0.5
        if not image_mask.any():  # a sliver that vanished when mapped back: keep its centre
            r, c = point_to_image(region.centroid[0], region.centroid[1], spec, image_shape)
            image_mask = np.zeros(image_shape, dtype=bool)
            image_mask[min(int(r), image_shape[0] - 1), min(int(c), image_shape[1] - 1)] = True
        rows, cols = np.nonzero(image_mask)
        values = probs[component]
        found.append(Detection(
            centroid=(float(rows.mean()) + 0.5, float(cols.mean()) + 0.5),
            bbox=(float(rows.min()), float(cols.min()), float(rows.max() + 1),
                  float(cols.max() + 1)),
            area_pixels=float(image_mask.sum()),
            max_probability=float(values.max()),
            mean_probability=float(values.mean()),
            mask=image_mask,
        ))
    found.sort(key=lambda d: -d.max_probability)
    return found


@dataclass(frozen=True)
class HeatRegion:
    """Where a classifier's heat-map says a finding is: a region, not a point.

    Attributes
    ----------
    bbox : tuple of float
        ``(row_min, col_min, row_max, col_max)`` in source-image pixels (max exclusive): the
        bounding box of the region, what the SR writes as a closed POLYLINE (TID 1410).
    peak : tuple of float
        ``(row, column)`` of the heat-map's maximum in source-image pixels (kept for
        comparison: a point alone can lie centimetres off the lesion).
    area_pixels : float
        Area of the bounding box in source-image pixels.
    level : float
        The heat level the region was cut at.
    """

    bbox: tuple[float, float, float, float]
    peak: tuple[float, float]
    area_pixels: float
    level: float


def heat_region(
    heat: NDArray[Any],
    spec: PreprocessingSpec,
    image_shape: tuple[int, int],
    *,
    relative: float = 0.5,
) -> HeatRegion | None:
    """The region of a heat-map (model-input space) that holds its peak, in image coordinates.

    The map is cut at ``relative`` times its peak (half maximum by default: independent of the
    map's scale, so the same for peak-scaled and probability-scaled Grad-CAM). The region is
    the 8-connected component of the cut that holds the peak, mapped back to the source image
    as a bounding box (PS3.3 C.18.6.1.2 closed POLYLINE when written).

    Parameters
    ----------
    heat : numpy.ndarray
        ``spec.input_shape`` heat values in [0, 1].
    spec : PreprocessingSpec
        The model's preprocessing (input size, aspect handling).
    image_shape : tuple of int
        ``(Rows, Columns)`` of the source image.
    relative : float
        Fraction of the peak to cut at, in (0, 1].

    Returns
    -------
    HeatRegion or None
        None for an all-zero (or non-finite) map.

    Raises
    ------
    ValueError
        ``heat`` does not have the model's input shape, or ``relative`` is outside (0, 1].
    """
    if not 0.0 < relative <= 1.0:
        raise ValueError(f"relative must be in (0, 1], not {relative}")
    values = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    if tuple(values.shape) != tuple(spec.input_shape):
        raise ValueError(f"expected a {spec.input_shape} map, got {values.shape}")
    peak_value = float(values.max())
    if peak_value <= 0.0:
        return None
    level = relative * peak_value
    r, c = np.unravel_index(int(np.argmax(values)), values.shape)
    label = cast(Callable[..., NDArray[np.intp]], measure.label)
    labelled = label(values >= level, connectivity=2)
    rows, cols = np.nonzero(labelled == labelled[r, c])
    # Pixel edges in input space (max exclusive), mapped like points (pixel centres at i + 0.5).
    top, left = point_to_image(float(rows.min()), float(cols.min()), spec, image_shape)
    bottom, right = point_to_image(float(rows.max() + 1), float(cols.max() + 1), spec,
                                   image_shape)
    peak = point_to_image(r + 0.5, c + 0.5, spec, image_shape)
    return HeatRegion(bbox=(top, left, bottom, right), peak=peak,
                      area_pixels=float((bottom - top) * (right - left)), level=level)
