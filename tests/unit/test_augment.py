"""Augmentation: the spec and its CLI syntax, the Keras augmenter, paired image/mask transforms."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dicom_ai.training.augment import (
    AugmentationSpec,
    augment_pair,
    build_augmenter,
    flip_allowed,
    format_augment,
    parse_augment,
)

Array = np.ndarray[Any, Any]


def _square_batch(n: int, size: int = 64) -> Array:
    """Bright 16x16 squares, off-centre, on a dark background."""
    images = np.zeros((n, size, size, 1), np.float32)
    images[:, 16:32, 20:36] = 1.0
    return images


def test_parse_keywords_and_pairs() -> None:
    assert parse_augment("none") == AugmentationSpec(enabled=False)
    assert parse_augment(" Default ") == AugmentationSpec()
    spec = parse_augment("rotation=15, zoom=0.2,horizontal_flip=true,fill_mode=nearest")
    assert spec == AugmentationSpec(
        rotation=15.0, zoom=0.2, horizontal_flip=True, fill_mode="nearest"
    )
    assert parse_augment("shear=0,fill_value=-1.5,horizontal_flip=no").fill_value == -1.5


@pytest.mark.parametrize(
    "spec",
    [
        AugmentationSpec(),
        AugmentationSpec(enabled=False),
        AugmentationSpec(rotation=0.0, width_shift=0.25, horizontal_flip=True, fill_value=0.5),
        AugmentationSpec(fill_mode="reflect", shear=0.3, zoom=0.0),
    ],
)
def test_format_parse_round_trip(spec: AugmentationSpec) -> None:
    assert parse_augment(format_augment(spec)) == spec


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("rotation=abc", "rotation"),
        ("rotation=181", "rotation"),
        ("zoom=1.0", "zoom"),
        ("width_shift=-0.1", "width_shift"),
        ("fill_mode=mirror", "fill_mode"),
        ("horizontal_flip=maybe", "horizontal_flip"),
        ("fill_value=nan", "fill_value"),
        ("brightness=0.2", "brightness"),
        ("zoom", "zoom"),
        ("zoom=0.1,zoom=0.2", "zoom"),
    ],
)
def test_parse_errors_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        parse_augment(text)


def test_spec_is_frozen_and_strict() -> None:
    spec = AugmentationSpec()
    with pytest.raises(ValidationError):
        spec.rotation = 5.0
    with pytest.raises(ValidationError):
        AugmentationSpec(vertical_flip=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="empty"):
        parse_augment("  ")


def test_flip_allowed_only_for_paired_limbs() -> None:
    assert not flip_allowed("CHEST")
    assert not flip_allowed(None)
    assert not flip_allowed("ABDOMEN")
    assert not flip_allowed("")
    assert flip_allowed("knee")
    assert flip_allowed(" HAND ")
    assert flip_allowed("upper limb")


def test_augmenter_changes_images_only_in_training_mode() -> None:
    augmenter = build_augmenter(AugmentationSpec(), seed=0)
    images = _square_batch(8)
    trained = np.asarray(augmenter(images, training=True))
    assert trained.shape == images.shape
    assert all(not np.allclose(trained[i], images[i]) for i in range(len(images)))
    np.testing.assert_array_equal(np.asarray(augmenter(images, training=False)), images)


def test_disabled_spec_is_identity() -> None:
    images = _square_batch(2)
    for spec in (AugmentationSpec(enabled=False), parse_augment("none")):
        out = build_augmenter(spec, seed=0)(images, training=True)
        np.testing.assert_array_equal(np.asarray(out), images)


def test_same_seed_same_draws() -> None:
    images = _square_batch(4)
    spec = AugmentationSpec(rotation=20.0, horizontal_flip=True)
    first = build_augmenter(spec, seed=42)
    second = build_augmenter(spec, seed=42)
    for _ in range(2):  # the same sequence of draws, not only the first
        np.testing.assert_array_equal(
            np.asarray(first(images, training=True)), np.asarray(second(images, training=True))
        )
    other = build_augmenter(spec, seed=43)(images, training=True)
    assert not np.allclose(np.asarray(other), np.asarray(first(images, training=True)))


def _left_fraction(images: Array) -> Array:
    width = images.shape[2]
    left = images[:, :, : width // 2].sum(axis=(1, 2, 3))
    return np.asarray(left / images.sum(axis=(1, 2, 3)))


def test_no_mirroring_without_horizontal_flip() -> None:
    # Mass mostly on the left (a "heart"): rotation, shift, shear and zoom never move it right.
    images = np.zeros((64, 64, 64, 1), np.float32)
    images[:, 16:48, 6:26] = 1.0
    images[:, 28:36, 38:44] = 0.5
    augmenter = build_augmenter(AugmentationSpec(), seed=1)
    fractions = np.concatenate(
        [_left_fraction(np.asarray(augmenter(images, training=True))) for _ in range(3)]
    )
    assert fractions.min() > 0.7
    flipping = build_augmenter(AugmentationSpec(horizontal_flip=True), seed=1)
    flipped = _left_fraction(np.asarray(flipping(images, training=True)))
    assert (flipped < 0.3).sum() > 10  # about half are mirrored when asked


@pytest.mark.parametrize("fill_value", [0.0, 1.0])
def test_augment_pair_keeps_image_and_mask_aligned(fill_value: float) -> None:
    images = _square_batch(16) * 0.8 + 0.1
    masks = _square_batch(16)
    spec = AugmentationSpec(rotation=20.0, width_shift=0.2, zoom=0.2, fill_value=fill_value)
    # The fill value comes from the augmenter's layers (as train.py calls it).
    out_images, out_masks = augment_pair(build_augmenter(spec, seed=5), images, masks)
    aug_images, aug_masks = np.asarray(out_images), np.asarray(out_masks)
    assert aug_images.shape == images.shape
    assert aug_masks.shape == masks.shape
    assert set(np.unique(aug_masks)) <= {0.0, 1.0}
    assert not np.allclose(aug_masks, masks)  # it did move
    for image, mask in zip(aug_images, aug_masks, strict=True):
        square = image[..., 0] > 0.5  # the bright square (0.9) vs background (0.1) or fill
        if fill_value == 0.0:
            inter = np.logical_and(square, mask[..., 0] > 0).sum()
            union = np.logical_or(square, mask[..., 0] > 0).sum()
            assert inter / union > 0.85
        # The image fill never becomes foreground in the mask.
        assert mask.sum() <= 1.5 * masks[0].sum()
        assert mask.sum() >= 0.5 * masks[0].sum()
