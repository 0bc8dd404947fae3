"""TID 1500 Measurement Report SR of one model run, and reading one back (PS3.16 TID 1500).

One measurement group per :class:`~dicom_ai.values.Finding`, present or absent:

* no location: TID 1501 (image-level classification) with Source Image For Measurement Group;
* ``point`` / ``bbox``: TID 1410 planar ROI, an SCOORD POINT or closed POLYLINE on the image;
* ``segment``: TID 1411 volumetric ROI referencing a segment of the run's SEG (built by
  :func:`dicom_ai.reporting.seg.build_seg`);
* a volume ``region`` (:class:`~dicom_ai.values.VolumeRegion`): TID 1411 volumetric ROI
  referencing the region's segment of the run's multi-frame SEG and the slices it touches, its
  Tracking Identifier the region's (``"lesion 1"``, stable across superseding runs), with the
  measurements (TID 300) Volume (118565006, SCT) in UCUM ``mm3``, the longest axial diameter as
  Long Axis (103339001, SCT; CID 7470, the code dcmjs/OHIF write for a bidirectional's long
  axis, which lies in the image plane) in ``mm``, and for CT the mean attenuation as
  Attenuation Coefficient (112031, DCM) with Derivation Mean (373098007, SCT; CID 7464) in
  UCUM ``[hnsf'U]``. In a Comprehensive 3D SR the group also holds the region's centroid: a
  SCOORD3D POINT named Center of Mass (128138, DCM; CID 219) in the source's Frame of
  Reference (not in Comprehensive SR, whose IOD has no SCOORD3D).

Each group carries a Tracking Identifier (text and UID), the finding type, the finding site, a
qualitative evaluation named by the finding and valued Present/Absent, the probability
(122157, DCM) in UCUM "1", and TID 4019 Algorithm Identification. When the model scored its
input against its training distribution (:mod:`dicom_ai.inference.ood`), a second qualitative
evaluation, :data:`OUT_OF_DISTRIBUTION` valued Present or Absent, says whether the input looks
unlike the training data (Present: the decision should not be trusted); the score and its
threshold are TID 4019 parameters. No standard code names this, so the concept has a private
coding scheme (PS3.16 8.2: designators beginning "99"). The observer is the model as a
device (TID 1004) with a Device Observer UID derived from the model name, so reports of one
model share an observer across versions and retries. The recipe is docs/notes.md's validator-clean
one: ``dsrdump -v +Pt`` and ``dciodvfy`` pass without warnings.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VM, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    generate_uid,
)
from pydicom.valuerep import DA, DT, TM, format_number_as_ds, validate_value

from dicom_ai.exceptions import ReportError
from dicom_ai.reporting.codes import (
    ABSENT,
    ATTENUATION_COEFFICIENT,
    CENTER_OF_MASS,
    CUBIC_MILLIMETER,
    HOUNSFIELD_UNIT,
    LONG_AXIS,
    MEAN,
    MILLIMETER,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    VOLUME,
    from_code,
    procedure_reported,
    to_code,
)
from dicom_ai.values import Finding, ModelRun

__all__ = [
    "MANUFACTURER",
    "OUT_OF_DISTRIBUTION",
    "PriorReport",
    "ReportedFinding",
    "SRKind",
    "build_sr",
    "device_observer_uid",
    "source_header",
    "source_headers",
    "summarize_sr",
]

LOGGER = logging.getLogger(__name__)

SRKind = Literal["comprehensive", "comprehensive3d"]

#: Manufacturer (0008,0070) of every object dicom-ai writes.
MANUFACTURER = "dicom-ai"

# Type 2 attributes (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study) highdicom reads from the
# first source by attribute access: an absent one raises AttributeError (docs/notes.md).
_TYPE2_DEFAULTS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)
_PIXEL_KEYWORDS = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})
# Value representations whose value is a format, not free text (PS3.5 6.2): a value that does
# not fit the format carries no information a result object could keep.
_FORMATTED_VRS = {"DA": DA, "DT": DT, "TM": TM, "AS": None}
# Patient's Sex (0010,0040), PS3.3 C.7.1.1.1.2: M, F, O, or empty (type 2: unknown).
_PATIENT_SEX = frozenset({"M", "F", "O", ""})

#: The qualitative evaluation stating whether a finding's input is outside the model's training
#: distribution (a private code: no standard concept exists).
OUT_OF_DISTRIBUTION = hd.sr.CodedConcept("OOD", "99DICOMAI", "Input outside training distribution")

# SCT Present is ours; DCM (121053) "Present" is what other producers may write.
_PRESENT_CODES = (PRESENT, hd.sr.CodedConcept("121053", "DCM", "Present"))


@dataclass(frozen=True)
class PriorReport:
    """A previously sent SR that a new one replaces (Predecessor Documents, PS3.3 C.17.2).

    Attributes
    ----------
    study_instance_uid, series_instance_uid, sop_class_uid, sop_instance_uid : str
        The prior SR's identity.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class ReportedFinding:
    """One measurement group read back from a TID 1500 report.

    Attributes
    ----------
    finding : tuple of str
        ``(value, scheme, meaning)`` of the finding type.
    present : bool
        The qualitative evaluation named by the finding is Present.
    probability : float
        The (122157, DCM) "Probability" measurement.
    tracking_uid : str
        The group's Tracking Unique Identifier.
    algorithm_name, algorithm_version : str
        TID 4019 Algorithm Identification.
    source_sop_instance_uids : tuple of str
        Source images the group references (document order, no duplicates; not the SEG).
    location_kind : {"point", "bbox", "segment"} or None
        TID 1410 POINT / POLYLINE, TID 1411 segment, or None for TID 1501.
    out_of_distribution : bool or None
        The :data:`OUT_OF_DISTRIBUTION` evaluation: Present (True), Absent (False), or None
        when the group has none.
    tracking_id : str
        The group's Tracking Identifier text (``"lesion 1"`` for a volume region).
    segment_number : int or None
        The referenced SEG segment (TID 1411 groups).
    segmentation_sop_instance_uid : str or None
        The SEG the referenced segment is in.
    volume_mm3 : float or None
        The Volume measurement (mm3), when the group has one.
    longest_axial_diameter_mm : float or None
        The Long Axis measurement (mm), when the group has one.
    mean_attenuation_hu : float or None
        The mean Attenuation Coefficient (HU), when the group has one.
    centroid : tuple of float or None
        The Center of Mass SCOORD3D POINT ``(x, y, z)`` in mm (Comprehensive 3D SR).
    """

    finding: tuple[str, str, str]
    present: bool
    probability: float
    tracking_uid: str
    algorithm_name: str
    algorithm_version: str
    source_sop_instance_uids: tuple[str, ...]
    location_kind: str | None
    out_of_distribution: bool | None = None
    tracking_id: str = ""
    segment_number: int | None = None
    segmentation_sop_instance_uid: str | None = None
    volume_mm3: float | None = None
    longest_axial_diameter_mm: float | None = None
    mean_attenuation_hu: float | None = None
    centroid: tuple[float, float, float] | None = None


