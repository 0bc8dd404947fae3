"""Training-time data augmentation: random geometric transforms with Keras 3 preprocessing layers.

:class:`AugmentationSpec` is what a training run records (and what ``--augment`` parses,
:func:`parse_augment`); :func:`build_augmenter` turns it into a ``keras.Sequential`` of
``RandomRotation``, ``RandomTranslation``, ``RandomShear``, ``RandomZoom`` and, only when asked,
``RandomFlip("horizontal")``. Like every Keras preprocessing layer they are the identity unless
called with ``training=True``. For segmentation, :func:`augment_pair` applies the *same* draw to
images and masks.

Horizontal flips are off by default: in chest (and most) images laterality is anatomy (the heart
is on the patient's left), so a mirrored image is not a plausible patient. :func:`flip_allowed`
names the body parts where mirroring is plausible (paired limbs and joints).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras

__all__ = [
    "SYMMETRIC_BODY_PARTS",
    "AugmentationSpec",
    "augment_pair",
    "build_augmenter",
    "flip_allowed",
    "format_augment",
    "parse_augment",
]

FillMode = Literal["constant", "nearest", "reflect", "wrap"]


class AugmentationSpec(BaseModel):
    """Random geometric augmentation of training images.

    Ranges are symmetric: each image draws a value uniformly in ``[-x, x]``.

    Attributes
    ----------
    enabled : bool
        False: no augmentation at all.
    rotation : float
        Maximum rotation in degrees, ``[0, 180]``.
    width_shift, height_shift : float
        Maximum translation as a fraction of the width / height, ``[0, 1]``.
    shear : float
        Shear intensity: the horizontal shear factor ``tan(angle)``, ``[0, 1]`` (Keras 1's
        ``ImageDataGenerator`` took the angle in radians, the same for small values: 0.1 is about
        5.7 degrees). Keras 3's ``RandomShear`` shears about the image origin, so it also shifts
        the image by up to ``shear`` times its height.
    zoom : float
        Maximum zoom as a fraction, ``[0, 1)``: 0.1 scales by 0.9 to 1.1 (aspect ratio kept).
    horizontal_flip : bool
        Mirror left-right half of the time. Off by default: laterality matters in chest images
        (see :func:`flip_allowed`).
    fill_mode : {"constant", "nearest", "reflect", "wrap"}
        How pixels outside the source image are filled.
    fill_value : float
        The fill for ``fill_mode="constant"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    rotation: float = Field(default=10.0, ge=0.0, le=180.0)
    width_shift: float = Field(default=0.1, ge=0.0, le=1.0)
    height_shift: float = Field(default=0.1, ge=0.0, le=1.0)
    shear: float = Field(default=0.1, ge=0.0, le=1.0)
    zoom: float = Field(default=0.1, ge=0.0, lt=1.0)
    horizontal_flip: bool = False
    fill_mode: FillMode = "constant"
    fill_value: float = Field(default=0.0, allow_inf_nan=False)


def parse_augment(text: str) -> AugmentationSpec:
    """Parse the ``--augment`` command-line syntax.

    Parameters
    ----------
    text : str
        ``"none"`` (no augmentation), ``"default"`` (the :class:`AugmentationSpec` defaults) or
        comma-separated ``key=value`` pairs overriding the defaults, e.g.
        ``"rotation=15,zoom=0.2,horizontal_flip=true,fill_mode=nearest"``. Booleans accept
        true/false, yes/no, on/off, 1/0.

    Returns
    -------
    AugmentationSpec

    Raises
    ------
    ValueError
        Empty text, a pair without ``=``, a repeated or unknown key, or a bad value (the message
        names the key).
    """
    stripped = text.strip()
    if stripped.lower() == "none":
        return AugmentationSpec(enabled=False)
    if stripped.lower() == "default":
        return AugmentationSpec()
    if not stripped:
        raise ValueError("empty augmentation: use 'none', 'default' or key=value pairs")
    fields = AugmentationSpec.model_fields
    values: dict[str, str] = {}
    for item in stripped.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"augmentation item {item.strip()!r} is not key=value")
        if key not in fields:
            raise ValueError(f"unknown augmentation key {key!r}; valid: {', '.join(fields)}")
        if key in values:
            raise ValueError(f"augmentation key {key!r} given twice")
        values[key] = value.strip()
    try:
        # Lax-mode validation converts the strings ("15", "true", "nearest") and checks ranges.
        return AugmentationSpec.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "?"
        raise ValueError(
            f"bad augmentation value {key}={values.get(key, '')!r}: {error['msg']}"
        ) from None


def format_augment(spec: AugmentationSpec) -> str:
    """The ``--augment`` text of a spec: ``parse_augment(format_augment(s)) == s``.

    Parameters
    ----------
    spec : AugmentationSpec

    Returns
    -------
    str
        ``"none"``, ``"default"`` or the ``key=value`` pairs that differ from the defaults.
    """
    if not spec.enabled:
        return "none"
    changed = spec.model_dump(exclude_defaults=True)
    if not changed:
        return "default"
    return ",".join(
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in changed.items()
    )


