"""Heat-map Secondary Capture: the model's heat-map over the source image (PS3.3 A.8.1 SC Image).

An RGB image of the source's size: the grey image the model saw, with the heat-map's colour
blended in proportionally to the heat (cold areas stay plain grey), and a burned-in banner
"NOT FOR DIAGNOSTIC USE - AI heat-map <model> <version>" at the top. It joins the source study
in a new series and names the source image in the Source Image Sequence (C.7.6.1.1.4).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai.pipeline.findings import HeatMap, ModelRun
from dicom_ai.reporting.sr import MANUFACTURER, source_header

__all__ = ["MAX_ALPHA", "build_heatmap_capture", "colorize", "heat_colors"]

#: Opacity of the colour where the heat is 1; it falls linearly to 0 where the heat is 0.
MAX_ALPHA = 0.6

# A jet-like ramp: dark blue, blue, cyan, yellow, red, dark red.
_RAMP_POSITIONS = (0.0, 0.125, 0.375, 0.625, 0.875, 1.0)
_RAMP_RGB = (
    (0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0),
    (0.5, 0.0, 0.0),
)
# (121322, DCM) "Source image for image processing operation" (CID 7202).
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


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


def _burn_banner(rgb: NDArray[np.uint8], lines: list[str]) -> NDArray[np.uint8]:
    """Burn white text on a black bar across the top, shrinking the font until it fits."""
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    width, height = image.size
    layouts = [[" - ".join(lines)], lines]
    chosen: tuple[list[str], ImageFont.FreeTypeFont | ImageFont.ImageFont] | None = None
    for size in range(max(8, height // 24), 5, -1):
        font = ImageFont.load_default(size=size)
        for layout in layouts:
            if all(draw.textlength(text, font=font) <= width - 4 for text in layout):
                chosen = (layout, font)
                break
        if chosen:
            break
    if chosen is None:  # a tiny image: the smallest font, two lines, clipped at the edge
        chosen = (lines, ImageFont.load_default(size=6))
    layout, font = chosen
    line_height = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    draw.rectangle((0, 0, width, line_height * len(layout) + 2), fill=(0, 0, 0))
    for index, text in enumerate(layout):
        draw.text((2, 1 + index * line_height), text, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8)


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
                          software_version: str = "") -> Dataset:
    """Build the heat-map Secondary Capture of one source image (PS3.3 A.8.1, C.8.6).

    Parameters
    ----------
    heatmap : HeatMap
        Heat values and the grey display image, both in the source image's shape.
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

    Returns
    -------
    pydicom.dataset.Dataset
        An RGB Secondary Capture Image with Burned In Annotation "YES".

    Raises
    ------
    ValueError
        The heat-map is of another image or its arrays are not the source's shape.
    """
    header = source_header(source)
    if heatmap.sop_instance_uid != str(header.SOPInstanceUID):
        raise ValueError(f"heat-map of {heatmap.sop_instance_uid} given with source image "
                         f"{header.SOPInstanceUID}")
    shape = (int(header.Rows), int(header.Columns))
    if heatmap.values.shape != shape or heatmap.display.shape != shape:
        raise ValueError(f"heat-map shapes {heatmap.values.shape}/{heatmap.display.shape} are not "
                         f"the source image's {shape}")
    rgb = _burn_banner(colorize(heatmap.display, heatmap.values), [
        "NOT FOR DIAGNOSTIC USE", f"AI heat-map {run.model_name} {run.model_version}",
    ])
    orientation = _orientation(header)
    laterality = str(header.get("Laterality", "") or "")
    spacing = header.get("PixelSpacing")
    pixel_spacing = (float(spacing[0]), float(spacing[1])) if spacing else None
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
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = (f"Heat-map of {run.model_name} {run.model_version} blended over "
                                "the source image; not for diagnostic use")
    # from_ref_dataset copies neither; strict validation wants them (DICOM-NOTES).
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