def _valid(vr: str, value: object) -> bool:
    """`value` fits the format of `vr` (PS3.5 6.2), as pydicom and highdicom parse it."""
    try:
        validate_value(vr, value, pydicom_config.RAISE)  # raises without logging the value
        parse = _FORMATTED_VRS.get(vr)
        if parse is not None and value:
            parse(value)
    except (ValueError, TypeError):
        return False
    return True


def _decimal_string(value: object) -> str | None:
    """A DS value as a valid DS (PS3.5 6.2: at most 16 characters): itself when valid, the
    same number re-encoded in 16 characters when it has too many digits, None when it is not
    a number."""
    text = str(value)
    if _valid("DS", text):
        return text
    try:
        number = float(text)
    except ValueError:
        return None
    return format_number_as_ds(number) if np.isfinite(number) else None


def _person_name(value: str) -> str:
    """A PN value in the form PS3.5 6.2 allows: per component group, trailing ``^`` dropped,
    components past the fifth joined to the fifth (name suffix) with a space, the group cut
    at 64 characters (PS3.5 Table 6.2-1). A valid name is returned as it is."""
    groups = []
    for group in value.split("="):
        parts = group.rstrip("^").split("^")
        if len(parts) > 5:
            parts = [*parts[:4], " ".join(p for p in parts[4:] if p)]
        groups.append("^".join(parts)[:64].rstrip("^"))
    fixed = "=".join(groups)
    return value if fixed == value.rstrip("^=") or fixed == value else fixed


