"""What one model run found, in the source images' terms: from inference to results.

:func:`dicom_ai.pipeline.run` turns a predictor's outputs into a :class:`ModelRun`; the
:mod:`dicom_ai.reporting` builders turn a ``ModelRun`` plus the source headers into DICOM objects
(TID 1500 SR, SEG, heat-map Secondary Capture), and :mod:`storage.repository` stores its
findings as rows. Everything here is plain data: no TensorFlow, no SQLAlchemy, no pynetdicom.

Coordinates follow the SR's SCOORD convention (PS3.3 C.18.6.1.1): ``(column, row)`` pairs in
image pixels, continuous, with the top-left corner of the top-left pixel at ``(0, 0)`` and pixel
centres at ``i + 0.5``. Ours store ``(row, column)`` like numpy and convert when writing the SR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from dicom_ai.inference.spec import CodedConcept

__all__ = ["Finding", "FindingScope", "HeatMap", "Location", "ModelRun"]

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
