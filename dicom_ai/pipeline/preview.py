"""Preview what a model would receive: a preprocessing spec applied to a file or series, as a PNG.

* :func:`load_spec` -- a :class:`~dicom_ai.values.PreprocessingSpec` from a TOML or
  JSON file (a ``[preprocessing]`` table, or the bare spec).
* :func:`model_inputs` -- the model input arrays of one file or series, and the steps applied, in
  words.
* :func:`write_preview` -- a PNG of those arrays (one image, or a montage of slices).
* :func:`preview` -- the three together, for a file or a folder of files.

Errors of loading and preprocessing (:class:`~dicom_ai.pipeline.loading.DecodeError`, among them
:class:`~dicom_ai.pipeline.loading.PixelLimitError` for an image above ``[limits]``,
:class:`~dicom_ai.pipeline.loading.LoadError`,
:class:`~dicom_ai.pipeline.preprocessing.PreprocessingError`) propagate with their messages.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom

from dicom_ai.config import LimitsSettings
from dicom_ai.exceptions import ConfigError
from dicom_ai.pipeline.loading import LoadError, Volume, load_frames, load_volume
from dicom_ai.pipeline.preprocessing import (
    COLOUR_INTERPRETATIONS,
    GREY_INTERPRETATIONS,
    PreprocessingError,
    preprocess_frame,
)
from dicom_ai.pipeline.volume import (
    Grid,
    VolumeError,
    forms_volume,
    modality_volume,
    patch_starts,
    prepare_volume_input,
    resample,
)
from dicom_ai.values import WINDOW_PRESETS, PreprocessingSpec, Window

__all__ = [
    "MONTAGE_SLICES",
    "SpecError",
    "VolumeMontage",
    "load_spec",
    "model_inputs",
    "preview",
    "volume_montage",
    "write_preview",
]

#: Slices a volume model's montage shows, evenly spaced from the first to the last.
MONTAGE_SLICES = 16

class SpecError(ConfigError):
    """A preprocessing spec file is missing, unreadable or invalid; the message names the key."""


# -- the spec ---------------------------------------------------------------------------------
def load_spec(path: Path) -> PreprocessingSpec:
    """Read a preprocessing spec from a TOML or JSON file.

    The file holds a ``[preprocessing]`` table (``{"preprocessing": {...}}`` in JSON) or the spec's
    keys at the top level. Files ending in ``.json`` are read as JSON, all others as TOML.

    Parameters
    ----------
    path : Path
        The spec file.

    Returns
    -------
    PreprocessingSpec

    Raises
    ------
    SpecError
        The file is missing or not valid TOML/JSON, or a key is unknown or has a bad value (the
        message names the key, e.g. ``preprocessing.input_shape``).
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        raw: Any = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSON and TOML errors too
        raise SpecError(f"cannot read spec file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {path}: expected a table of settings, got {type(raw).__name__}")
    prefix: tuple[str, ...] = ()
    if "preprocessing" in raw:
        if set(raw) != {"preprocessing"}:
            extra = sorted(set(raw) - {"preprocessing"})
            raise SpecError(f"invalid spec in {path}: {', '.join(extra)}: unexpected key next to "
                            "the [preprocessing] table")
        raw, prefix = raw["preprocessing"], ("preprocessing",)
        if not isinstance(raw, dict):
            raise SpecError(f"invalid spec in {path}: preprocessing: must be a table")
    try:
        return PreprocessingSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in (*prefix, *err['loc'])) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SpecError(f"invalid spec in {path}: {problems}") from None


