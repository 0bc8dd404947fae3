"""The value types every stage of the model stack shares: the bottom of its import graph.

What a model expects (:class:`PreprocessingSpec`, :class:`Window`), what its outputs mean
(:class:`CodedConcept`), and what one run found (:class:`ModelRun` of :class:`Finding`, each with
an optional :class:`Location`, plus :class:`HeatMap`). Preprocessing, loading, inference,
reporting and the job runner all import these; this module imports none of them (only pydantic
and numpy), so the stack's arrows point down. Everything here is plain data: no TensorFlow, no
SQLAlchemy, no pynetdicom, no I/O.

Coordinates follow the SR's SCOORD convention (PS3.3 C.18.6.1.1): ``(column, row)`` pairs in
image pixels, continuous, with the top-left corner of the top-left pixel at ``(0, 0)`` and pixel
centres at ``i + 0.5``. Ours store ``(row, column)`` like numpy and convert when writing the SR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "WINDOW_PRESETS",
    "CodedConcept",
    "Finding",
    "FindingScope",
    "HeatMap",
    "Location",
    "LocationKind",
    "ModelRun",
    "NormalizationMode",
    "PreprocessingSpec",
    "VolumeRegion",
    "Window",
    "WindowPreset",
]

# -- what a model expects -------------------------------------------------------------------------
NormalizationMode = Literal["minmax", "zscore", "imagenet", "none"]
WindowPreset = Literal["lung", "soft-tissue", "bone", "brain"]

#: Named windows as (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft-tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

class Window(BaseModel):
    """An explicit VOI window in modality units (PS3.3 C.11.2.1.2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: float
    width: Annotated[float, Field(ge=1.0)]


class PreprocessingSpec(BaseModel):
    """What a model expects as input; validated on construction.

    Attributes
    ----------
    input_shape : tuple of int
        ``(height, width)``, each at least 8.
    channels : {1, 3}
        Channels of the model input.
    window : Window or str, optional
        An explicit ``{center, width}`` or a preset name (see :data:`WINDOW_PRESETS`); by default
        the dataset's own VOI.
    keep_aspect : bool
        Keep the aspect ratio when resizing (pad the rest with 0).
    normalization : {'minmax', 'zscore', 'imagenet', 'none'}
        The final intensity normalisation (``imagenet`` needs 3 channels; ``none`` keeps the
        windowed 0..1 values, the same mapping for every image: what a CT model wants, where a
        per-image minimum and maximum would stretch a scan with nothing bright in it).
    min_input_size : int
        Images whose rows or columns are fewer are refused.
    target_spacing : tuple of float, optional
        Voxel spacing (mm) volumes are resampled to, ``(slice, row, column)``.
    input_kind : {'image', 'volume', 'slices'}
        What one model input is: a 2D image (frame by frame, the default); a 3D patch of
        ``patch_size`` cut from the volume resampled to ``target_spacing`` (input
        ``(N, d, h, w, 1)``); or 2.5D, ``slices_k`` adjacent slices as channels in patches of
        ``input_shape`` (input ``(N, h, w, slices_k)``). A model spec checks the combinations.
    patch_size : tuple of int, optional
        ``(d, h, w)`` of a 3D patch (``volume`` only; ``(h, w)`` equals ``input_shape``).
    slices_k : int
        Odd number of adjacent slices of a 2.5D input (``slices``).
    overlap : float
        Fraction of a patch shared with its neighbour along each axis, in ``[0, 1)``.
    blend : {'gaussian', 'linear', 'constant'}
        How overlapping patch predictions are weighted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_shape: tuple[Annotated[int, Field(ge=8)], Annotated[int, Field(ge=8)]]
    channels: Literal[1, 3] = 3
    window: Window | WindowPreset | None = None
    keep_aspect: bool = False
    normalization: NormalizationMode = "minmax"
    min_input_size: Annotated[int, Field(ge=1)] = 32
    target_spacing: (
        tuple[
            Annotated[float, Field(gt=0)],
            Annotated[float, Field(gt=0)],
            Annotated[float, Field(gt=0)],
        ]
        | None
    ) = None
    input_kind: Literal["image", "volume", "slices"] = "image"
    patch_size: (
        tuple[
            Annotated[int, Field(ge=1)],
            Annotated[int, Field(ge=8)],
            Annotated[int, Field(ge=8)],
        ]
        | None
    ) = None
    slices_k: Annotated[int, Field(ge=1, le=31)] = 3
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    blend: Literal["gaussian", "linear", "constant"] = "gaussian"

    @model_validator(mode="after")
    def _imagenet_needs_rgb(self) -> PreprocessingSpec:
        if self.normalization == "imagenet" and self.channels != 3:
            raise ValueError("normalization 'imagenet' needs channels = 3")
        return self

    @property
    def window_values(self) -> tuple[float, float] | None:
        """The window as ``(center, width)``, resolving a preset; ``None`` for the dataset's."""
        if self.window is None:
            return None
        if isinstance(self.window, Window):
            return (self.window.center, self.window.width)
        return WINDOW_PRESETS[self.window]


# -- what its outputs mean ------------------------------------------------------------------------
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


# -- what one run found ---------------------------------------------------------------------------
LocationKind = Literal["point", "bbox", "segment"]
#: What a finding's decision covers: one image, one series, or the whole study.
FindingScope = Literal["image", "series", "study"]


@dataclass(frozen=True)
class Location:
    """Where on one image a finding is.

    Attributes
    ----------
    kind : {"point", "bbox", "segment"}
        A point (Grad-CAM peak of a classifier), a bounding box, or a segment of the run's SEG
        (segmentation models).
    sop_instance_uid : str
        The source image the coordinates refer to.
    frame_number : int, optional
        1-based frame of a multi-frame source image; None for single-frame images.
    point : tuple of float, optional
        ``(row, column)`` in image pixels (for ``point``; for ``bbox`` and ``segment`` the centre).
    bbox : tuple of float, optional
        ``(row_min, col_min, row_max, col_max)`` in image pixels, max exclusive (``bbox`` and
        ``segment``).
    segment_number : int, optional
        1-based segment of the run's SEG that holds the finding's mask (``segment``).
    mask : numpy.ndarray, optional
        Boolean mask in source-image space (``segment``): what the SEG segment encodes.
    area_pixels : float, optional
        Area of the mask or box in image pixels.
    """

    kind: LocationKind
    sop_instance_uid: str
    frame_number: int | None = None
    point: tuple[float, float] | None = None
    bbox: tuple[float, float, float, float] | None = None
    segment_number: int | None = None
    mask: NDArray[np.bool_] | None = field(default=None, compare=False, repr=False)
    area_pixels: float | None = None


@dataclass(frozen=True)
class VolumeRegion:
    """Where in a volume a finding is: one 3D segment on the source slices' grid.

    The grid is the series' slices in :func:`dicom_ai.pipeline.loading.load_volume` order
    (along the slice normal); ``sop_instance_uids[k]`` is slice ``k``. The mask is cropped to the
    segment's bounding box and placed by ``offset``, so a small lesion in a 300-slice 512 x 512
    series costs kilobytes, not the whole grid.

    Attributes
    ----------
    series_instance_uid : str
        The source series.
    sop_instance_uids : tuple of str
        Every slice of the source grid, in order (the SEG references them all).
    shape : tuple of int
        ``(slices, rows, columns)`` of the source grid.
    offset : tuple of int
        ``(slice, row, column)`` of the mask's first voxel in the source grid.
    mask : numpy.ndarray
        Boolean, the segment cropped to its bounding box, axes ``(slice, row, column)``.
    segment_number : int
        1-based segment of the run's SEG that holds this region.
    voxels : int
        Voxels in the segment.
    volume_mm3 : float
        Its volume (voxels x voxel volume on the source grid).
    longest_axial_diameter_mm : float
        Longest in-plane diameter over its slices (mm).
    centroid : tuple of float
        Centre of mass in patient coordinates (mm, x y z of PS3.3 C.7.6.2.1.1).
    mean_intensity : float, optional
        Mean of the modality values inside (HU for CT); None when not meaningful (MR).
    tracking_id : str
        A human-readable identifier that stays the same across superseding runs (TID 1411
        Tracking Identifier), e.g. ``"lesion 1"``.
    """

    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    shape: tuple[int, int, int]
    offset: tuple[int, int, int]
    mask: NDArray[np.bool_] = field(compare=False, repr=False)
    segment_number: int = 1
    voxels: int = 0
    volume_mm3: float = 0.0
    longest_axial_diameter_mm: float = 0.0
    centroid: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mean_intensity: float | None = None
    tracking_id: str = ""

    def __post_init__(self) -> None:
        if len(self.sop_instance_uids) != self.shape[0]:
            raise ValueError("one SOP Instance UID per slice of the grid")
        if self.mask.ndim != 3 or any(
                o < 0 or o + n > s for o, n, s in zip(self.offset, self.mask.shape, self.shape,
                                                       strict=True)):
            raise ValueError("the mask must lie inside the grid")


@dataclass(frozen=True)
class Finding:
    """One output of one model on one image, series or study, decided at the model's threshold.

    Attributes
    ----------
    label : str
        The spec's output label name, e.g. ``"nodule"``.
    finding : CodedConcept
        What a present finding means (e.g. SCT 27925004 "Nodule").
    finding_site : CodedConcept, optional
        Where (e.g. SCT 39607008 "Lung").
    probability : float
        The model's probability in [0, 1].
    threshold : float
        The operating threshold the decision used.
    present : bool
        ``probability >= threshold``.
    sop_instance_uids : tuple of str
        The source images the finding was computed from (at least one).
    location : Location, optional
        Where, when the model localises (Grad-CAM peak or a segmentation component).
    tracking_uid : str
        A UID that identifies this finding across SR versions (TID 1501 Tracking UID).
    scope : {"image", "series", "study"}
        What the decision covers: one image, or a series or the study, aggregated from its
        images' probabilities by the spec's rule (then `sop_instance_uids` lists them all and
        there is no location).
    ood_score : float, optional
        Out-of-distribution score of the input (:mod:`dicom_ai.inference.ood`; the highest of
        the images of a series or study decision); None when the model has no statistics.
    out_of_distribution : bool
        The score is above the model's threshold: the input looks unlike the training data,
        and the decision should not be trusted.
    region : VolumeRegion, optional
        Where in a volume, for findings of volume models (then `location` is None and
        `sop_instance_uids` lists the slices the region touches).
    """

    label: str
    finding: CodedConcept
    probability: float
    threshold: float
    present: bool
    sop_instance_uids: tuple[str, ...]
    tracking_uid: str
    finding_site: CodedConcept | None = None
    location: Location | None = None
    scope: FindingScope = "image"
    ood_score: float | None = None
    out_of_distribution: bool = False
    region: VolumeRegion | None = None


@dataclass(frozen=True)
class HeatMap:
    """A Grad-CAM heat-map (or a probability map) of one source image, in image space.

    Attributes
    ----------
    sop_instance_uid : str
        The source image.
    frame_number : int, optional
        1-based frame of a multi-frame source; None otherwise.
    values : numpy.ndarray
        ``float32`` in [0, 1], shape ``(Rows, Columns)`` of the source image, or that shape
        scaled down to the heat-map capture's (:func:`dicom_ai.reporting.capture.capture_shape`).
    display : numpy.ndarray
        ``float32`` in [0, 1], the source image as the model saw it (windowed, MONOCHROME2),
        the shape of ``values``: the grey background the overlay is drawn on.
    """

    sop_instance_uid: str
    values: NDArray[np.float32] = field(compare=False, repr=False)
    display: NDArray[np.float32] = field(compare=False, repr=False)
    frame_number: int | None = None


@dataclass(frozen=True)
class ModelRun:
    """Everything one model run on the eligible series of one study produced.

    Attributes
    ----------
    model_name, model_version : str
        The registered model that ran (recorded on every finding and in the SR's TID 4019).
    task : {"classification", "segmentation"}
        The model's task.
    study_instance_uid, series_instance_uid : str
        The source study and its first analysed series.
    findings : list of Finding
        Every output for every image, present or absent (an absent finding is reported too).
    heatmaps : list of HeatMap
        One per source image for classifiers that explain (may be empty).
    parameters : dict
        Algorithm parameters worth recording in TID 4019 (e.g. thresholds).
    """

    model_name: str
    model_version: str
    task: Literal["classification", "segmentation"]
    study_instance_uid: str
    series_instance_uid: str
    findings: list[Finding]
    heatmaps: list[HeatMap] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
