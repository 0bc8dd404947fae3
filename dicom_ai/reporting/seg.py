"""BINARY Segmentation of a run's segment findings (PS3.3 A.51 Segmentation IOD, C.8.20).

One segment per finding located by a segment, numbered as the finding's location says (1..n),
labelled by the finding code under the category "Morphologically abnormal structure", with the
model as its algorithm (C.8.20.2 Segment Description). The SR's TID 1411 groups reference these
segments by number.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.exceptions import ReportError
from dicom_ai.reporting.codes import ALGORITHM_FAMILY, MORPHOLOGICALLY_ABNORMAL_STRUCTURE, to_code
from dicom_ai.reporting.sr import MANUFACTURER, source_header
from dicom_ai.values import Finding, ModelRun

__all__ = ["build_seg", "segment_findings"]


def segment_findings(run: ModelRun) -> list[Finding]:
    """The findings of ``run`` located by a SEG segment, in segment-number order.

    Parameters
    ----------
    run : ModelRun
        A model run.

    Returns
    -------
    list of Finding
    """
    found = [f for f in run.findings if f.location is not None and f.location.kind == "segment"]
    return sorted(found, key=lambda f: (f.location.segment_number or 0) if f.location else 0)


def build_seg(run: ModelRun, sources: Sequence[Dataset], *, series_instance_uid: str,
              sop_instance_uid: str, series_number: int = 9902,
              software_version: str = "") -> Dataset:
    """Build the BINARY Segmentation of a run's segment findings (PS3.3 A.51, C.8.20).

    Parameters
    ----------
    run : ModelRun
        The run; findings whose ``location.kind == "segment"`` become segments, numbered by
        ``location.segment_number`` (which must be 1..n), masks from ``location.mask``.
    sources : sequence of pydicom.dataset.Dataset
        Source image headers of one series (pixel data not needed).
    series_instance_uid, sop_instance_uid : str
        The SEG's UIDs (deterministic per job).
    series_number : int
        General Series number.
    software_version : str
        Software Versions (0018,1020), type 1 in Enhanced General Equipment: "unknown" if empty.

    Returns
    -------
    pydicom.dataset.Dataset
        A highdicom Segmentation; frames hold only images with a segment.

    Raises
    ------
    ReportError
        (a ValueError) No segment findings, segment numbers not 1..n, a missing or wrongly
        shaped mask, or a location on an image not among ``sources``.
    """
    findings = segment_findings(run)
    if not findings:
        raise ReportError("the run has no finding located by a segment: nothing to segment")
    numbers = [f.location.segment_number if f.location else None for f in findings]
    if numbers != list(range(1, len(findings) + 1)):
        raise ReportError(f"segment numbers must be 1..{len(findings)}, got {numbers}")
    headers: dict[str, Dataset] = {}
    for ds in sources:
        headers.setdefault(str(ds.SOPInstanceUID), ds)
    # Frames: the source images that hold a segment, in the caller's source order.
    wanted = {f.location.sop_instance_uid for f in findings if f.location}
    missing = wanted.difference(headers)
    if missing:
        raise ReportError(f"segment location images not among the sources: {sorted(missing)}")
    used = [uid for uid in headers if uid in wanted]
    images = []
    for uid in used:
        images.append(source_header(headers[uid]))
    rows, cols = int(images[0].Rows), int(images[0].Columns)
    pixels = np.zeros((len(used), rows, cols, len(findings)), dtype=bool)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name=run.model_name, family=ALGORITHM_FAMILY, version=run.model_version
    )
    for index, finding in enumerate(findings):
        location = finding.location
        assert location is not None  # segment_findings keeps located findings only
        if location.mask is None:
            raise ReportError(f"segment finding {finding.tracking_uid} has no mask")
        mask = np.asarray(location.mask, dtype=bool)
        if mask.shape != (rows, cols):
            raise ReportError(f"segment finding {finding.tracking_uid}: mask shape {mask.shape} "
                             f"is not the image's {(rows, cols)}")
        pixels[used.index(location.sop_instance_uid), :, :, index] = mask
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=index + 1,
            segment_label=f"{finding.label} #{index + 1}"[:64],
            segmented_property_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            segmented_property_type=to_code(finding.finding),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=finding.tracking_uid,
            tracking_id=f"{finding.label} #{index + 1}"[:64],
            anatomic_regions=[to_code(finding.finding_site)] if finding.finding_site else None,
        ))
    seg: Dataset = hd.seg.Segmentation(
        source_images=images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=run.model_name[:64],
        software_versions=software_version or "unknown",
        device_serial_number=run.model_version[:64],
        content_label="AI_SEG",
        content_description=f"AI segmentation ({run.model_name} {run.model_version})"[:64],
        series_description=f"AI segmentation ({run.model_name})"[:64],
    )
    # highdicom draws a random Dimension Organization UID; derive it from the SEG's own UID so
    # a retried job writes the same object (C.7.6.17 Multi-frame Dimension).
    dimension_uid = generate_uid(entropy_srcs=[sop_instance_uid, "dimension-organization"])
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    if "FrameOfReferenceUID" not in images[0]:
        # Without a frame of reference (CR, DX) the General Image module's Patient Orientation
        # is type 2C and highdicom leaves it out (docs/notes.md); take the source's, else empty.
        seg.PatientOrientation = images[0].get("PatientOrientation") or ""
    return seg