# -- model inputs -----------------------------------------------------------------------------
def model_inputs(
    paths: list[Path], spec: PreprocessingSpec, *, limits: LimitsSettings | None = None
) -> tuple[list[NDArray[np.float32]], list[str]]:
    """The model inputs of one file or one series, and the steps applied, in words.

    A volume model (``input_kind`` ``volume`` or ``slices``) gets :func:`volume_montage`: the
    series loaded as a volume and run through the job runner's own chain
    (:func:`~dicom_ai.pipeline.volume.prepare_volume_input`: HU, resample to ``target_spacing``,
    window, normalise), shown as :data:`MONTAGE_SLICES` evenly spaced slices of the model input,
    the steps ending with the sliding window's patch count; files that are not a CT or MR volume
    are refused, as serving skips them. A bare spec of a 2D input with ``target_spacing`` and
    files forming a volume (CT or MR with Image Position (Patient), more than one slice --
    several files, or an enhanced multi-frame object) has the volume resampled the same way
    (``float32``) and each resampled slice preprocessed as an image. Otherwise every frame from
    :func:`~dicom_ai.pipeline.loading.load_frames` goes through
    :func:`~dicom_ai.pipeline.preprocessing.preprocess_frame`.

    Parameters
    ----------
    paths : list of Path
        One file, or the files of one series.
    spec : PreprocessingSpec
        What the model expects.
    limits : LimitsSettings, optional
        ``[limits]``: a file declaring more pixels or bytes is refused before decoding
        (default: the ``[limits]`` defaults).

    Returns
    -------
    arrays : list of numpy.ndarray
        ``float32`` arrays of shape ``(*spec.input_shape, spec.channels)``, one per frame or slice;
        for a volume model ``(rows, columns)`` slices of its input (the montage's tiles).
    steps : list of str
        The steps applied, e.g. ``'modality LUT: slope 1 intercept -1024'``; a step that differs
        between frames is listed once per variant.

    Raises
    ------
    LoadError, DecodeError, PreprocessingError
        From loading and preprocessing, with their messages (``PixelLimitError``, a
        ``DecodeError``, above `limits`).
    """
    if not paths:
        raise LoadError("no files to preview")
    if spec.input_kind != "image":
        why = _why_not_volume(paths)
        if why is not None:  # as serving skips such a series
            raise LoadError(f"a {spec.input_kind} model takes a CT or MR volume: {why}")
        montage = volume_montage(paths, spec, limits=limits)
        return montage.tiles, montage.steps
    if spec.target_spacing is not None and _why_not_volume(paths) is None:
        return _resampled_slices(paths, spec, limits)
    frames = load_frames(paths, limits=limits)
    arrays: list[NDArray[np.float32]] = []
    steps: list[str] = []
    if len(frames) > 1:
        files = len({id(frame.dataset) for frame in frames})
        steps.append(f"frames: {len(frames)} from {files} file{'s' if files > 1 else ''}")
    for frame in frames:
        arrays.append(preprocess_frame(frame.array, frame.dataset, spec))
        _extend_unique(steps, _describe_frame(frame.array, frame.dataset, spec))
    return arrays, steps


def _why_not_volume(paths: Sequence[Path]) -> str | None:
    """Why the files are not a volume (:func:`~dicom_ai.pipeline.volume.forms_volume`, read from
    the headers only), or None when they are one."""
    headers: list[Dataset] = []
    for path in paths:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise LoadError(f"cannot read {Path(path).name}: {exc}") from exc
    return forms_volume(headers)


@dataclass(frozen=True)
class VolumeMontage:
    """What :func:`volume_montage` shows of a volume model's input.

    Attributes
    ----------
    tiles : list of numpy.ndarray
        ``float32`` ``(rows, columns)`` slices of the model input (resampled, windowed,
        normalised: the numbers the patches are cut from), evenly spaced along the volume.
    indices : list of int
        Each tile's slice index in the model input.
    positions : list of tuple of float
        Each tile's first voxel in patient coordinates (mm, PS3.3 C.7.6.2.1.1); its ``z`` is the
        axial position of an axial slice.
    shape : tuple of int
        ``(slices, rows, columns)`` of the whole model input.
    steps : list of str
        The steps applied, in words.
    """

    tiles: list[NDArray[np.float32]]
    indices: list[int]
    positions: list[tuple[float, float, float]]
    shape: tuple[int, int, int]
    steps: list[str]


