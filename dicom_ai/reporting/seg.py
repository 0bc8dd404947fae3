"""BINARY Segmentation of a run's segment findings (PS3.3 A.51 Segmentation IOD, C.8.20).

One segment per finding located by a segment, numbered as the finding's location says (1..n),
labelled by the finding code under the category "Morphologically abnormal structure", with the
model as its algorithm (C.8.20.2 Segment Description). The SR's TID 1411 groups reference these
segments by number.

Two layouts:

* 2D findings (``Finding.location`` of kind ``segment``): one frame per source image that holds
  a segment, per segment;
* volume findings (``Finding.region``, :class:`~dicom_ai.values.VolumeRegion`): a multi-frame
  SEG whose Derivation references every slice of the source series, one segment per region
  (``region.segment_number``), frames carrying the Plane Position (Patient) of their source
  slice (C.7.6.16.2.3), organised by highdicom's defaults (Dimension Index: Referenced Segment
  Number, then Image Position (Patient)), the layout OHIF and 3D Slicer read. Empty frames are
  left out (highdicom's ``omit_empty_frames``): dcmqi, the converter behind 3D Slicer's SEG
  support, writes SEGs that way by default (``itkimage2dcmSegmentation(...,
  skipEmptySlices=true)``), and a reader places each frame by its plane position and source
  slice. A 5-lesion 300-slice SEG then holds the lesions' slices (150 frames for five 30-slice
  lesions), not 1500 frames.

Memory: the volume SEG is painted into one ``uint8`` label map ``(slices, rows, columns)``
(75 MiB for 300 x 512 x 512, whatever the number of segments) when the regions do not overlap
(connected components never do); only overlapping regions need the ``bool`` stack ``(slices,
rows, columns, segments)`` (375 MiB for 300 x 512 x 512 x 5, plus highdicom's overlap check,
which sums that stack into an ``int64`` volume: 600 MiB more).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.exceptions import ReportError
from dicom_ai.reporting.codes import ALGORITHM_FAMILY, MORPHOLOGICALLY_ABNORMAL_STRUCTURE, to_code
from dicom_ai.reporting.sr import MANUFACTURER, source_header, source_headers
from dicom_ai.values import Finding, ModelRun, VolumeRegion

__all__ = ["build_seg", "has_segments", "region_findings", "segment_findings"]


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


def region_findings(run: ModelRun) -> list[Finding]:
    """The findings of ``run`` located by a :class:`~dicom_ai.values.VolumeRegion`, in
    segment-number order.

    Parameters
    ----------
    run : ModelRun
        A model run.

    Returns
    -------
    list of Finding
    """
    found = [f for f in run.findings if f.region is not None]
    return sorted(found, key=lambda f: f.region.segment_number if f.region else 0)


def has_segments(run: ModelRun) -> bool:
    """Whether ``run`` has anything for a SEG: a 2D segment location or a volume region.

    Parameters
    ----------
    run : ModelRun
        A model run.

    Returns
    -------
    bool
    """
    return bool(segment_findings(run) or region_findings(run))


def build_seg(run: ModelRun, sources: Sequence[Dataset], *, series_instance_uid: str,
              sop_instance_uid: str, series_number: int = 9902,
              software_version: str = "",
              headers: Mapping[str, Dataset] | None = None) -> Dataset:
    """Build the BINARY Segmentation of a run's segment findings (PS3.3 A.51, C.8.20).

    Parameters
    ----------
    run : ModelRun
        The run; findings whose ``location.kind == "segment"`` become segments, numbered by
        ``location.segment_number`` (which must be 1..n), masks from ``location.mask``. When
        findings carry a ``region`` instead, the SEG is the volume layout (module docstring):
        one segment per region, numbered by ``region.segment_number`` (1..n), every region on
        the same source grid.
    sources : sequence of pydicom.dataset.Dataset
        Source image headers of one series (pixel data not needed); for regions, at least
        every slice the regions' grid names (``region.sop_instance_uids``), in any order.
    series_instance_uid, sop_instance_uid : str
        The SEG's UIDs (deterministic per job).
    series_number : int
        General Series number.
    software_version : str
        Software Versions (0018,1020), type 1 in Enhanced General Equipment: "unknown" if empty.
    headers : mapping, optional
        :func:`~dicom_ai.reporting.sr.source_headers` of `sources`, when the caller built them
        already (the job's SR takes the same ones); used by the volume layout only (a 2D SEG
        copies the headers of the few images that hold a segment).

    Returns
    -------
    pydicom.dataset.Dataset
        A highdicom Segmentation; frames hold only images with a segment.

    Raises
    ------
    ReportError
        (a ValueError) No segment findings, segment numbers not 1..n, a missing or wrongly
        shaped mask, or a location on an image not among ``sources``; for regions also
        regions on different grids, a grid slice not among ``sources``, or 2D segment
        locations in the same run.
    """
    if region_findings(run):
        return _build_volume_seg(run, sources, series_instance_uid=series_instance_uid,
                                 sop_instance_uid=sop_instance_uid, series_number=series_number,
                                 software_version=software_version, headers=headers)
    findings = segment_findings(run)
    if not findings:
        raise ReportError("the run has no finding located by a segment: nothing to segment")
    numbers = [f.location.segment_number if f.location else None for f in findings]
    if numbers != list(range(1, len(findings) + 1)):
        raise ReportError(f"segment numbers must be 1..{len(findings)}, got {numbers}")
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        by_uid.setdefault(str(ds.SOPInstanceUID), ds)
    # Frames: the source images that hold a segment, in the caller's source order.
    wanted = {f.location.sop_instance_uid for f in findings if f.location}
    missing = wanted.difference(by_uid)
    if missing:
        raise ReportError(f"segment location images not among the sources: {sorted(missing)}")
    used = [uid for uid in by_uid if uid in wanted]
    images = []
    for uid in used:
        images.append(source_header(by_uid[uid]))
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
    return _segmentation(run, images, pixels, descriptions,
                         series_instance_uid=series_instance_uid, series_number=series_number,
                         sop_instance_uid=sop_instance_uid, software_version=software_version)


def _segmentation(run: ModelRun, images: list[Dataset], pixels: NDArray[Any],
                  descriptions: list[hd.seg.SegmentDescription], *, series_instance_uid: str,
                  series_number: int, sop_instance_uid: str,
                  software_version: str) -> Dataset:
    """The highdicom Segmentation of ``pixels`` on ``images`` (one frame per image)."""
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
        omit_empty_frames=True,
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


def _build_volume_seg(run: ModelRun, sources: Sequence[Dataset], *, series_instance_uid: str,
                      sop_instance_uid: str, series_number: int, software_version: str,
                      headers: Mapping[str, Dataset] | None) -> Dataset:
    """The multi-frame SEG of a run's volume regions (see the module docstring)."""
    findings = region_findings(run)
    if segment_findings(run):
        raise ReportError("a run cannot mix 2D segment locations and volume regions in one SEG")
    regions = [f.region for f in findings if f.region is not None]
    numbers = [r.segment_number for r in regions]
    if numbers != list(range(1, len(regions) + 1)):
        raise ReportError(f"segment numbers must be 1..{len(regions)}, got {numbers}")
    grid = regions[0]
    for region in regions[1:]:
        if (region.sop_instance_uids != grid.sop_instance_uids
                or region.shape != grid.shape):
            raise ReportError("every region of one SEG must lie on the same source grid")
    wanted = set(grid.sop_instance_uids)
    if headers is None:
        headers = source_headers([ds for ds in sources if str(ds.SOPInstanceUID) in wanted]
                                 or sources)
    missing = [uid for uid in grid.sop_instance_uids if uid not in headers]
    if missing:
        raise ReportError(f"{len(missing)} slices of the regions' grid are not among the "
                          f"sources (first: {missing[0]})")
    # Every slice, in grid order: frame k of the pixel array is slice k (its plane position).
    images = [headers[uid] for uid in grid.sop_instance_uids]
    _, rows, cols = grid.shape
    if (int(images[0].Rows), int(images[0].Columns)) != (rows, cols):
        raise ReportError(f"the regions' grid {grid.shape} does not match the slices "
                          f"({int(images[0].Rows)} x {int(images[0].Columns)})")
    pixels = _paint(regions, grid.shape)
    if len(set(grid.sop_instance_uids)) == 1 and len(images) > 1:
        # An enhanced multi-frame source (one instance, a slice per frame): highdicom takes it
        # as the one source image, with a pixel-array frame per source frame in frame order.
        images, pixels = _onto_frames(images[0], pixels)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=run.model_name, family=ALGORITHM_FAMILY, version=run.model_version
    )
    descriptions = []
    for finding, region in zip(findings, regions, strict=True):
        tracking_id = region.tracking_id or f"{finding.label} #{region.segment_number}"
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=region.segment_number,
            segment_label=f"{finding.label} {tracking_id}"[:64],
            segmented_property_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            segmented_property_type=to_code(finding.finding),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=finding.tracking_uid,
            tracking_id=tracking_id[:64],
            anatomic_regions=[to_code(finding.finding_site)] if finding.finding_site else None,
        ))
    return _segmentation(run, images, pixels, descriptions,
                         series_instance_uid=series_instance_uid, series_number=series_number,
                         sop_instance_uid=sop_instance_uid, software_version=software_version)


