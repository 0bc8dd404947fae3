"""The model spec: what a model folder holds, what the model expects and what its outputs mean.

A model is a folder::

    <name>/<version>/
        spec.json        this module's :class:`ModelSpec` (validated on load)
        model.keras      the network (Keras 3), or model.onnx (ONNX Runtime)
        report/          optional: training report, evaluation plots, model card

The spec carries the preprocessing the model was trained with (the imaging stage's
:class:`~dicom_ai.pipeline.preprocessing.PreprocessingSpec`, applied identically when serving),
the coded meaning of each output for the Structured Report (finding and finding site codes), the
operating threshold chosen on validation data, where the model applies (modalities, body parts)
and its provenance (training data, date, metrics, code version). This module imports neither
TensorFlow nor ONNX Runtime: the receiver and the CLI can read specs cheaply.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicom_ai.exceptions import ConfigError
from dicom_ai.pipeline.preprocessing import PreprocessingSpec

__all__ = [
    "FINDING_SITE_LUNG",
    "NETWORK_FILES",
    "NODULE",
    "SPEC_FILE",
    "CodedConcept",
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
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[0-9]+(\.[0-9]+){0,2}([-+][0-9A-Za-z.-]+)?$"


class ModelSpecError(ConfigError):
    """A model folder or spec is missing, unreadable or invalid; the message names the key."""


class CodedConcept(BaseModel):
    """A coded concept as a DICOM Code Sequence item carries it (PS3.3 8.8).

    Attributes
    ----------
    value : str
        Code Value (0008,0100), e.g. ``"27925004"``.
    scheme : str
        Coding Scheme Designator (0008,0102), e.g. ``"SCT"`` (SNOMED CT) or ``"DCM"``.
    meaning : str
        Code Meaning (0008,0104), e.g. ``"Nodule"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: Annotated[str, Field(min_length=1, max_length=64)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


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
    outputs : list of OutputLabel
        One per output unit or mask channel, in order.
    modalities : list of str
        Modalities (0008,0060) the model applies to, e.g. ``["CR", "DX"]``; empty means any.
    body_parts : list of str
        Body Part Examined (0018,0015) values it applies to, e.g. ``["CHEST"]``; empty means any.
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

    @property
    def backend(self) -> str:
        """``"keras"`` or ``"onnx"``, from the network file."""
        return NETWORK_FILES[self.network]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of one model input."""
        height, width = self.preprocessing.input_shape
        return (height, width, self.preprocessing.channels)

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