def _sanitise(header: Dataset) -> list[str]:
    """Empty the values highdicom would refuse to copy into a result object; keywords changed.

    Vendor quirks seen in sources: a dashed date (``1901-12-31``) or another unparsable DA,
    DT, TM or AS value, a Patient's Sex outside M/F/O (``U``; lower case is upper-cased), a
    decimal string with too many digits (``70.12345678901234567``: re-encoded in 16
    characters; one that is no number is emptied), several values in a single-valued person
    name (the first kept), or a person name with more than five components or a group
    over 64 characters (:func:`_person_name`). highdicom validates what it copies strictly
    and its error quotes the value, and dciodvfy rejects what it lets through, so the copy is
    fixed first: an invalid formatted value becomes empty (allowed for type 2 and 3
    attributes, and what "unknown" is); the source files keep their values as received. Only
    top-level attributes are looked at: those are what results copy.
    """
    changed: list[str] = []
    for elem in header:
        if elem.VR == "SQ" or elem.value is None or elem.value == "":
            continue
        value = elem.value
        multiple = isinstance(value, MultiValue)
        if elem.VR in _FORMATTED_VRS:
            single = not elem.tag.is_private and dictionary_VM(elem.tag) == "1"
            values = list(value) if multiple else [value]
            if (multiple and single) or not all(_valid(elem.VR, v) for v in values):
                elem.value = ""
                changed.append(elem.keyword or str(elem.tag))
        elif elem.keyword == "PatientSex" and (multiple or str(value) not in _PATIENT_SEX):
            # Lower case ("f") is a known quirk of a valid code; anything else is unknown.
            upper = "" if multiple else str(value).strip().upper()
            elem.value = upper if upper in _PATIENT_SEX else ""
            changed.append(elem.keyword)
        elif elem.VR == "DS":
            values = list(value) if multiple else [value]
            fixed = [_decimal_string(v) for v in values]
            if any(f is None for f in fixed):
                elem.value = ""
                changed.append(elem.keyword or str(elem.tag))
            elif fixed != [str(v) for v in values]:
                elem.value = fixed if multiple else fixed[0]
                changed.append(elem.keyword or str(elem.tag))
        elif elem.VR == "PN" and multiple and elem.keyword and dictionary_VM(elem.tag) == "1":
            first = _person_name(str(value[0]))
            elem.value = first
            changed.append(elem.keyword)
        elif elem.VR == "PN" and not multiple and _person_name(str(value)) != str(value):
            elem.value = _person_name(str(value))
            changed.append(elem.keyword or str(elem.tag))
    return changed


def source_header(ds: Dataset) -> Dataset:
    """A copy of a source image's header, fit to be evidence for a derived object.

    Pixel data is left out (highdicom needs only the header), missing type 2 Patient and
    General Study attributes (PS3.3 C.7.1.1, C.7.2.1) are added empty, so headers read with
    ``stop_before_pixels=True`` or written by sloppy modalities work, and values highdicom
    would refuse to copy (a dashed birth date, Patient's Sex ``U``: see :func:`_sanitise`)
    are emptied, so such a source still gets its results and no error quotes its values.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A source image, with or without pixel data.

    Returns
    -------
    pydicom.dataset.Dataset
        A new dataset; ``ds`` is not changed.
    """
    header = Dataset()
    for elem in ds:
        if elem.keyword not in _PIXEL_KEYWORDS:
            # A new element per attribute (what _sanitise changes is the copy's), sharing the
            # immutable values: a deep copy of every value cost ~10 ms a CT slice header, 3 s
            # for a 300-slice volume's SEG and again for its SR. Sequences are nested
            # datasets: those are copied deeply.
            header.add(copy.deepcopy(elem) if elem.VR == "SQ" else copy.copy(elem))
    if hasattr(ds, "file_meta"):
        header.file_meta = copy.deepcopy(ds.file_meta)
    for keyword in _TYPE2_DEFAULTS:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    changed = _sanitise(header)
    if changed:
        LOGGER.info("source %s: invalid %s emptied on the results' copy", header.SOPInstanceUID,
                    ", ".join(changed))
    return header


def device_observer_uid(model_name: str) -> str:
    """The Device Observer UID (TID 1004) of a model: stable across versions and runs.

    Parameters
    ----------
    model_name : str
        The registered model name.

    Returns
    -------
    str
    """
    return str(generate_uid(entropy_srcs=["dicom-ai", "device-observer", model_name]))


