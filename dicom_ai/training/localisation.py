"""Localisation accuracy of a classifier's heat-map regions against ground-truth lesion masks.

The service reports where a present finding is as the half-maximum region of its Grad-CAM map
(:func:`dicom_ai.inference.postprocess.heat_region`), a bounding box written as a TID 1410
SCOORD POLYLINE; it used to report the map's peak as a POINT. This module measures both on
images whose lesions are known (``dicom-ai synth`` writes a mask per positive image):

* **region hit rate**: share of true positives whose box overlaps a lesion;
* **point hit rate**: share of true positives whose peak lies inside a lesion;
* the peak's distance to the nearest lesion pixel (mm), and the box's size as a share of the
  image (a box the size of the image would always "hit": the size says what a hit is worth),
  with the hit rate of a box of the same size placed at random (seeded) as the chance level.

Everything is computed in model-input space, where the map and the resized mask live; the
service maps the same box to the source image with the same geometry, so the figures carry over.
Pure numpy: the maps are computed by the caller (:func:`dicom_ai.training.evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from dicom_ai.inference.postprocess import heat_region
from dicom_ai.values import PreprocessingSpec

__all__ = ["localisation_report"]


def localisation_report(
    heatmaps: Sequence[NDArray[Any]],
    masks: Sequence[NDArray[Any]],
    spec: PreprocessingSpec,
    *,
    mm_per_pixel: Sequence[float] | None = None,
    relative: float = 0.5,
    positives: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Hit rates of heat-map regions and peaks on true-positive images.

    Parameters
    ----------
    heatmaps : sequence of numpy.ndarray
        One ``spec.input_shape`` map per true-positive image.
    masks : sequence of numpy.ndarray
        The images' lesion masks in the same space (non-zero = lesion).
    spec : PreprocessingSpec
        The model's preprocessing (its input shape).
    mm_per_pixel : sequence of float, optional
        Size of one model-input pixel in mm per image (for the peak distance).
    relative : float
        The region's cut, a fraction of the map's peak (the service's default 0.5).
    positives : int, optional
        All positive images, true positives or not (recorded for context).
    seed : int
        Seeds the random placements of the chance-level boxes (10 per image).

    Returns
    -------
    dict
        ``true_positives``, ``region_hit_rate``, ``point_hit_rate``,
        ``region_area_fraction_median`` (box area / image area), ``region_hit_rate_random``
        (the same boxes placed at random: the chance level), ``point_distance_mm_median``
        and ``point_distance_mm_max`` (0 inside a lesion; None without ``mm_per_pixel``),
        ``cut`` and, when given, ``positives``.

    Raises
    ------
    ValueError
        Different numbers of maps, masks and spacings, or an image without a lesion.
    """
    if len(heatmaps) != len(masks) or (mm_per_pixel is not None
                                       and len(mm_per_pixel) != len(masks)):
        raise ValueError("one map, one mask (and one spacing) per image")
    shape = tuple(spec.input_shape)
    region_hits = point_hits = 0
    random_hits = 0.0
    rng = np.random.default_rng(seed)
    fractions: list[float] = []
    distances: list[float] = []
    for n, (heat, mask_array) in enumerate(zip(heatmaps, masks, strict=True)):
        mask = np.asarray(mask_array) > 0
        if mask.shape != shape or not mask.any():
            raise ValueError(f"image {n}: a lesion mask of shape {shape} is needed")
        region = heat_region(heat, spec, (shape[0], shape[1]), relative=relative)
        if region is None:  # an all-zero map: no region, a miss
            fractions.append(0.0)
            distances.append(float("inf"))
            continue
        r0, c0, r1, c1 = (round(v) for v in region.bbox)
        box = np.zeros(shape, dtype=bool)
        box[r0:r1, c0:c1] = True
        region_hits += bool((box & mask).any())
        height, width = r1 - r0, c1 - c0
        for _ in range(10):
            top = int(rng.integers(0, shape[0] - height + 1))
            left = int(rng.integers(0, shape[1] - width + 1))
            random_hits += bool(mask[top : top + height, left : left + width].any()) / 10
        fractions.append(float(box.mean()))
        row, col = (min(int(v), size - 1) for v, size in zip(region.peak, shape, strict=True))
        point_hits += bool(mask[row, col])
        # Distance of every pixel to the nearest lesion pixel, in pixels.
        to_lesion = ndimage.distance_transform_edt(~mask)
        scale = 1.0 if mm_per_pixel is None else float(mm_per_pixel[n])
        distances.append(float(to_lesion[row, col]) * scale)
    count = len(masks)
    result: dict[str, Any] = {}
    if positives is not None:
        result["positives"] = positives
    finite = [d for d in distances if np.isfinite(d)]
    result.update({
        "true_positives": count,
        "region_hit_rate": region_hits / count if count else None,
        "point_hit_rate": point_hits / count if count else None,
        "region_area_fraction_median": float(np.median(fractions)) if count else None,
        "region_hit_rate_random": random_hits / count if count else None,
        "point_distance_mm_median": (float(np.median(distances))
                                     if count and mm_per_pixel is not None else None),
        "point_distance_mm_max": (max(finite) if finite and mm_per_pixel is not None
                                  else None),
        "cut": relative,
    })
    return result
