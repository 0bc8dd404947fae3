"""Heat-map Secondary Capture: the model's heat-map over the source image (PS3.3 A.8.1 SC Image).

An RGB image of the source's size, or scaled down to :data:`MAX_CAPTURE_SIDE` pixels on its
longer side for larger sources (aspect kept, Pixel Spacing scaled to match): the grey image the
model saw, with the heat-map's colour blended in proportionally to the heat (cold areas stay
plain grey), and a burned-in banner at the top stating what it is and what the model decided:
"NOT FOR DIAGNOSTIC USE", "AI heat-map <model> <version>", "<finding> PRESENT|ABSENT
p=<probability> (threshold <t>)" and a colour legend on a fixed 0..1 scale. The same text is in
Image Comments (0020,4000), and Burned In Annotation (0028,0301) is YES. The colour scale is
not normalised per image: the service's heat is Grad-CAM times the model's probability
(:mod:`dicom_ai.inference.explain`, ``scale="probability"``), so red appears only where the
model says the finding is present with high probability. It joins the source study in a new
series and names the source image in the Source Image Sequence (C.7.6.1.1.4). The bound keeps
a capture of an 8192 x 8192 source at 3 MB instead of 200 MB, and the memory to build it small;
the map itself comes from a model input of a few hundred pixels, so nothing is lost.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai.pipeline.preprocessing import fit_shape, resize
from dicom_ai.reporting.sr import MANUFACTURER, source_header
from dicom_ai.values import Finding, HeatMap, ModelRun

__all__ = ["MAX_ALPHA", "MAX_CAPTURE_SIDE", "banner_lines", "build_heatmap_capture",
           "capture_shape", "colorize", "heat_colors", "heatmap_finding"]

#: Opacity of the colour where the heat is 1; it falls linearly to 0 where the heat is 0.
MAX_ALPHA = 0.6
#: Most pixels on the longer side of a heat-map capture (a 1024 x 1024 RGB image is 3 MB).
MAX_CAPTURE_SIDE = 1024

# A jet-like ramp: dark blue, blue, cyan, yellow, red, dark red.
_RAMP_POSITIONS = (0.0, 0.125, 0.375, 0.625, 0.875, 1.0)
_RAMP_RGB = (
    (0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0),
    (0.5, 0.0, 0.0),
)
# (121322, DCM) "Source image for image processing operation" (CID 7202).
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


def capture_shape(source_shape: tuple[int, int]) -> tuple[int, int]:
    """The matrix of the heat-map capture of a source image of `source_shape`.

    Parameters
    ----------
    source_shape : tuple of int
        ``(Rows, Columns)`` of the source image.

    Returns
    -------
    tuple of int
        `source_shape` when its longer side is at most :data:`MAX_CAPTURE_SIDE`, else that
        shape scaled down to it, aspect kept.
    """
    return fit_shape(source_shape, MAX_CAPTURE_SIDE)


def heat_colors(levels: int = 256) -> NDArray[np.uint8]:
    """A colour lookup table for heat values 0..1, ``(levels, 3)`` ``uint8`` RGB.

    Parameters
    ----------
    levels : int
        Number of entries.

    Returns
    -------
    numpy.ndarray
    """
    x = np.linspace(0.0, 1.0, levels)
    ramp = np.asarray(_RAMP_RGB)
    lut = np.stack([np.interp(x, _RAMP_POSITIONS, ramp[:, c]) for c in range(3)], axis=1)
    return np.asarray(np.round(lut * 255.0), dtype=np.uint8)


def colorize(display: NDArray[np.floating], values: NDArray[np.floating]) -> NDArray[np.uint8]:
    """Blend a heat-map over a grey image: colour weight proportional to the heat.

    Parameters
    ----------
    display : numpy.ndarray
        Grey image in [0, 1], ``(rows, columns)``.
    values : numpy.ndarray
        Heat in [0, 1], same shape.

    Returns
    -------
    numpy.ndarray
        ``(rows, columns, 3)`` ``uint8`` RGB.
    """
    grey = np.clip(np.nan_to_num(np.asarray(display, dtype=np.float32)), 0.0, 1.0) * 255.0
    heat = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    lut = heat_colors()
    color = lut[np.round(heat * (len(lut) - 1)).astype(np.intp)].astype(np.float32)
    alpha = (heat * MAX_ALPHA)[..., np.newaxis]
    blended = grey[..., np.newaxis] * (1.0 - alpha) + color * alpha
    return np.asarray(np.clip(np.round(blended), 0, 255), dtype=np.uint8)


def heatmap_finding(run: ModelRun, heatmap: HeatMap) -> Finding | None:
    """The finding a heat-map explains: the run's first finding on the heat-map's image.

    The service maps a classifier's first output (the spec's first label) for every image, and
    :func:`dicom_ai.runner.analysis.analyse` lists each image's findings in output order, so the
    first finding naming the image is that output's.

    Parameters
    ----------
    run : ModelRun
    heatmap : HeatMap

    Returns
    -------
    Finding or None
        None when the run has no finding on that image.
    """
    return next((f for f in run.findings
                 if f.sop_instance_uids and f.sop_instance_uids[0] == heatmap.sop_instance_uid),
                None)


def banner_lines(run: ModelRun, finding: Finding | None) -> list[str]:
    """The burned-in banner's text: what the image is, which model, and what it decided.

    Parameters
    ----------
    run : ModelRun
        Model name and version.
    finding : Finding, optional
        The explained finding (probability, threshold, decision); None leaves that line out.

    Returns
    -------
    list of str
    """
    lines = ["NOT FOR DIAGNOSTIC USE", f"AI heat-map {run.model_name} {run.model_version}"]
    if finding is not None:
        decision = "PRESENT" if finding.present else "ABSENT"
        lines.append(f"{finding.finding.meaning} {decision} p={finding.probability:.3f} "
                     f"(threshold {finding.threshold:.3f})")
    return lines


#: The legend's text: the colour scale is fixed (module docstring), its top is p = 1.
LEGEND = "colour = Grad-CAM x p, fixed scale 0"


def _burn_banner(rgb: NDArray[np.uint8], lines: list[str]) -> NDArray[np.uint8]:
    """Burn white text and a colour legend on a black bar across the top.

    The font shrinks until every line fits; the last line is the legend, the text
    :data:`LEGEND`, a colour ramp of the heat-map's scale and "1".
    """
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: crisp white text, legible however it is scaled
    width, height = image.size
    ramp_width = max(16, width // 6)
    legend_width = ramp_width + 16  # a gap, the ramp, then " 1"
    layouts = [[" - ".join(lines), LEGEND], [*lines, LEGEND]]
    chosen: tuple[list[str], ImageFont.FreeTypeFont | ImageFont.ImageFont] | None = None
    for size in range(max(8, height // 24), 5, -1):
        font = ImageFont.load_default(size=size)
        for layout in layouts:
            # Un-antialiased text renders up to a few per cent wider than measured: 10% spare.
            if all(1.1 * draw.textlength(text, font=font) + (legend_width if n == len(layout) - 1
                                                             else 0) <= width - 4
                   for n, text in enumerate(layout)):
                chosen = (layout, font)
                break
        if chosen:
            break
    if chosen is None:  # a tiny image: the smallest font, one line each, clipped at the edge
        chosen = ([*lines, LEGEND], ImageFont.load_default(size=6))
    layout, font = chosen
    line_height = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    draw.rectangle((0, 0, width, line_height * len(layout) + 2), fill=(0, 0, 0))
    for index, text in enumerate(layout):
        draw.text((2, 1 + index * line_height), text, fill=(255, 255, 255), font=font)
    # The legend's ramp at the right end of its line, at the colours full opacity would give.
    top = 1 + (len(layout) - 1) * line_height
    left = width - legend_width + 4
    lut = heat_colors()
    for x in range(ramp_width):
        if left + x >= width:
            break
        colour = lut[round(x * (len(lut) - 1) / max(1, ramp_width - 1))]
        draw.line((left + x, top + 2, left + x, top + line_height - 3),
                  fill=(int(colour[0]), int(colour[1]), int(colour[2])))
    draw.text((left + ramp_width + 3, top), "1", fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8)


def _scaled_spacing(value: Any, source: int, capture: int) -> float:
    """A Pixel Spacing value (mm, DS) for `capture` pixels covering `source` pixels."""
    spacing = float(value)
    return spacing if capture == source else float(f"{spacing * source / capture:.6g}")


def _orientation(source: Dataset) -> tuple[str, str] | None:
    """Patient Orientation (C.7.6.1.1.1) from the source, or from its Image Orientation."""
    orientation = source.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2 and all(orientation):
        letters = (str(orientation[0])[:1], str(orientation[1])[:1])
        if all(letter in "APRLHF" for letter in letters):
            return letters
    cosines = source.get("ImageOrientationPatient")
    if cosines is None or len(cosines) != 6:
        return None
    # The dominant axis of each direction: +x is the patient's left, +y posterior, +z head.
    names = (("R", "L"), ("A", "P"), ("F", "H"))

    def letter(vector: list[float]) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return names[axis][1] if vector[axis] > 0 else names[axis][0]

    values = [float(v) for v in cosines]
    return (letter(values[:3]), letter(values[3:]))


def build_heatmap_capture(heatmap: HeatMap, source: Dataset, run: ModelRun, *,
                          series_instance_uid: str, sop_instance_uid: str,
                          series_number: int = 9903, instance_number: int = 1,
                          software_version: str = "",
                          finding: Finding | None = None) -> Dataset:
    """Build the heat-map Secondary Capture of one source image (PS3.3 A.8.1, C.8.6).

    Parameters
    ----------
    heatmap : HeatMap
        Heat values and the grey display image, both of the source image's shape or of
        :func:`capture_shape` of it (larger arrays are scaled down to that first).
    source : pydicom.dataset.Dataset
        The source image header (pixel data not needed): patient, study, body part,
        laterality and orientation come from it.
    run : ModelRun
        The run (model name and version for the banner and the series description).
    series_instance_uid, sop_instance_uid : str
        The capture's UIDs (deterministic per job).
    series_number, instance_number : int
        General Series / General Image numbers.
    software_version : str
        Software Versions (0018,1020) of dicom-ai.
    finding : Finding, optional
        The finding the map explains, for the banner's probability and decision; default
        :func:`heatmap_finding`.

    Returns
    -------
    pydicom.dataset.Dataset
        An RGB Secondary Capture Image with Burned In Annotation "YES" and the banner's text in
        Image Comments, of
        :func:`capture_shape` of the source (Pixel Spacing scaled when it is smaller).

    Raises
    ------
    ValueError
        The heat-map is of another image or its arrays are neither the source's shape nor
        the capture's.
    """
    header = source_header(source)
    if heatmap.sop_instance_uid != str(header.SOPInstanceUID):
        raise ValueError(f"heat-map of {heatmap.sop_instance_uid} given with source image "
                         f"{header.SOPInstanceUID}")
    shape = (int(header.Rows), int(header.Columns))
    matrix = capture_shape(shape)
    for array in (heatmap.values, heatmap.display):
        if array.shape not in (shape, matrix):
            raise ValueError(f"heat-map shapes {heatmap.values.shape}/{heatmap.display.shape} "
                             f"are neither the source image's {shape} nor the capture's {matrix}")
    values, display = (array if array.shape == matrix else resize(array, matrix)
                       for array in (heatmap.values, heatmap.display))
    lines = banner_lines(run, finding if finding is not None else heatmap_finding(run, heatmap))
    rgb = _burn_banner(colorize(display, values), lines)
    orientation = _orientation(header)
    laterality = str(header.get("Laterality", "") or "")
    spacing = header.get("PixelSpacing")
    # A scaled-down capture covers the same area: its pixels are larger by the same ratio.
    pixel_spacing = (_scaled_spacing(spacing[0], shape[0], matrix[0]),
                     _scaled_spacing(spacing[1], shape[1], matrix[1])) if spacing else None
    sc: Dataset = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # Placeholder only when the source has no orientation: emptied below (type 2).
        patient_orientation=orientation or ("L", "F"),
        laterality=laterality if laterality in ("R", "L") else None,
        # highdicom annotates tuple[int, int] but writes any DS (PS3.3 C.8.6.2 Pixel Spacing).
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"AI heat-map ({run.model_name})"[:64],
        manufacturer_model_name=run.model_name[:64],
        software_versions=software_version or None,
    )
    # from_ref_dataset copies only the type 1/2 patient and study attributes; take all of the
    # Patient and General Study modules so the capture matches its source (dcentvfy).
    sc.copy_patient_and_study_information(header)
    if orientation is None:
        sc.PatientOrientation = ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # the banner (PS3.3 C.7.6.1.1.7)
    # The banner's text as an attribute too: readable without OCR (LT, up to 10240 chars).
    sc.ImageComments = " - ".join(lines)
    scaled = "" if matrix == shape else f", scaled from {shape[0]} x {shape[1]}"
    sc.DerivationDescription = (f"Grad-CAM of {run.model_name} {run.model_version} times its "
                                f"probability (fixed 0-1 colour scale) blended over the source "
                                f"image{scaled}; not for diagnostic use")
    # from_ref_dataset copies neither; strict validation wants them (docs/notes.md).
    if header.get("BodyPartExamined"):
        sc.BodyPartExamined = header.BodyPartExamined
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if heatmap.frame_number is not None:
        item.ReferencedFrameNumber = heatmap.frame_number
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _SOURCE_PURPOSE
    item.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [item]
    return sc