def volume_montage(paths: Sequence[Path], spec: PreprocessingSpec, *,
                   limits: LimitsSettings | None = None,
                   slices: int = MONTAGE_SLICES) -> VolumeMontage:
    """A volume model's input as the job runner makes it, and evenly spaced slices of it.

    :func:`~dicom_ai.pipeline.loading.load_volume`, then
    :func:`~dicom_ai.pipeline.volume.prepare_volume_input` -- the runner's own chain: modality
    values in ``float32`` (HU for CT), resampled to ``target_spacing``, the spec's window (else
    the slices' LINEAR window, :func:`~dicom_ai.pipeline.volume.volume_window`), the spec's
    normalisation over the whole volume -- and the patch grid of the sliding window
    (:func:`~dicom_ai.pipeline.volume.patch_starts`), counted, not run. The stored values are
    dropped once converted and the modality values once resampled: a 300 x 512 x 512 CT at
    1 mm needs well under 2 GB.

    Parameters
    ----------
    paths : sequence of Path
        The files of one series (or one enhanced multi-frame object).
    spec : PreprocessingSpec
        A volume model's preprocessing (``input_kind`` ``volume`` or ``slices``).
    limits : LimitsSettings, optional
        ``[limits]``, checked before decoding.
    slices : int
        Tiles to show (all slices when the volume has fewer).

    Returns
    -------
    VolumeMontage

    Raises
    ------
    LoadError, DecodeError
        From loading.
    PreprocessingError
        A spec that is not a volume model's, or the volume core refusing it.
    """
    if spec.input_kind == "image":
        raise PreprocessingError("a volume montage needs input_kind 'volume' or 'slices'")
    volume: Volume = load_volume(paths, limits=limits)
    grid = Grid.of(volume)
    steps = [f"load: {grid.shape[0]} slices of {grid.shape[1]}x{grid.shape[2]}, spacing "
             f"{_mm(grid.spacing)} mm (slice, row, column)"]
    steps.extend(f"volume warning: {warning}" for warning in volume.warnings)
    modality_steps: list[str] = []
    for arr, ds in zip(volume.array, volume.datasets, strict=True):
        _extend_unique(modality_steps, _describe_grey_prefix(arr, ds))
    steps.extend(step.replace("modality LUT:", "HU (modality LUT):", 1)
                 if _is_ct(volume) else step for step in modality_steps)
    try:
        prepared = prepare_volume_input(volume, grid, spec, keep_modality=False)
    except VolumeError as exc:
        raise PreprocessingError(str(exc)) from exc
    first = volume.datasets[0] if volume.datasets else None
    del volume  # the stored values: only the model input is needed from here
    model = prepared.array
    shape = (int(model.shape[0]), int(model.shape[1]), int(model.shape[2]))
    if spec.target_spacing is not None:
        steps.append(f"resample to target_spacing {_mm(spec.target_spacing)} mm: "
                     f"{_shape(grid.shape)} -> {_shape(shape)} "
                     f"(spacing {_mm(prepared.grid.spacing)} mm)")
    else:
        steps.append(f"resample: none (no target_spacing): the series' grid {_shape(shape)}")
    steps.append(_describe_volume_window(spec, prepared.window, first))
    steps.append(_describe_volume_normalisation(spec.normalization))
    steps.append(_describe_patches(shape, spec))
    count = max(1, min(int(slices), shape[0]))
    indices = sorted(set(np.linspace(0, shape[0] - 1, count).round().astype(int).tolist()))
    tiles = [np.array(model[k], dtype=np.float32) for k in indices]  # copies: `model` can go
    positions = [tuple(float(v) for v in prepared.grid.to_patient(np.array([k, 0, 0])))
                 for k in indices]
    shown = ", ".join(f"{k} (z {pos[2]:.1f})" for k, pos in zip(indices, positions, strict=True))
    steps.append(f"montage: {len(indices)} of {shape[0]} slices, index (z mm): {shown}")
    return VolumeMontage(tiles, indices, [(p[0], p[1], p[2]) for p in positions], shape, steps)