# What differs between the slices of one series, or names the instance (PS3.3 C.12.1 SOP
# Common, C.7.6.1 General Image, C.7.6.2 Image Plane, C.7.6.3 Image Pixel): everything a
# derived object reads of a source beyond the first of its series.
_PER_INSTANCE = (
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "ImageType", "AcquisitionNumber",
    "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime", "Rows", "Columns",
    "NumberOfFrames", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
    "SliceThickness", "SpacingBetweenSlices", "SliceLocation", "FrameOfReferenceUID",
    "StudyInstanceUID", "SeriesInstanceUID", "PatientOrientation",
)
_PER_INSTANCE_TAGS = tuple(BaseTag(tag_for_keyword(k) or 0) for k in _PER_INSTANCE)
_PER_INSTANCE_SET = frozenset(_PER_INSTANCE_TAGS)


def _slice_header(first: Dataset, elements: dict[BaseTag, DataElement], ds: Dataset) -> Dataset:
    """A header for a slice of ``first``'s series: ``first``'s (already fit) attributes with the
    slice's own :data:`_PER_INSTANCE` ones, checked as :func:`source_header` checks them.

    Patient, study and equipment attributes are the series' (results copy them from the first
    source anyway); a full :func:`source_header` per slice costs about twice as much.
    """
    own = Dataset()
    for tag in _PER_INSTANCE_TAGS:
        if tag in ds:
            own.add(copy.copy(ds[tag]))
    _sanitise(own)
    # Elements of its own (setting an attribute changes its element's value), copied as
    # source_header copies them; built as a dict: Dataset.add per element costs milliseconds.
    merged: dict[BaseTag, DataElement | RawDataElement] = {
        tag: copy.deepcopy(elem) if elem.VR == "SQ" else copy.copy(elem)
        for tag, elem in elements.items() if tag not in _PER_INSTANCE_SET
    }
    for tag in _PER_INSTANCE_TAGS:
        if tag in own:
            merged[tag] = own[tag]
    header = Dataset(merged)
    if hasattr(first, "file_meta"):
        header.file_meta = first.file_meta
    return header


def source_headers(sources: Sequence[Dataset]) -> dict[str, Dataset]:
    """The sources' headers fit to be evidence (:func:`source_header`), by SOP Instance UID.

    The first source of each series gets a full :func:`source_header`; the others its
    attributes with their own per-instance ones (instance, position, geometry): the same
    result for a consistent series at a fraction of the cost (300 CT slice headers: 0.26 s,
    not 0.67 s, here).

    Parameters
    ----------
    sources : sequence of pydicom.dataset.Dataset
        Source image headers, pixel data not needed; duplicates (by SOP Instance UID) are
        dropped.

    Returns
    -------
    dict of str to pydicom.dataset.Dataset
        In the order of ``sources``.

    Raises
    ------
    ReportError
        No sources.
    """
    if not sources:
        raise ReportError("at least one source image is needed")
    headers: dict[str, Dataset] = {}
    firsts: dict[str, tuple[Dataset, dict[BaseTag, DataElement]]] = {}
    for ds in sources:
        uid = str(ds.SOPInstanceUID)
        if uid in headers:
            continue
        series = str(ds.get("SeriesInstanceUID", ""))
        if series not in firsts:
            header = headers[uid] = source_header(ds)
            firsts[series] = (header, {elem.tag: elem for elem in header})
        else:
            headers[uid] = _slice_header(*firsts[series], ds)
    return headers



def _lookup(headers: dict[str, Dataset], uid: str, what: str) -> Dataset:
    try:
        return headers[uid]
    except KeyError:
        raise ReportError(f"{what} {uid} is not one of the source images") from None


def _frames(frame_number: int | None) -> list[int] | None:
    return None if frame_number is None else [frame_number]


def _algorithm(run: ModelRun, finding: Finding) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with the run's parameters as ``key=value`` text, threshold always included."""
    parameters = {str(key): value for key, value in run.parameters.items()}
    # The finding's own operating threshold is the one its Present/Absent decision used.
    parameters["threshold"] = finding.threshold
    if finding.ood_score is not None:
        parameters["ood_score"] = float(finding.ood_score)
    texts = [f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
             for key, value in sorted(parameters.items())]
    return hd.sr.AlgorithmIdentification(
        name=run.model_name, version=run.model_version, parameters=texts
    )


_Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


