"""Model outputs back in image space: maps, points and segmentation detections."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from dicom_ai.inference.postprocess import detections, point_to_image, to_image_space
from dicom_ai.pipeline.preprocessing import resize
from dicom_ai.values import PreprocessingSpec


def disk(shape: tuple[int, int], center: tuple[float, float], radius: float) -> NDArray[Any]:
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]]
    inside: NDArray[Any] = (rr + 0.5 - center[0]) ** 2 + (cc + 0.5 - center[1]) ** 2 <= radius**2
    return inside.astype(np.float32)


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_a_lesion_comes_back_where_it_was(keep_aspect: bool) -> None:
    """Image -> model input (resize) -> detection -> image: the same place and size."""
    spec = PreprocessingSpec(input_shape=(64, 64), channels=1, keep_aspect=keep_aspect)
    image_shape = (300, 200)
    truth = disk(image_shape, (90.0, 140.0), 20.0)
    model_space = resize(truth, spec.input_shape, keep_aspect=keep_aspect)
    found = detections(model_space, spec, image_shape, threshold=0.5, min_component_pixels=2)
    assert len(found) == 1
    detection = found[0]
    assert detection.centroid == pytest.approx((90.0, 140.0), abs=3.0)
    assert detection.area_pixels == pytest.approx(truth.sum(), rel=0.2)
    assert detection.bbox == pytest.approx((70, 120, 110, 160), abs=4)
    overlap = (detection.mask & (truth > 0)).sum() / truth.sum()
    assert overlap > 0.8
    assert detection.max_probability == pytest.approx(1.0, abs=1e-5)


def test_small_components_are_dropped_and_order_is_by_probability() -> None:
    spec = PreprocessingSpec(input_shape=(32, 32), channels=1)
    probs = np.zeros((32, 32), np.float32)
    probs[2:6, 2:6] = 0.7
    probs[20:26, 20:26] = 0.95
    probs[12, 12] = 0.99  # one pixel: below the minimum size
    found = detections(probs, spec, (64, 64), threshold=0.5, min_component_pixels=4)
    assert [round(d.max_probability, 2) for d in found] == [0.95, 0.7]
    assert found[0].centroid == pytest.approx((46.0, 46.0), abs=1.0)


def test_maps_and_points_invert_the_padding() -> None:
    spec = PreprocessingSpec(input_shape=(64, 64), channels=1, keep_aspect=True)
    # A 100x200 image fills the width: 32 rows of image, 16 rows of padding above and below.
    assert point_to_image(32.0, 32.0, spec, (100, 200)) == pytest.approx((50.0, 100.0))
    assert point_to_image(16.0, 0.0, spec, (100, 200)) == pytest.approx((0.0, 0.0))
    heat = np.zeros((64, 64), np.float32)
    heat[16:48, 32:] = 1.0  # the right half of the image part
    back = to_image_space(heat, spec, (100, 200))
    assert back.shape == (100, 200)
    assert back[:, 110:].min() > 0.99
    assert back[:, :90].max() < 0.01
    with pytest.raises(ValueError, match="expected a"):
        to_image_space(np.zeros((10, 10)), spec, (100, 200))