def _is_ct(volume: Volume) -> bool:
    return bool(volume.datasets) and str(
        volume.datasets[0].get("Modality", "")).strip().upper() == "CT"


def _describe_volume_window(spec: PreprocessingSpec, window: tuple[float, float] | None,
                            ds: Dataset | None) -> str:
    """The window :func:`~dicom_ai.pipeline.volume.volume_window` chose, in words."""
    if window is None:
        why = "the slices have no LINEAR window"
        if ds is not None and ds.get("WindowCenter") is not None:
            function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
            why = (f"the slices' window is {function}" if function != "LINEAR"
                   else "the slices' window width is below 1 or unreadable")
        elif ds is not None and ds.get("VOILUTSequence"):
            why = "the slices have only a VOI LUT Sequence"
        return f"window: none ({why}): modality values kept"
    center, width = window
    if isinstance(spec.window, str):
        return f"window: {spec.window} (C {center:g}, W {width:g}) -> 0..1"
    if spec.window is not None:
        return f"window: C {center:g}, W {width:g} -> 0..1"
    return f"window: the first slice's (C {center:g}, W {width:g}, LINEAR) -> 0..1"


def _describe_volume_normalisation(mode: str) -> str:
    if mode == "none":
        return "normalise: none (the windowed values kept)"
    if mode == "minmax":
        return "normalise: minmax over the whole volume"
    return f"normalise: {mode} over the whole volume"


def _describe_patches(shape: tuple[int, int, int], spec: PreprocessingSpec) -> str:
    """The sliding-window plan (:func:`~dicom_ai.pipeline.volume.patch_starts`), counted."""
    try:
        if spec.input_kind == "volume":
            if spec.patch_size is None:
                raise PreprocessingError("input_kind 'volume' needs patch_size")
            per_axis = [len(patch_starts(n, p, spec.overlap))
                        for n, p in zip(shape, spec.patch_size, strict=True)]
            return (f"patches: {math.prod(per_axis)} 3D patches of "
                    f"{_shape(spec.patch_size)} ({' x '.join(map(str, per_axis))}), overlap "
                    f"{spec.overlap:g}, {spec.blend} blending")
        height, width = spec.input_shape
        per_axis = [shape[0], len(patch_starts(shape[1], height, spec.overlap)),
                    len(patch_starts(shape[2], width, spec.overlap))]
    except VolumeError as exc:
        raise PreprocessingError(str(exc)) from exc
    return (f"patches: {math.prod(per_axis)} 2.5D stacks of {spec.slices_k} adjacent slices "
            f"(edges repeated), {height}x{width} in-plane ({' x '.join(map(str, per_axis))}), "
            f"overlap {spec.overlap:g}, {spec.blend} blending")


def _resampled_slices(
    paths: Sequence[Path], spec: PreprocessingSpec, limits: LimitsSettings | None
) -> tuple[list[NDArray[np.float32]], list[str]]:
    """A bare spec of a 2D input with ``target_spacing``: each slice of the resampled volume
    preprocessed as an image (``float32`` throughout, the volume core's resampling)."""
    assert spec.target_spacing is not None
    volume: Volume = load_volume(paths, limits=limits)
    grid = Grid.of(volume)
    first = volume.datasets[0]
    steps = [f"volume: {grid.shape[0]} slices of {grid.shape[1]}x{grid.shape[2]}, spacing "
             f"{_mm(grid.spacing)} mm"]
    steps.extend(f"volume warning: {warning}" for warning in volume.warnings)
    for arr, ds in zip(volume.array, volume.datasets, strict=True):
        _extend_unique(steps, _describe_grey_prefix(arr, ds))
    modality = modality_volume(volume)
    del volume
    try:
        resampled = resample(modality, grid, spec.target_spacing).array
    except VolumeError as exc:
        raise PreprocessingError(str(exc)) from exc
    del modality
    steps.append(f"resample: {_shape(grid.shape)} at {_mm(grid.spacing)} mm -> "
                 f"{_shape(resampled.shape)} at {_mm(spec.target_spacing)} mm")
    # The slices now hold modality values: preprocess them with an identity modality LUT.
    header = first.copy()
    header.RescaleSlope = 1
    header.RescaleIntercept = 0
    if "ModalityLUTSequence" in header:
        del header.ModalityLUTSequence
    arrays = [preprocess_frame(slice_, header, spec) for slice_ in resampled]
    steps.extend(_describe_after_modality(resampled[0], header, spec))
    return arrays, steps


