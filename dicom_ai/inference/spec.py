"""The model spec: what a model folder holds, what the model expects and what its outputs mean.

A model is a folder::

    <name>/<version>/
        spec.json        this module's :class:`ModelSpec` (validated on load)
        model.keras      the network (Keras 3), or model.onnx (ONNX Runtime)
        report/          optional: training report, evaluation plots, model card

The spec carries the preprocessing the model was trained with (the imaging stage's
:class:`~dicom_ai.values.PreprocessingSpec`, applied identically when serving),
the coded meaning of each output for the Structured Report (finding and finding site codes), the
operating threshold chosen on validation data, where the model applies (modalities, body parts)
and its provenance (training data, date, metrics, code version). This module imports neither
TensorFlow nor ONNX Runtime: the receiver and the CLI can read specs cheaply.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicom_ai.exceptions import ConfigError
from dicom_ai.routing import body_parts_examined
from dicom_ai.values import CodedConcept, PreprocessingSpec

__all__ = [
    "FINDING_SITE_LUNG",
    "INPUT_KINDS",
    "INPUT_UNITS",
    "NETWORK_FILES",
    "NODULE",
    "SPEC_FILE",
    "Aggregate",
    "InputKind",
    "InputUnit",
    "ModelSpec",
    "ModelSpecError",
    "OutputLabel",
    "Provenance",
    "Task",
    "read_spec",
    "write_spec",
]

#: The spec's file name inside a model folder.
SPEC_FILE = "spec.json"
#: Network file names a model folder may hold, and the backend each needs.
NETWORK_FILES: dict[str, str] = {"model.keras": "keras", "model.onnx": "onnx"}

Task = Literal["classification", "segmentation"]
#: What one decision of the model covers: an image (frame), a series, or the whole study.
InputUnit = Literal["image", "series", "study"]
INPUT_UNITS: tuple[InputUnit, ...] = ("image", "series", "study")
#: How per-image probabilities combine into the decision of a series or study.
Aggregate = Literal["max", "mean"]
#: What one network input is (the preprocessing's ``input_kind``): a 2D image, a 3D patch of a
#: resampled volume, or 2.5D (adjacent slices as channels).
InputKind = Literal["image", "volume", "slices"]
INPUT_KINDS: tuple[InputKind, ...] = ("image", "volume", "slices")
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[0-9]+(\.[0-9]+){0,2}([-+][0-9A-Za-z.-]+)?$"


class ModelSpecError(ConfigError):
    """A model folder or spec is missing, unreadable or invalid; the message names the key."""


#: SNOMED CT "Nodule" (morphologic abnormality).
NODULE = CodedConcept(value="27925004", scheme="SCT", meaning="Nodule")
#: SNOMED CT "Lung structure", the finding site of chest nodule models.
FINDING_SITE_LUNG = CodedConcept(value="39607008", scheme="SCT", meaning="Lung")


class OutputLabel(BaseModel):
    """One model output: a sigmoid probability (classification) or a mask channel (segmentation).

    Attributes
    ----------
    name : str
        Short label, e.g. ``"nodule"``.
    finding : CodedConcept
        What a positive output means, for the SR's finding and qualitative evaluation.
    finding_site : CodedConcept, optional
        Where (e.g. lung).
    threshold : float
        The operating threshold on the probability, chosen on validation data; a probability at
        or above it is "present".
    threshold_method : str
        How the threshold was chosen, e.g. ``"Youden J on validation"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
    finding: CodedConcept
    finding_site: CodedConcept | None = None
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    threshold_method: str = "default 0.5"