def _onto_frames(header: Dataset, pixels: NDArray[Any]) -> tuple[list[Dataset], NDArray[Any]]:
    """Slices in grid order (along the normal) as the frames of one multi-frame source.

    The grid orders the frames by position (``load_volume``); the SEG's pixel array follows
    the source's frame order (highdicom's rule for a multi-frame source), so each slice goes to
    the frame whose Plane Position (Patient) it is.
    """
    def plane(group: Dataset, keyword: str, attribute: str) -> list[float] | None:
        item = group.get(keyword)
        return [float(v) for v in item[0].get(attribute)] if item else None

    shared = header.SharedFunctionalGroupsSequence[0]
    frames = header.PerFrameFunctionalGroupsSequence
    if len(frames) != pixels.shape[0]:
        raise ReportError(f"the regions' grid has {pixels.shape[0]} slices, the source "
                          f"{len(frames)} frames")
    distances = []
    for frame in frames:
        cosines = (plane(frame, "PlaneOrientationSequence", "ImageOrientationPatient")
                   or plane(shared, "PlaneOrientationSequence", "ImageOrientationPatient"))
        position = (plane(frame, "PlanePositionSequence", "ImagePositionPatient")
                    or plane(shared, "PlanePositionSequence", "ImagePositionPatient"))
        if cosines is None or position is None:
            raise ReportError("a frame of the multi-frame source has no plane position or "
                              "orientation")
        normal = np.cross(cosines[:3], cosines[3:])
        distances.append(float(np.dot(normal, position)))
    order = np.argsort(distances, kind="stable")  # frame index of each slice, in grid order
    on_frames = np.zeros_like(pixels)
    on_frames[order] = pixels
    return [header], on_frames


def _paint(regions: Sequence[VolumeRegion], shape: tuple[int, int, int]) -> NDArray[Any]:
    """The regions' masks on the full grid: a ``uint8`` label map ``(slices, rows, columns)``
    when they do not overlap, else a ``bool`` stack ``(slices, rows, columns, segments)``.

    highdicom takes both for a BINARY SEG; the label map costs one byte a voxel whatever the
    number of segments and spares highdicom's overlap check (an ``int64`` sum over the stack).
    """
    if len(regions) < 256:
        labels = np.zeros(shape, dtype=np.uint8)
        for region in regions:
            window = labels[_box(region)]
            if np.any(window[region.mask]):
                break  # overlapping regions: only the stack can say so
            window[region.mask] = region.segment_number
        else:
            return labels
        del labels
    stack = np.zeros((*shape, len(regions)), dtype=bool)
    for index, region in enumerate(regions):
        stack[(*_box(region), index)] = region.mask
    return stack


def _box(region: VolumeRegion) -> tuple[slice, slice, slice]:
    """Where ``region.mask`` lies in its grid."""
    (s0, r0, c0), (ns, nr, nc) = region.offset, region.mask.shape
    return slice(s0, s0 + ns), slice(r0, r0 + nr), slice(c0, c0 + nc)