def _extend_unique(steps: list[str], new: Sequence[str]) -> None:
    steps.extend(step for step in new if step not in steps)


def _mm(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def _first_value(value: Any) -> float:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)


def _describe_frame(arr: NDArray[Any], ds: Dataset, spec: PreprocessingSpec) -> list[str]:
    """The steps :func:`preprocess_frame` applied to `arr`, in words (call after it succeeded)."""
    if _photometric(ds) in GREY_INTERPRETATIONS:
        return [*_describe_grey_prefix(arr, ds), *_describe_after_modality(arr, ds, spec)]
    return _describe_after_modality(arr, ds, spec)


def _describe_grey_prefix(arr: NDArray[Any], ds: Dataset) -> list[str]:
    """Bits-stored masking and the modality LUT (PS3.3 C.7.6.3.1, C.11.1)."""
    steps: list[str] = []
    bits = ds.get("BitsStored")
    if (bits is not None and np.issubdtype(arr.dtype, np.integer)
            and int(bits) < arr.dtype.itemsize * 8):
        signed = " (signed)" if int(ds.get("PixelRepresentation", 0)) == 1 else ""
        steps.append(f"bits stored: {int(bits)} of {arr.dtype.itemsize * 8}{signed}")
    if ds.get("ModalityLUTSequence"):
        item = ds.ModalityLUTSequence[0]
        steps.append(f"modality LUT: LUT sequence ({item.get('LUTDescriptor', ['?'])[0]} "
                     "entries)")
    elif ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        steps.append(f"modality LUT: slope {float(ds.RescaleSlope):g} intercept "
                     f"{float(ds.RescaleIntercept):g}")
    else:
        steps.append("modality LUT: none (stored values kept)")
    return steps


def _describe_after_modality(arr: NDArray[Any], ds: Dataset, spec: PreprocessingSpec) -> list[str]:
    """VOI, MONOCHROME1 inversion or colour conversion, resize, channels, normalisation."""
    steps: list[str] = []
    photometric = _photometric(ds)
    grey = photometric in GREY_INTERPRETATIONS
    if grey:
        steps.append(_describe_voi(ds, spec))
        if photometric == "MONOCHROME1":
            steps.append("MONOCHROME1 inverted")
    elif photometric == "PALETTE COLOR":
        steps.append("colour: PALETTE COLOR through its lookup tables to RGB, scaled to 0..1")
    elif photometric in COLOUR_INTERPRETATIONS:
        bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
        converted = "" if photometric == "RGB" else " (decoded as RGB)"
        steps.append(f"colour: {photometric}{converted}, {bits} bits scaled to 0..1")
    rows, cols = int(arr.shape[0]), int(arr.shape[1])
    height, width = spec.input_shape
    how = "aspect kept, padded" if spec.keep_aspect else "stretched"
    steps.append(f"resize {rows}x{cols} -> {height}x{width} ({how})")
    if grey and spec.channels == 3:
        steps.append("grey replicated to 3 channels")
    elif not grey and spec.channels == 1:
        steps.append("RGB to luminance (1 channel)")
    steps.append(f"normalise: {spec.normalization}")
    return steps