class Provenance(BaseModel):
    """Where a model came from.

    Attributes
    ----------
    training_data : str
        A description of the training data (e.g. ``"dicom-ai synth CR, seed 1, 600 studies"``).
    created : datetime
        When the model was trained (UTC).
    code_version : str
        The dicom-ai version (and git commit when known) that trained it.
    metrics : dict of str to float
        Validation or test metrics, e.g. ``{"roc_auc": 0.97}``.
    notes : str
        Limitations, intended use.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    training_data: str = ""
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    code_version: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    notes: str = ""


class ModelSpec(BaseModel):
    """Everything the service needs to run a model and report what it found.

    Attributes
    ----------
    name : str
        Lower-case name, unique in the registry (``[a-z0-9][a-z0-9._-]*``).
    version : str
        ``MAJOR[.MINOR[.PATCH]][-suffix]``; versions of one name sit side by side.
    task : {'classification', 'segmentation'}
        Classification: one sigmoid per output label, shape ``(N, labels)``. Segmentation: a
        probability map per label, ``(N, H, W, labels)``; detections are its connected
        components of at least ``min_component_pixels``.
    network : str
        The network file in the folder, ``model.keras`` or ``model.onnx``.
    preprocessing : PreprocessingSpec
        Input size, channels, window, normalisation: applied identically in training and serving.
        Its ``input_kind`` says what one network input is:

        * ``image`` (default): a 2D image, frame by frame; ``target_spacing`` and
          ``patch_size`` are not allowed.
        * ``volume``: a 3D patch ``(patch_size..., 1)`` of a CT or MR series loaded as a volume
          and resampled to ``target_spacing`` (required), ``channels = 1``, ``patch_size``
          required with ``(h, w)`` equal to ``input_shape``; the output is a probability
          volume per label ``(N, d, h, w, labels)``.
        * ``slices`` (2.5D): ``slices_k`` (odd) adjacent slices as channels in patches of
          ``input_shape``, ``channels = 1`` (each slice is grey), ``target_spacing`` optional
          (without it the series' own grid), no ``patch_size``; the output is
          ``(N, h, w, labels)``.

        Both volume kinds need ``task = "segmentation"``, run over the whole series as a
        sliding window (``overlap``, ``blend``) and report one finding per connected component
        of at least ``min_component_pixels`` voxels on the source slices, or one absent
        finding for the study when there is none (``input_unit`` and ``aggregate`` do not
        apply); ``normalization`` ``imagenet`` does not apply to them.
    outputs : list of OutputLabel
        One per output unit or mask channel, in order.
    modalities : list of str
        Modalities (0008,0060) the model applies to, e.g. ``["CR", "DX"]``; empty means any.
    body_parts : list of str
        Body Part Examined (0018,0015) values it applies to, e.g. ``["CHEST"]``; empty means any.
    input_unit : {'image', 'series', 'study'}
        What one decision covers. ``image`` (the default, 2D classifiers): a decision per image,
        plus one for the study combined by `aggregate` when the images come from more than
        one series; ``series``: one per series (and one for the study when there are
        several); ``study``: one for the study only.
        The network always runs image by image (batched).
    aggregate : {'max', 'mean'}
        How image probabilities combine into a series or study decision (``max``: present if
        any image is).
    view_positions : list of str
        View Position (0018,5101) values it applies to, e.g. ``["PA", "AP"]``; empty means any.
    photometric_interpretations : list of str
        Photometric Interpretation (0028,0004) values it applies to, e.g.
        ``["MONOCHROME1", "MONOCHROME2"]``; empty means any.
    pixel_spacing_mm : tuple of float, optional
        ``(min, max)`` in mm of Pixel Spacing (0028,0030), else Imager Pixel Spacing
        (0018,1164); an image without either is out of scope when this is set.
    min_image_size : int, optional
        Smallest Rows (0028,0010) and Columns (0028,0011) it applies to.
    min_component_pixels : int
        Segmentation only: smaller connected components are not reported as detections.
    description : str
        One line for lists and the model card.
    provenance : Provenance
    training : dict
        Free-form training record (architecture, epochs, augmentation, split, seed), written by
        ``dicom-ai train``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    version: Annotated[str, Field(pattern=VERSION_PATTERN)]
    task: Task
    network: Literal["model.keras", "model.onnx"] = "model.keras"
    preprocessing: PreprocessingSpec
    outputs: Annotated[list[OutputLabel], Field(min_length=1)]
    modalities: list[Annotated[str, Field(pattern=r"^[A-Z0-9]{1,16}$")]] = Field(
        default_factory=list
    )
    body_parts: list[Annotated[str, Field(min_length=1, max_length=16)]] = Field(
        default_factory=list
    )
    input_unit: InputUnit = "image"
    aggregate: Aggregate = "max"
    view_positions: list[Annotated[str, Field(min_length=1, max_length=16)]] = Field(
        default_factory=list
    )
    photometric_interpretations: list[Annotated[str, Field(min_length=1, max_length=16)]] = (
        Field(default_factory=list)
    )
    pixel_spacing_mm: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] | None = (
        None
    )
    min_image_size: Annotated[int, Field(ge=1)] | None = None
    min_component_pixels: Annotated[int, Field(ge=1)] = 4
    description: str = ""
    provenance: Provenance = Field(default_factory=Provenance)
    training: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_output_names(self) -> ModelSpec:
        names = [label.name for label in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"output names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _spacing_range(self) -> ModelSpec:
        spacing = self.pixel_spacing_mm
        if spacing is not None and spacing[0] > spacing[1]:
            raise ValueError(f"pixel_spacing_mm must be (min, max), got {self.pixel_spacing_mm}")
        return self

    @model_validator(mode="after")
    def _input_kind(self) -> ModelSpec:
        prep = self.preprocessing
        kind = prep.input_kind
        if kind == "image":
            if prep.target_spacing is not None:
                raise ValueError("preprocessing.target_spacing needs input_kind 'volume' or "
                                 "'slices' (an 'image' model runs frame by frame)")
            if prep.patch_size is not None:
                raise ValueError("preprocessing.patch_size needs input_kind 'volume'")
            return self
        if self.task != "segmentation":
            raise ValueError(f"input_kind {kind!r} needs task 'segmentation' (lesions are the "
                             "output's connected components)")
        if prep.channels != 1:
            raise ValueError(f"input_kind {kind!r} needs channels = 1 (grey slices; 2.5D "
                             "stacks slices_k of them as channels)")
        if prep.normalization == "imagenet":
            raise ValueError(f"normalization 'imagenet' does not apply to input_kind {kind!r}")
        if kind == "volume":
            if prep.target_spacing is None:
                raise ValueError("input_kind 'volume' needs preprocessing.target_spacing")
            if prep.patch_size is None:
                raise ValueError("input_kind 'volume' needs preprocessing.patch_size (d, h, w)")
            if tuple(prep.patch_size[1:]) != tuple(prep.input_shape):
                raise ValueError(f"preprocessing.patch_size {prep.patch_size} must end with "
                                 f"input_shape {prep.input_shape}")
        else:
            if prep.patch_size is not None:
                raise ValueError("preprocessing.patch_size needs input_kind 'volume' ('slices' "
                                 "takes patches of input_shape)")
            if prep.slices_k % 2 == 0:
                raise ValueError(f"preprocessing.slices_k must be odd, not {prep.slices_k}")
        return self

    @property
    def input_kind(self) -> InputKind:
        """``image``, ``volume`` or ``slices``: the preprocessing's input kind."""
        return self.preprocessing.input_kind

    @property
    def backend(self) -> str:
        """``"keras"`` or ``"onnx"``, from the network file."""
        return NETWORK_FILES[self.network]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one network input, without the batch axis.

        ``(height, width, channels)`` for ``image``; ``(depth, height, width, 1)`` for
        ``volume``; ``(height, width, slices_k)`` for ``slices``.
        """
        prep = self.preprocessing
        height, width = prep.input_shape
        if prep.input_kind == "volume" and prep.patch_size is not None:
            return (prep.patch_size[0], height, width, 1)
        if prep.input_kind == "slices":
            return (height, width, prep.slices_k)
        return (height, width, prep.channels)

    def applies_to(self, modality: str | None, body_part: str | None) -> bool:
        """Whether a series of this modality and body part is one the model was made for.

        Parameters
        ----------
        modality : str, optional
            Modality (0008,0060).
        body_part : str, optional
            Body Part Examined (0018,0015).

        Returns
        -------
        bool
        """
        if self.modalities and (modality or "").strip().upper() not in self.modalities:
            return False
        return not self.body_parts or (body_part or "").strip().upper() in {
            part.upper() for part in self.body_parts
        }


    def scope_problem(self, ds: Any) -> str | None:
        """Why an image is outside what the model was made for, or None when it is in scope.

        Checked before inference, per image: Modality (0008,0060), Body Part Examined
        (0018,0015), View Position (0018,5101), Photometric Interpretation (0028,0004), Pixel
        Spacing (0028,0030) or Imager Pixel Spacing (0018,1164), Rows and Columns (PS3.3
        C.7.3.1, C.8.11.5, C.7.6.3). Code strings compare case-insensitively (lower case is a
        common vendor quirk). A Body Part Examined or View Position that is absent or empty
        (both Type 3 or 2) is not held against an image; a wrong one is. The body part is read
        as routing reads it (:func:`~dicom_ai.routing.body_parts_examined`): an enhanced
        object's Frame Anatomy code counts as its term (SCT 816094009 as ``CHEST``).

        Parameters
        ----------
        ds : pydicom.dataset.Dataset
            The image's header (pixel data not needed).

        Returns
        -------
        str or None
            A short reason naming the attribute and the model's values; the image's value only
            when it is a well-formed code string (never free text).
        """
        label = f"{self.name} {self.version}"
        checks: list[tuple[str, str, list[str], bool]] = [
            ("Modality", "modality", list(self.modalities), True),
            ("BodyPartExamined", "body part", list(self.body_parts), False),
            ("ViewPosition", "view position", list(self.view_positions), False),
            ("PhotometricInterpretation", "photometric interpretation",
             list(self.photometric_interpretations), True),
        ]
        for keyword, what, allowed, required in checks:
            if not allowed:
                continue
            if keyword == "BodyPartExamined":
                # Routing's rule: the top-level term, else the Frame Anatomy code of an enhanced
                # object mapped back to its term (a Legacy Converted Enhanced CT keeps no other).
                terms = [_code_string(t) for t in body_parts_examined(ds)]
                wanted = {a.strip().upper() for a in allowed}
                if not terms or any(t in wanted for t in terms):
                    continue
                shown = terms[0] if terms[0] and _CS.fullmatch(terms[0]) else "another value"
                return f"{what} {shown}: {label} applies to {', '.join(allowed)}"
            value = _code_string(ds.get(keyword))
            if value is None and not required:
                continue
            if value not in {a.strip().upper() for a in allowed}:
                shown = "none" if value is None else (
                    value if _CS.fullmatch(value) else "another value")
                return f"{what} {shown}: {label} applies to {', '.join(allowed)}"
        if self.min_image_size is not None:
            rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
            if rows is None or cols is None or min(rows, cols) < self.min_image_size:
                return (f"image {rows} x {cols}: {label} needs at least "
                        f"{self.min_image_size} pixels a side")
        if self.pixel_spacing_mm is not None:
            low, high = self.pixel_spacing_mm
            spacing = _spacing(ds)
            if spacing is None:
                return f"no pixel spacing: {label} applies to {low:g}-{high:g} mm"
            if not all(low <= s <= high for s in spacing):
                return (f"pixel spacing {spacing[0]:g} x {spacing[1]:g} mm: {label} applies to "
                        f"{low:g}-{high:g} mm")
        return None


_CS = re.compile(r"[A-Z0-9 _]{1,16}")


def _code_string(value: Any) -> str | None:
    """A CS value as the gate compares it: stripped, upper case; None when absent or empty."""
    if value is None:
        return None
    if not isinstance(value, str):  # a multi-valued CS: its first value
        try:
            value = next(iter(value), "")
        except TypeError:
            value = str(value)
    text = str(value).strip().upper()
    return text or None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _spacing(ds: Any) -> tuple[float, float] | None:
    """Pixel Spacing, else Imager Pixel Spacing, as floats; None when absent or malformed."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return (row, col)
    return None


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
        for err in exc.errors()
    )