def _group(run: ModelRun, finding: Finding, number: int, headers: dict[str, Dataset],
           segmentation: Dataset | None, kind: SRKind = "comprehensive") -> _Group:
    """One measurement group (TID 1501, 1410 or 1411) for one finding."""
    if not finding.sop_instance_uids:
        raise ReportError(f"finding {finding.tracking_uid} names no source image")
    images = [_lookup(headers, uid, "finding image") for uid in finding.sop_instance_uids]
    finding_code = to_code(finding.finding)
    identifier = f"{finding.label} #{number}"
    if finding.region is not None and finding.region.tracking_id:
        identifier = finding.region.tracking_id
    tracking = hd.sr.TrackingIdentifier(uid=finding.tracking_uid, identifier=identifier)
    sites = [hd.sr.FindingSite(to_code(finding.finding_site))] if finding.finding_site else None
    evaluations = [hd.sr.QualitativeEvaluation(
        name=finding_code, value=PRESENT if finding.present else ABSENT
    )]
    if finding.ood_score is not None:  # the model checked its input against its training data
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=OUT_OF_DISTRIBUTION, value=PRESENT if finding.out_of_distribution else ABSENT))
    location = finding.location
    if finding.region is not None:
        if location is not None:
            raise ReportError(f"finding {finding.tracking_uid} has both a location and a "
                              "region")
        return _volume_group(finding, images, headers, segmentation, kind,
                             tracking=tracking, algorithm=_algorithm(run, finding),
                             sites=sites, evaluations=evaluations)
    # A ROI group (TID 1410/1411) has no Source Image For Measurement Group: the probability
    # measurement names its source images instead (TID 300 "Source of measurement").
    measurement_images = None if location is None else [
        hd.sr.SourceImageForMeasurement.from_source_image(image) for image in images
    ]
    probability = hd.sr.Measurement(
        name=PROBABILITY, value=float(finding.probability), unit=NO_UNITS,
        referenced_images=measurement_images,
    )
    algorithm = _algorithm(run, finding)
    if location is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=finding_code, algorithm_id=algorithm,
            finding_sites=sites, measurements=[probability], qualitative_evaluations=evaluations,
            source_images=[
                hd.sr.SourceImageForMeasurementGroup.from_source_image(image)
                for image in images
            ],
        )
    image = _lookup(headers, location.sop_instance_uid, "location image")
    if location.kind == "segment":
        if segmentation is None:
            raise ReportError(f"finding {finding.tracking_uid} is a segment but no segmentation "
                             "was given")
        if location.segment_number is None:
            raise ReportError(f"finding {finding.tracking_uid} has no segment number")
        # Built by hand: ReferencedSegment.from_segmentation crashes on a one-frame SEG
        # (docs/notes.md).
        segment = hd.sr.ReferencedSegment(
            sop_class_uid=str(segmentation.SOPClassUID),
            sop_instance_uid=str(segmentation.SOPInstanceUID),
            segment_number=location.segment_number,
            # No frame numbers: with them dciodvfy rejects Referenced Segment Number.
            source_images=[hd.sr.SourceImageForSegmentation.from_source_image(
                image, referenced_frame_numbers=_frames(location.frame_number))],
        )
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=finding_code, algorithm_id=algorithm,
            finding_sites=sites, measurements=[probability], qualitative_evaluations=evaluations,
            referenced_segment=segment,
        )
    if location.kind == "point":
        if location.point is None:
            raise ReportError(f"finding {finding.tracking_uid}: a point location needs a point")
        row, col = location.point
        graphic_type = hd.sr.GraphicTypeValues.POINT
        # SCOORD is (column, row); ours is (row, column) (PS3.3 C.18.6.1.1).
        data = np.array([[col, row]], dtype=np.float64)
    elif location.kind == "bbox":
        if location.bbox is None:
            raise ReportError(f"finding {finding.tracking_uid}: a bbox location needs a bbox")
        r0, c0, r1, c1 = location.bbox
        graphic_type = hd.sr.GraphicTypeValues.POLYLINE
        # A closed polyline: the first point repeated last (PS3.3 C.18.6.1.2).
        data = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)
    else:
        raise ReportError(f"unknown location kind {location.kind!r}")
    region = hd.sr.ImageRegion(
        graphic_type=graphic_type, graphic_data=data,
        source_image=hd.sr.SourceImageForRegion.from_source_image(
            image, referenced_frame_numbers=_frames(location.frame_number)),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=finding_code, algorithm_id=algorithm,
        finding_sites=sites, measurements=[probability], qualitative_evaluations=evaluations,
        referenced_region=region,
    )