def _describe_voi(ds: Dataset, spec: PreprocessingSpec) -> str:
    """The VOI step of :func:`~dicom_ai.pipeline.preprocessing.apply_voi` (PS3.3 C.11.2)."""
    if isinstance(spec.window, str):
        center, width = WINDOW_PRESETS[spec.window]
        return f"window: {spec.window} (C {center:g}, W {width:g})"
    if isinstance(spec.window, Window):
        return f"window: C {spec.window.center:g}, W {spec.window.width:g}"
    if ds.get("VOILUTSequence"):
        return "VOI: the dataset's VOI LUT sequence"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        try:
            center = _first_value(ds.WindowCenter)
            width = _first_value(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            return "window: the dataset's"
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        return f"window: the dataset's (C {center:g}, W {width:g}, {function})"
    return "VOI: none in the dataset, scaled by the image's min/max"


# -- the PNG ----------------------------------------------------------------------------------
def write_preview(arrays: Sequence[NDArray[np.floating[Any]]], out_png: Path) -> None:
    """Write a PNG of the model input: one image for one array, a montage grid for several.

    For display only, each array is rescaled linearly from its own minimum and maximum to 0..255
    (a constant array shows black); the model input itself is not changed. Arrays of shape
    ``(H, W, 3)`` are shown in colour, ``(H, W, 1)`` or ``(H, W)`` in grey. A montage lays the
    arrays out row by row on a grid of ``ceil(sqrt(n))`` columns, on black.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        Model inputs, e.g. from :func:`model_inputs` (all of one shape for a montage).
    out_png : Path
        Where to write the PNG (its folder must exist).

    Raises
    ------
    PreprocessingError
        No arrays, or an array that is not ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``.
    """
    if not arrays:
        raise PreprocessingError("nothing to preview: no model inputs")
    tiles = [_display(arr) for arr in arrays]
    colour = any(tile.ndim == 3 for tile in tiles)
    mode = "RGB" if colour else "L"
    images = [Image.fromarray(tile).convert(mode) for tile in tiles]
    if len(images) == 1:
        images[0].save(out_png, format="PNG")
        return
    tile_w = max(image.width for image in images)
    tile_h = max(image.height for image in images)
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    canvas = Image.new(mode, (columns * tile_w, rows * tile_h))
    for k, image in enumerate(images):
        canvas.paste(image, ((k % columns) * tile_w, (k // columns) * tile_h))
    canvas.save(out_png, format="PNG")


def _display(arr: NDArray[np.floating[Any]]) -> NDArray[np.uint8]:
    """`arr` rescaled from its min/max to 0..255 as (H, W) grey or (H, W, 3) colour."""
    x = np.asarray(arr, dtype=np.float64)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)) or x.size == 0:
        raise PreprocessingError(f"cannot show an array of shape {np.shape(arr)}")
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    x = np.nan_to_num(x, nan=lo, posinf=hi, neginf=lo)
    scaled = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# -- all together -----------------------------------------------------------------------------
def preview(target: Path, spec: PreprocessingSpec, out_png: Path, *,
            limits: LimitsSettings | None = None) -> list[str]:
    """Write a PNG of what a model with `spec` would receive from `target`; return the steps.

    Parameters
    ----------
    target : Path
        A DICOM file, or a folder holding the files of one series (files that are not DICOM
        Part 10 files, and sub-folders, are ignored).
    spec : PreprocessingSpec
        What the model expects.
    out_png : Path
        Where to write the PNG (see :func:`write_preview`).
    limits : LimitsSettings, optional
        ``[limits]``, see :func:`model_inputs`.

    Returns
    -------
    list of str
        The steps applied (see :func:`model_inputs`).

    Raises
    ------
    LoadError, DecodeError, PreprocessingError
        Nothing to load, or from loading and preprocessing, with their messages.
    """
    target = Path(target)
    if target.is_dir():
        paths = sorted(p for p in target.iterdir() if p.is_file() and is_dicom(p))
        if not paths:
            raise LoadError(f"no DICOM files in {target}")
    elif target.is_file():
        paths = [target]
    else:
        raise LoadError(f"{target} does not exist")
    arrays, steps = model_inputs(paths, spec, limits=limits)
    write_preview(arrays, out_png)
    return steps