def read_spec(folder: Path) -> ModelSpec:
    """Read and validate the spec of a model folder, and check its network file is there.

    Parameters
    ----------
    folder : Path
        A model folder (holding ``spec.json``).

    Returns
    -------
    ModelSpec

    Raises
    ------
    ModelSpecError
        No folder or spec file, invalid JSON, a key that is unknown or has a bad value (named),
        or the network file the spec names is missing.
    """
    folder = Path(folder)
    path = folder / SPEC_FILE
    if not path.is_file():
        raise ModelSpecError(f"{folder} is not a model folder: {SPEC_FILE} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelSpecError(f"cannot read {path}: {exc}") from None
    try:
        spec = ModelSpec.model_validate(raw)
    except ValidationError as exc:
        raise ModelSpecError(f"invalid model spec {path}: {_problems(exc)}") from None
    if not (folder / spec.network).is_file():
        raise ModelSpecError(f"{folder}: the network file {spec.network} named by the spec is "
                             "missing")
    return spec


def write_spec(spec: ModelSpec, folder: Path) -> Path:
    """Write ``spec`` as ``folder/spec.json`` (pretty JSON, atomically replaced).

    Parameters
    ----------
    spec : ModelSpec
        The spec.
    folder : Path
        The model folder (created if missing).

    Returns
    -------
    Path
        The spec file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SPEC_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