def _volume_group(finding: Finding, images: list[Dataset], headers: dict[str, Dataset],
                  segmentation: Dataset | None, kind: SRKind, *,
                  tracking: hd.sr.TrackingIdentifier, algorithm: hd.sr.AlgorithmIdentification,
                  sites: list[hd.sr.FindingSite] | None,
                  evaluations: list[hd.sr.QualitativeEvaluation],
                  ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for a volume region: its SEG segment, the slices it touches, its measures."""
    region = finding.region
    assert region is not None  # the caller's branch
    if segmentation is None:
        raise ReportError(f"finding {finding.tracking_uid} is a volume region but no "
                          "segmentation was given")
    first = headers.get(region.sop_instance_uids[0], images[0])
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=str(segmentation.SOPClassUID),
        sop_instance_uid=str(segmentation.SOPInstanceUID),
        segment_number=region.segment_number,
        # The slices the region touches, without frame numbers (single-frame CT/MR slices;
        # with them dciodvfy rejects Referenced Segment Number, docs/notes.md).
        source_images=[hd.sr.SourceImageForSegmentation.from_source_image(image)
                       for image in images],
    )
    measurements = [
        hd.sr.Measurement(name=PROBABILITY, value=float(finding.probability), unit=NO_UNITS),
        hd.sr.Measurement(name=VOLUME, value=float(region.volume_mm3), unit=CUBIC_MILLIMETER),
        hd.sr.Measurement(name=LONG_AXIS, value=float(region.longest_axial_diameter_mm),
                          unit=MILLIMETER),
    ]
    modality = str(first.get("Modality", "") or "").upper()
    if modality == "CT" and region.mean_intensity is not None:
        measurements.append(hd.sr.Measurement(
            name=ATTENUATION_COEFFICIENT, value=float(region.mean_intensity),
            unit=HOUNSFIELD_UNIT, derivation=MEAN))
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=to_code(finding.finding),
        algorithm_id=algorithm, finding_sites=sites, measurements=measurements,
        qualitative_evaluations=evaluations, referenced_segment=segment,
    )
    if kind == "comprehensive3d":
        frame_of_reference = first.get("FrameOfReferenceUID")
        if not frame_of_reference:
            raise ReportError(f"finding {finding.tracking_uid}: a 3D centroid needs the "
                              "source's Frame of Reference UID")
        group[0].ContentSequence.append(hd.sr.Scoord3DContentItem(
            name=CENTER_OF_MASS, graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.array([region.centroid], dtype=np.float64),
            frame_of_reference_uid=str(frame_of_reference),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ))
    return group


def _predecessor(prior: PriorReport) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = prior.study_instance_uid
    ds.SeriesInstanceUID = prior.series_instance_uid
    ds.SOPClassUID = prior.sop_class_uid
    ds.SOPInstanceUID = prior.sop_instance_uid
    return ds


def build_sr(run: ModelRun, sources: Sequence[Dataset], *, kind: SRKind = "comprehensive",
             series_instance_uid: str, sop_instance_uid: str, series_number: int = 9901,
             instance_number: int = 1, predecessor: PriorReport | None = None,
             segmentation: Dataset | None = None, software_version: str = "",
             headers: Mapping[str, Dataset] | None = None) -> Dataset:
    """Build the TID 1500 Measurement Report of one model run (PS3.16 TID 1500, PS3.3 A.35.3).

    The SR joins the source study in a new series: Comprehensive SR (A.35.3) or Comprehensive
    3D SR (A.35.13), complete, unverified and preliminary (machine output nobody has signed).

    Parameters
    ----------
    run : ModelRun
        The findings, present and absent, one measurement group each.
    sources : sequence of pydicom.dataset.Dataset
        The source image headers (pixel data not needed); the first gives patient and study.
    kind : {"comprehensive", "comprehensive3d"}
        The SOP class, chosen per destination.
    series_instance_uid, sop_instance_uid : str
        The SR's UIDs (deterministic per job).
    series_number, instance_number : int
        General Series / SR Document General numbers.
    predecessor : PriorReport, optional
        A previously sent SR this one replaces (Predecessor Documents Sequence).
    segmentation : pydicom.dataset.Dataset, optional
        The run's SEG, required when a finding is located by a segment; recorded as evidence.
    software_version : str
        Software Versions (0018,1020) of dicom-ai.
    headers : mapping, optional
        :func:`source_headers` of `sources`, when the caller built them already (a job's SEG
        and SR take the same ones: 0.8 s for 300 CT slices under load).

    Returns
    -------
    pydicom.dataset.Dataset
        A highdicom SR instance; write it with ``save_as(path, enforce_file_format=True)``.

    Raises
    ------
    ReportError
        (a ValueError) No sources, a finding that names an image not among them, or a segment
        finding without ``segmentation``. What highdicom raises passes through: the caller
        describes it with :func:`dicom_ai.exceptions.safe_message`.
    """
    headers = dict(headers) if headers is not None else source_headers(sources)
    first = next(iter(headers.values()))
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DCM.Device),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(run.model_name),
            name=run.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=run.model_version,
        ),
    )
    numbers: dict[str, int] = {}
    groups: list[_Group] = []
    for finding in run.findings:
        numbers[finding.label] = numbers.get(finding.label, 0) + 1
        groups.append(_group(run, finding, numbers[finding.label], headers, segmentation,
                             kind))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported(first),
        imaging_measurements=groups,
    )
    evidence: list[Dataset] = list(headers.values())
    if segmentation is not None:
        evidence.append(segmentation)
    sr_class = hd.sr.Comprehensive3DSR if kind == "comprehensive3d" else hd.sr.ComprehensiveSR
    sr: Dataset = sr_class(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[_predecessor(predecessor)] if predecessor else None,
        series_description=f"AI results ({run.model_name} {run.model_version})"[:64],
        software_versions=software_version or None,
    )
    return sr


# The SR classes highdicom reads (``hd.sr.srread``'s map, for a dataset already in memory).
_SR_CLASSES: dict[str, type[hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR | hd.sr.EnhancedSR]] = {
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
    EnhancedSRStorage: hd.sr.EnhancedSR,
}


def _measurement_report(ds: Dataset) -> hd.sr.MeasurementReport:
    """The TID 1500 content of `ds` as highdicom's reader, `ds` left as it was."""
    templates = ds.get("ContentTemplateSequence")
    if not templates or str(templates[0].TemplateIdentifier) != "1500":
        raise ValueError("not a TID 1500 Measurement Report")
    sr_class = _SR_CLASSES.get(str(ds.get("SOPClassUID", "")))
    if sr_class is None:
        raise ValueError("not a Comprehensive, Comprehensive 3D or Enhanced SR")
    # Copied here: from_dataset(copy=True) copies the dataset but converts the caller's own
    # content items in place (highdicom 0.28.2, sr/sop.py _SR.from_dataset).
    sr = sr_class.from_dataset(copy.deepcopy(ds), copy=False)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError("not a TID 1500 Measurement Report")
    return report


def _groups_in_order(report: hd.sr.MeasurementReport) -> list[_Group]:
    """The report's measurement groups with a template identifier, in document order.

    highdicom returns each template's groups by themselves (each list in document order); the
    template identifiers of the "Imaging Measurements" container's groups interleave them.
    A group without an identifier is not ours and is skipped, as highdicom would classify it
    by content.
    """
    by_template: dict[str, Iterator[_Group]] = {
        "1501": iter([g for g in report.get_image_measurement_groups() if g[0].template_id]),
        "1410": iter([g for g in report.get_planar_roi_measurement_groups()
                      if g[0].template_id]),
        "1411": iter([g for g in report.get_volumetric_roi_measurement_groups()
                      if g[0].template_id]),
    }
    containers = hd.sr.utils.find_content_items(
        report[0], name=codes.DCM.ImagingMeasurements, value_type=hd.sr.ValueTypeValues.CONTAINER)
    if not containers:
        return []
    items = hd.sr.utils.find_content_items(
        containers[0], name=codes.DCM.MeasurementGroup, value_type=hd.sr.ValueTypeValues.CONTAINER)
    groups = []
    for item in items:
        template = item.template_id
        if template in by_template:
            groups.append(next(by_template[template]))
    return groups


def _image_uids(images: Iterable[hd.sr.ImageContentItem]) -> list[str]:
    return [str(image.value[1]) for image in images]


def _sources(group: _Group) -> list[str]:
    """The source images a group references, in document order (the SEG excluded).

    highdicom writes a group's measurements before its source images, region or segment.
    """
    uids: list[str] = []
    for measurement in group.get_measurements():
        uids += _image_uids(measurement.referenced_images)
    if isinstance(group, hd.sr.MeasurementsAndQualitativeEvaluations):
        uids += _image_uids(group.source_images)
    elif isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
        roi = group.roi
        if roi is not None:  # SourceImageForRegion: highdicom reads the SCOORD, not its source
            uids += _image_uids(item for item in hd.sr.utils.find_content_items(
                roi, value_type=hd.sr.ValueTypeValues.IMAGE)
                if isinstance(item, hd.sr.ImageContentItem))
    else:
        segment = group.referenced_segment
        if segment is not None:
            uids += _image_uids(segment.source_images_for_segmentation)
    return list(dict.fromkeys(uids))


def _text(group: _Group, name: Code) -> str:
    """A TEXT child of the group; highdicom 0.28 reads no TID 4019 Algorithm Identification."""
    items = hd.sr.utils.find_content_items(
        group[0], name=name, value_type=hd.sr.ValueTypeValues.TEXT)
    return str(items[0].value) if items else ""


def _read_group(group: _Group) -> ReportedFinding:
    location_kind: str | None = None
    if isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
        roi = group.roi
        graphic = str(roi.GraphicType) if roi is not None else ""
        location_kind = {"POINT": "point", "POLYLINE": "bbox"}.get(graphic, graphic.lower())
    elif isinstance(group, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations):
        location_kind = "segment"
    finding_type = group.finding_type
    if finding_type is None:
        raise ValueError("a measurement group has no finding type")
    evaluations = group.get_qualitative_evaluations(name=finding_type)
    measurements = group.get_measurements(name=PROBABILITY)
    if not evaluations or not measurements:
        raise ValueError(f"group {group.tracking_uid} lacks its evaluation or probability")
    flags = group.get_qualitative_evaluations(name=OUT_OF_DISTRIBUTION)
    segment_number: int | None = None
    segmentation_uid: str | None = None
    if isinstance(group, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations):
        segment = group.referenced_segment
        if segment is not None and isinstance(segment, hd.sr.ReferencedSegment):
            numbers = segment.referenced_segment_numbers
            segment_number = int(numbers[0]) if numbers else None
            segmentation_uid = str(segment.referenced_sop_instance_uid)
    return ReportedFinding(
        finding=from_code(finding_type),
        present=evaluations[0].value in _PRESENT_CODES,
        probability=float(measurements[0].value),
        tracking_uid=str(group.tracking_uid or ""),
        algorithm_name=_text(group, codes.DCM.AlgorithmName),
        algorithm_version=_text(group, codes.DCM.AlgorithmVersion),
        source_sop_instance_uids=tuple(_sources(group)),
        location_kind=location_kind,
        out_of_distribution=(flags[0].value in _PRESENT_CODES) if flags else None,
        tracking_id=str(group.tracking_identifier or ""),
        segment_number=segment_number,
        segmentation_sop_instance_uid=segmentation_uid,
        volume_mm3=_measured(group, VOLUME),
        longest_axial_diameter_mm=_measured(group, LONG_AXIS),
        mean_attenuation_hu=_measured(group, ATTENUATION_COEFFICIENT),
        centroid=_centroid(group),
    )


def _measured(group: _Group, name: hd.sr.CodedConcept) -> float | None:
    """The value of the group's first measurement named ``name``, None without one."""
    found = group.get_measurements(name=name)
    return float(found[0].value) if found else None


def _centroid(group: _Group) -> tuple[float, float, float] | None:
    """The group's Center of Mass SCOORD3D POINT ``(x, y, z)``, None without one."""
    items = hd.sr.utils.find_content_items(
        group[0], name=CENTER_OF_MASS, value_type=hd.sr.ValueTypeValues.SCOORD3D)
    if not items:
        return None
    x, y, z = (float(v) for v in items[0].GraphicData[:3])
    return (x, y, z)


def summarize_sr(ds: Dataset) -> list[ReportedFinding]:
    """Read the measurement groups of a TID 1500 report back, in document order (PS3.16 TID 1500).

    Read through highdicom's :class:`highdicom.sr.MeasurementReport`: TID 1501, TID 1410 and
    TID 1411 groups.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A Measurement Report in a Comprehensive, Comprehensive 3D or Enhanced SR (ours; any
        TID 1500 with probability measurements works). Left unchanged.

    Returns
    -------
    list of ReportedFinding

    Raises
    ------
    ValueError
        Not a TID 1500 report, or a group without finding type, evaluation or probability.
    """
    return [_read_group(group) for group in _groups_in_order(_measurement_report(ds))]