#: Body Part Examined (0018,0015) values where a left-right mirror image is still a plausible
#: image of the same kind: paired limbs and joints (a mirrored left knee looks like a right knee).
#: Everything else (CHEST, ABDOMEN, HEAD, SPINE, unknown, ...) has anatomical laterality.
SYMMETRIC_BODY_PARTS: frozenset[str] = frozenset(
    {
        "ANKLE", "ARM", "ELBOW", "EXTREMITY", "FINGER", "FOOT", "FOREARM", "HAND", "HEEL",
        "HIP", "KNEE", "LEG", "LOWER_LIMB", "SHOULDER", "THIGH", "THUMB", "TOE", "UPPER_LIMB",
        "WRIST",
    }
)  # fmt: skip


def flip_allowed(body_part: str | None) -> bool:
    """Whether horizontal flips are plausible augmentation for this body part.

    Parameters
    ----------
    body_part : str or None
        Body Part Examined (0018,0015), any case; spaces count as underscores.

    Returns
    -------
    bool
        True only for :data:`SYMMETRIC_BODY_PARTS`; False for CHEST, everything else and None.
    """
    if body_part is None:
        return False
    return body_part.strip().upper().replace(" ", "_") in SYMMETRIC_BODY_PARTS


def build_augmenter(spec: AugmentationSpec, *, seed: int) -> Any:
    """The augmentation layers of a spec.

    Parameters
    ----------
    spec : AugmentationSpec
        What to draw; a disabled spec (or all ranges zero) gives an identity model.
    seed : int
        Seed of the random draws (each layer gets its own, derived from it): two augmenters built
        with the same seed produce the same sequence of transforms.

    Returns
    -------
    keras.Sequential
        Call it on ``(N, H, W, C)`` float batches with ``training=True`` to augment; with
        ``training=False`` it returns its input unchanged. Inside a model it follows the model's
        mode (augments in ``fit``, identity in ``predict`` / ``evaluate``); called directly
        without ``training``, Keras 3's image layers default to *augmenting*, so pass it.
    """
    fill = {"fill_mode": spec.fill_mode, "fill_value": spec.fill_value}
    layers: list[Any] = []
    if spec.enabled:
        if spec.rotation > 0:
            # RandomRotation's factor is a fraction of a full turn.
            layers.append(
                keras.layers.RandomRotation(
                    spec.rotation / 360.0, seed=seed, name="rotation", **fill
                )
            )
        if spec.width_shift > 0 or spec.height_shift > 0:
            layers.append(
                keras.layers.RandomTranslation(
                    spec.height_shift, spec.width_shift, seed=seed + 1, name="translation", **fill
                )
            )
        if spec.shear > 0:
            layers.append(
                keras.layers.RandomShear(
                    x_factor=spec.shear, y_factor=0.0, seed=seed + 2, name="shear", **fill
                )
            )
        if spec.zoom > 0:
            layers.append(keras.layers.RandomZoom(spec.zoom, seed=seed + 3, name="zoom", **fill))
        if spec.horizontal_flip:
            layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 4, name="flip"))
    if not layers:
        layers.append(keras.layers.Identity(name="identity"))
    return keras.Sequential(layers, name="augmenter")


def augment_pair(
    augmenter: Any,
    images: Any,
    masks: Any,
    *,
    fill_value: float | None = None,
) -> tuple[Any, Any]:
    """Augment images and their segmentation masks with the same geometric transform.

    Images and masks are concatenated on the channel axis, augmented in one call (one draw per
    sample) and split again; masks are re-binarised at 0.5 (interpolation blurs their edges).
    Works eagerly and inside ``tf.data`` / ``tf.function``.

    Parameters
    ----------
    augmenter : keras.Sequential
        From :func:`build_augmenter`.
    images : array or tensor
        ``(N, H, W, C)`` float.
    masks : array or tensor
        ``(N, H, W, K)`` with values in {0, 1}.
    fill_value : float, optional
        The spec's ``fill_value`` (default: read from the augmenter's layers): masks are offset
        by it so that constant fill reads as background (0) in the masks whatever the image fill
        is.

    Returns
    -------
    tuple
        ``(images, masks)`` float32 tensors of the input shapes; masks in {0, 1}.
    """
    images = keras.ops.cast(images, "float32")
    masks = keras.ops.cast(masks, "float32")
    if fill_value is None:
        fill_value = next(
            (float(layer.fill_value) for layer in augmenter.layers if hasattr(layer, "fill_value")),
            0.0,
        )
    channels = images.shape[-1]
    if channels is None:
        raise ValueError("augment_pair needs a known channel count")
    # Interpolation and every fill mode are affine in the pixel values, so shifting the masks by
    # the fill value and back maps constant fill to 0 exactly.
    stacked = keras.ops.concatenate([images, masks + fill_value], axis=-1)
    augmented = augmenter(stacked, training=True)
    out_images = augmented[..., :channels]
    out_masks = keras.ops.cast(augmented[..., channels:] - fill_value >= 0.5, "float32")
    return out_images, out_masks
