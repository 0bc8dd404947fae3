"""Synthetic phantom studies with ground truth, for demos, tests and training smoke runs.

:func:`synthesize` writes complete, validator-clean DICOM instances (PS3.3 A.2 CR Image,
A.26 DX Image "For Presentation", A.3 CT Image, A.4 MR Image) under
``out/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, a ``labels.csv`` with one
row per SOP instance, and one ground-truth mask (``.npy``, ``uint8``) per positive image or
volume under ``out/masks/``.

The phantoms have structure: a chest-like projection (body outline, two darker lung fields,
mediastinum, spine, rib arcs, smooth and fine noise) with 1..3 round nodules for positives, or a
small abdominal volume (body with a fat layer, liver, spleen, kidneys, spine, aorta) with 1..2
spherical lesions. Lesions are always brighter than their surroundings; ``difficulty`` (0..1)
makes them smaller and fainter.

Everything derives from ``seed``: UIDs (``generate_uid(entropy_srcs=...)``), dates, sizes and
pixels, so the same arguments give byte-identical files. UIDs also derive from every other
argument that changes content (study count, positive fraction, difficulty) and from a
``namespace`` (the demo has its own): two runs that differ in pixels never share a UID. For
volumes the label and lesion geometry are per study and repeated on each slice's row;
``mask_path`` is relative to ``out``.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from skimage import filters

__all__ = ["LABEL_COLUMNS", "SOP_CLASSES", "Modality", "SynthReport", "synthesize"]

logger = logging.getLogger(__name__)

Modality = Literal["CR", "DX", "CT", "MR"]
FloatArray = NDArray[np.float64]

SOP_CLASSES: dict[str, UID] = {
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),
    "MR": UID("1.2.840.10008.5.1.4.1.1.4"),
}

LABEL_COLUMNS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "label", "lesion_count",
    "lesion_center_row", "lesion_center_col", "lesion_center_slice", "lesion_radius_px",
    "mask_path",
)

#: Transfer syntaxes a study may use, with the pydicom encoding plugin for each.
_CODECS: tuple[tuple[UID, str], ...] = (
    (ExplicitVRLittleEndian, ""),
    (ExplicitVRLittleEndian, ""),
    (RLELossless, "pydicom"),
    (JPEG2000Lossless, "pylibjpeg"),
    (JPEGLSLossless, "pyjpegls"),
)
_MODALITY_INDEX = {"CR": 1, "DX": 2, "CT": 3, "MR": 4}
_BASE_DATE = dt.date(2020, 1, 1)
_MAGNIFICATION = 1800.0 / 1650.0


@dataclass(frozen=True)
class SynthReport:
    """What :func:`synthesize` wrote.

    Attributes
    ----------
    out : Path
        The output folder.
    labels_csv : Path
        ``out/labels.csv``.
    studies, instances, positives, negatives, lesions : int
        Counts; ``positives``/``negatives`` count studies.
    transfer_syntaxes : tuple[tuple[str, int], ...]
        Instances written per transfer syntax UID.
    monochrome1 : int
        Instances written as MONOCHROME1 (CR/DX only).
    fallbacks : tuple[str, ...]
        One line per instance whose encoder failed and was written uncompressed instead.
    """

    out: Path
    labels_csv: Path
    studies: int
    instances: int
    positives: int
    negatives: int
    lesions: int
    transfer_syntaxes: tuple[tuple[str, int], ...] = field(default=())
    monochrome1: int = 0
    fallbacks: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class _Lesion:
    row: int
    col: int
    slice: int  # -1 for projection images
    radius_px: float


@dataclass
class _Image:
    """One study's phantom before encoding: stored pixel values and display parameters."""

    stored: NDArray[np.integer]  # (rows, cols) or (slices, rows, cols)
    mask: NDArray[np.uint8] | None
    lesions: list[_Lesion]
    pixel_spacing: float
    slice_thickness: float
    bits_stored: int
    signed: bool
    photometric: str
    window: tuple[float, float]
    intercept: float


def _uid(seed: int, modality: str, *parts: object, variant: str = "") -> UID:
    # generate_uid hashes the sources concatenated: without a separator ("instance", 1, 14)
    # and ("instance", 11, 4) gave one SOP Instance UID to two slices of different studies.
    # `variant` names everything else that changes the content (see synthesize).
    return generate_uid(entropy_srcs=["|".join(["dicom-ai synth", str(seed), modality, variant,
                                                *(str(p) for p in parts)])])


def _smooth(arr: FloatArray, sigma: float) -> FloatArray:
    """skimage's Gaussian filter (typed for mypy)."""
    sk_gaussian = cast(Callable[..., Any], filters.gaussian)
    return np.asarray(sk_gaussian(arr, sigma=sigma, preserve_range=True), dtype=np.float64)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> FloatArray:
    """Zero-mean, unit-std low-frequency noise."""
    field_ = _smooth(rng.normal(size=shape), sigma)
    return np.asarray((field_ - field_.mean()) / (float(field_.std()) + 1e-12), dtype=np.float64)


def _ellipse(rr: FloatArray, cc: FloatArray, r0: float, c0: float, ar: float,
             ac: float) -> NDArray[np.bool_]:
    return np.asarray(((rr - r0) / ar) ** 2 + ((cc - c0) / ac) ** 2 <= 1.0)


# --------------------------------------------------------------------------- projection (CR/DX)


def _chest(rng: np.random.Generator, positive: bool, difficulty: float,
           modality: str) -> _Image:
    rows = int(rng.integers(256, 513)) // 2 * 2
    cols = int(np.clip(rows * rng.uniform(0.85, 1.15), 256, 512)) // 2 * 2
    fov_mm = rng.uniform(350.0, 430.0)
    spacing = round(fov_mm / max(rows, cols), 4)
    rr, cc = np.mgrid[0:rows, 0:cols].astype(np.float64)
    img = np.full((rows, cols), 0.05)
    cr, ccol = rows * rng.uniform(0.5, 0.56), cols * rng.uniform(0.48, 0.52)
    body = _ellipse(rr, cc, cr, ccol, rows * 0.55, cols * rng.uniform(0.42, 0.47))
    img[body] = 0.55
    lung_ar, lung_ac = rows * rng.uniform(0.27, 0.31), cols * rng.uniform(0.13, 0.16)
    lung_r = rows * rng.uniform(0.40, 0.45)
    lungs: list[NDArray[np.bool_]] = []
    for side in (-1, 1):
        lung_c = ccol + side * cols * rng.uniform(0.17, 0.20)
        lungs.append(_ellipse(rr, cc, lung_r, lung_c, lung_ar, lung_ac) & body)
    lung_mask = lungs[0] | lungs[1]
    img[lung_mask] = 0.22
    # Mediastinum and heart, then the spine on top.
    mediastinum = _ellipse(rr, cc, lung_r, ccol, rows * 0.30, cols * rng.uniform(0.06, 0.08))
    heart_c = ccol + cols * rng.uniform(0.02, 0.06)
    heart = _ellipse(rr, cc, lung_r + rows * 0.12, heart_c, rows * 0.13, cols * 0.13) & body
    spine = (np.abs(cc - ccol) < cols * 0.03) & body
    img[mediastinum] = 0.72
    img[heart] = 0.68
    img[spine] = 0.8
    # Lung tissue the heart and mediastinum do not cover: where ribs show and nodules sit.
    lungs = [lung & ~(mediastinum | heart | spine) for lung in lungs]
    lung_mask = lungs[0] | lungs[1]
    # Posterior rib arcs, brighter bands over the lung fields.
    n_ribs = int(rng.integers(6, 9))
    top = lung_r - lung_ar * 0.9
    rib_gap = 1.8 * lung_ar / n_ribs
    thickness = max(rows * 0.012, 2.0)
    for side in (-1, 1):
        lateral = np.clip(side * (cc - ccol) / (cols * 0.35), 0.0, None)
        for k in range(n_ribs):
            curve = top + k * rib_gap + rib_gap * 1.2 * lateral ** 2
            band = (np.abs(rr - curve) < thickness) & (side * (cc - ccol) > 0) & lung_mask
            img[band] += 0.12
    lesions: list[_Lesion] = []
    mask: NDArray[np.uint8] | None = None
    if positive:
        mask = np.zeros((rows, cols), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            radius = max(rng.uniform(4.0, 15.0) * (1.3 - 0.8 * difficulty) / spacing, 2.0)
            contrast = rng.uniform(0.7, 1.3) * (0.30 - 0.25 * difficulty)
            lung = lungs[int(rng.integers(0, 2))]
            inner = lung & _ellipse(rr, cc, lung_r, ccol, lung_ar - radius, cols)
            candidates = np.argwhere(inner)
            r0, c0 = (int(v) for v in candidates[int(rng.integers(0, len(candidates)))])
            dist = np.hypot(rr - r0, cc - c0)
            img += contrast * np.sqrt(np.clip(1.0 - (dist / radius) ** 2, 0.0, 1.0))
            mask[dist <= radius] = 1
            lesions.append(_Lesion(r0, c0, -1, round(float(radius), 2)))
    img = _smooth(img, 1.0)
    noise = rng.uniform(0.005, 0.025)
    img += 0.03 * _smooth_noise(rng, img.shape, max(rows, cols) / 24.0)
    img += noise * rng.normal(size=img.shape)
    bits = int(rng.choice([12, 16]))
    top_value = 2 ** bits - 1
    scale = top_value * rng.uniform(0.6, 0.9)
    stored = np.clip(np.rint(np.clip(img, 0.0, 1.2) * scale), 0, top_value).astype(np.uint16)
    center, width = 0.5 * scale, 0.8 * scale
    photometric = "MONOCHROME2"
    if rng.random() < 0.35:
        photometric = "MONOCHROME1"
        stored = (top_value - stored).astype(np.uint16)
        center = top_value - center
    return _Image(stored, mask, lesions, spacing, 0.0, bits, False, photometric,
                  (round(center, 1), round(width, 1)), 0.0)


# --------------------------------------------------------------------------- volume (CT/MR)


def _abdomen(rng: np.random.Generator, positive: bool, difficulty: float,
             modality: str) -> _Image:
    n = int(rng.choice([128, 160]))
    slices = int(rng.integers(16, 25))
    spacing = round(rng.uniform(340.0, 420.0) / n, 4)
    thickness = float(rng.choice([2.5, 3.0, 5.0]))
    zz, rr, cc = np.mgrid[0:slices, 0:n, 0:n].astype(np.float64)
    # Millimetres from the volume centre.
    z, y, x = (zz - slices / 2) * thickness, (rr - n / 2) * spacing, (cc - n / 2) * spacing
    ct = modality == "CT"
    t = {  # tissue values: HU for CT, arbitrary T1-like intensities for MR
        "air": -1000.0 if ct else 0.0, "fat": -100.0 if ct else 900.0,
        "muscle": 45.0 if ct else 350.0, "liver": 60.0 if ct else 520.0,
        "spleen": 48.0 if ct else 420.0, "kidney": 32.0 if ct else 460.0,
        "bone": 450.0 if ct else 650.0, "blood": 160.0 if ct else 120.0,
    }
    ax, ay = rng.uniform(140.0, 165.0), rng.uniform(100.0, 120.0)
    vol = np.full(zz.shape, t["air"])
    body = (x / ax) ** 2 + (y / ay) ** 2 <= 1.0
    vol[body] = t["fat"]
    vol[(x / (ax - 12)) ** 2 + (y / (ay - 12)) ** 2 <= 1.0] = t["muscle"]

    def ellipsoid(cx: float, cy: float, cz: float, sx: float, sy: float,
                  sz: float) -> NDArray[np.bool_]:
        return np.asarray(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2 + ((z - cz) / sz) ** 2
                          <= 1.0)

    # Patient left is +x (LPS); anterior is -y.
    organs = {
        "liver": ellipsoid(-rng.uniform(50, 65), -rng.uniform(5, 20), rng.uniform(-10, 10),
                           rng.uniform(55, 70), rng.uniform(50, 65), rng.uniform(70, 90)),
        "spleen": ellipsoid(rng.uniform(70, 85), rng.uniform(15, 30), rng.uniform(-5, 15),
                            rng.uniform(22, 30), rng.uniform(30, 40), rng.uniform(40, 55)),
    }
    vol[organs["liver"]] = t["liver"]
    vol[organs["spleen"]] = t["spleen"]
    for side in (-1, 1):
        vol[ellipsoid(side * rng.uniform(50, 60), rng.uniform(40, 50), rng.uniform(-20, 0),
                      22, 28, 45)] = t["kidney"]
    vol[(x ** 2 + (y - ay * 0.6) ** 2) <= rng.uniform(15, 20) ** 2] = t["bone"]
    vol[((x - 15) ** 2 + (y - ay * 0.3) ** 2) <= rng.uniform(9, 12) ** 2] = t["blood"]
    lesions: list[_Lesion] = []
    mask: NDArray[np.uint8] | None = None
    if positive:
        mask = np.zeros(zz.shape, dtype=np.uint8)
        base = 80.0 if ct else 320.0
        for _ in range(int(rng.integers(1, 3))):
            radius_mm = max(rng.uniform(5.0, 16.0) * (1.3 - 0.8 * difficulty), 2.0 * spacing)
            contrast = base * rng.uniform(0.7, 1.3) * (1.0 - 0.75 * difficulty)
            organ = organs["liver"] if rng.random() < 0.75 else organs["spleen"]
            inner = organ & (np.abs(z) < slices / 2 * thickness - radius_mm * 0.5)
            candidates = np.argwhere(inner)
            s0, r0, c0 = (int(v) for v in candidates[int(rng.integers(0, len(candidates)))])
            dist = np.sqrt((x - x[s0, r0, c0]) ** 2 + (y - y[s0, r0, c0]) ** 2
                           + (z - z[s0, r0, c0]) ** 2)
            vol += contrast * np.sqrt(np.clip(1.0 - (dist / radius_mm) ** 2, 0.0, 1.0))
            mask[dist <= radius_mm] = 1
            lesions.append(_Lesion(r0, c0, s0, round(radius_mm / spacing, 2)))
    vol = np.stack([_smooth(plane, 0.7) for plane in vol])
    noise_sd = rng.uniform(5.0, 20.0) if ct else rng.uniform(8.0, 30.0)
    if ct:
        vol += noise_sd * rng.normal(size=vol.shape)
        bits = int(rng.choice([12, 16]))
        signed = bool(rng.random() < 0.5)
        top = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        stored_f = np.clip(np.rint(vol + 1024.0), 0, top)
        window = (40.0, 400.0)
        intercept = -1024.0
    else:
        bias = 1.0 + 0.15 * _smooth_noise(rng, (n, n), n / 6.0)
        vol = np.abs(vol * bias + noise_sd * rng.normal(size=vol.shape)
                     + 1j * noise_sd * rng.normal(size=vol.shape))
        bits = int(rng.choice([12, 16]))
        signed = False
        stored_f = np.clip(np.rint(vol), 0, 2 ** bits - 1)
        lo, hi = np.percentile(stored_f, [1.0, 99.5])
        window = (round(float(lo + hi) / 2, 1), round(float(hi - lo), 1))
        intercept = 0.0
    stored = stored_f.astype(np.int16 if signed else np.uint16)
    return _Image(stored, mask, lesions, spacing, thickness, bits, signed, "MONOCHROME2",
                  window, intercept)


# --------------------------------------------------------------------------- headers


def _ds_string(value: float) -> str:
    """A DS value that fits 16 characters."""
    return f"{value:.6g}"


def _common(ds: Dataset, *, seed: int, modality: str, index: int,
            rng: np.random.Generator, study_uid: UID, series_uid: UID) -> None:
    """Patient, General Study, General Series, General Equipment (PS3.3 C.7.1.1-C.7.5.1)."""
    number = index + 1
    study_day = _BASE_DATE + dt.timedelta(days=int(rng.integers(0, 1800)))
    study_time = dt.time(int(rng.integers(7, 19)), int(rng.integers(0, 60)),
                         int(rng.integers(0, 60)))
    birth = dt.date(int(rng.integers(1940, 2001)), int(rng.integers(1, 13)),
                    int(rng.integers(1, 29)))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"SYNTH^{number:04d}"
    ds.PatientID = f"SYN{number:04d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["M", "F", "O"]))
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom: no real patient"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = \
        study_day.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = \
        study_time.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.StudyDate
    ds.InstanceCreationTime = ds.StudyTime
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StudyID = f"S{number:04d}"
    ds.AccessionNumber = f"A{seed % 100000:05d}{_MODALITY_INDEX[modality]}{number:04d}"
    ds.StudyDescription = {
        "CR": "Synthetic chest CR", "DX": "Synthetic chest DX",
        "CT": "Synthetic abdomen CT", "MR": "Synthetic abdomen MR",
    }[modality]
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"{ds.StudyDescription} phantom"
    ds.Manufacturer = "dicom-ai synth"
    ds.ManufacturerModelName = "phantom"
    ds.DeviceSerialNumber = "SYNTH-1"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "dicom-ai synthetic"
    ds.StationName = "SYNTH"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.AcquisitionNumber = 1


def _pixel_module(ds: Dataset, image: _Image, rows: int, cols: int) -> None:
    """Image Pixel (PS3.3 C.7.6.3) and VOI LUT (C.11.2)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = image.photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = image.bits_stored
    ds.HighBit = image.bits_stored - 1
    ds.PixelRepresentation = 1 if image.signed else 0
    ds.WindowCenter = _ds_string(image.window[0])
    ds.WindowWidth = _ds_string(image.window[1])
    ds.WindowCenterWidthExplanation = "SYNTH"


def _projection(ds: Dataset, image: _Image, modality: str, rng: np.random.Generator) -> None:
    """CR Series/Image (C.8.1) or DX Series/Anatomy/Image/Detector/Positioning (C.8.11)."""
    rows, cols = image.stored.shape
    spacing = [_ds_string(image.pixel_spacing)] * 2
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    # Patient-plane spacing is the phantom's; the detector sees it magnified 1800/1650.
    ds.ImagerPixelSpacing = [_ds_string(image.pixel_spacing * _MAGNIFICATION)] * 2
    ds.KVP = _ds_string(float(rng.integers(100, 126)))
    ds.DistanceSourceToDetector = "1800"
    ds.ExposureTime = int(rng.integers(5, 30))
    ds.XRayTubeCurrent = int(rng.integers(200, 400))
    ds.Exposure = int(rng.integers(2, 8))
    ds.InstanceNumber = 1
    if modality == "CR":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = -1 if image.photometric == "MONOCHROME1" else 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        inverse = image.photometric == "MONOCHROME1"
        ds.PresentationLUTShape = "INVERSE" if inverse else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
        ds.PixelSpacing = spacing
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "Imager pixel spacing, magnification 1"
        ds.PositionerType = "NONE"
        ds.PatientPosition = ""
        ds.DistanceSourceToPatient = "1650"
        ds.EstimatedRadiographicMagnificationFactor = _ds_string(_MAGNIFICATION)
        ds.AcquisitionContextSequence = []
        code = Dataset()
        code.CodeValue = "51185008"
        code.CodingSchemeDesignator = "SCT"
        code.CodeMeaning = "Thorax"
        ds.AnatomicRegionSequence = [code]
        view = Dataset()
        view.CodeValue = "399348003"
        view.CodingSchemeDesignator = "SCT"
        view.CodeMeaning = "postero-anterior"
        ds.ViewCodeSequence = [view]
    _pixel_module(ds, image, rows, cols)


def _slice(ds: Dataset, image: _Image, modality: str, k: int, rng_values: dict[str, float],
           frame_uid: UID) -> None:
    """Frame of Reference, Image Plane (C.7.6.2), CT Image (C.8.2.1) or MR Image (C.8.3.1)."""
    slices, rows, cols = image.stored.shape
    sp = image.pixel_spacing
    z = (k - slices / 2) * image.slice_thickness
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "ABDOMEN"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds_string(-cols / 2 * sp), _ds_string(-rows / 2 * sp),
                               _ds_string(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds_string(sp)] * 2
    ds.SliceThickness = _ds_string(image.slice_thickness)
    ds.SliceLocation = _ds_string(z)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT" else [
        "ORIGINAL", "PRIMARY", "OTHER"]
    if modality == "CT":
        ds.RescaleIntercept = _ds_string(image.intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = _ds_string(rng_values["kvp"])
        ds.ScanOptions = "HELICAL"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds_string(cols * sp)
        ds.ConvolutionKernel = "STANDARD"
        ds.ExposureTime = int(rng_values["exposure_time"])
        ds.XRayTubeCurrent = int(rng_values["tube_current"])
        ds.Exposure = int(rng_values["exposure"])
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.FilterType = "BODY"
        ds.GeneratorPower = int(rng_values["kvp"] * rng_values["tube_current"] / 1000)
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "se2d1"
        ds.AngioFlag = "N"
        ds.RepetitionTime = _ds_string(rng_values["tr"])
        ds.EchoTime = _ds_string(rng_values["te"])
        ds.EchoTrainLength = 1
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = _ds_string(rng_values["field"] * 42.577478)
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = _ds_string(rng_values["field"])
        ds.SpacingBetweenSlices = _ds_string(image.slice_thickness)
        ds.FlipAngle = "90"
        ds.ReceiveCoilName = "BODY"
        ds.TransmitCoilName = "BODY"
        ds.PercentSampling = "100"
        ds.PercentPhaseFieldOfView = "100"
        ds.PixelBandwidth = "130"
        ds.InPlanePhaseEncodingDirection = "ROW"
        ds.PatientPosition = "HFS"
    _pixel_module(ds, image, rows, cols)


# --------------------------------------------------------------------------- writing


def _write(ds: Dataset, arr: NDArray[np.integer], path: Path, codec: tuple[UID, str],
           fallbacks: list[str]) -> UID:
    """Set the pixel data (compressed when asked) and write the file; returns its syntax."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    syntax, plugin = codec
    arr = np.ascontiguousarray(arr)
    if syntax != ExplicitVRLittleEndian:
        try:
            # Lossless: the instance keeps its UID (pydicom would otherwise make a new one).
            ds.compress(syntax, arr, encoding_plugin=plugin, generate_instance_uid=False)
        except Exception as exc:  # any encoder failure: write uncompressed instead
            fallbacks.append(f"{ds.SOPInstanceUID}: {syntax.name} failed ({exc}); "
                             "written uncompressed")
            logger.warning("synth: %s encoder failed for %s; writing uncompressed",
                           syntax.name, ds.SOPInstanceUID)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            syntax = ExplicitVRLittleEndian
    if syntax == ExplicitVRLittleEndian:
        if "PixelData" in ds:
            del ds.PixelData
        ds.add_new(0x7FE00010, "OW", arr.tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return syntax


def synthesize(out: Path, *, studies: int, seed: int, modality: Modality,
               positive_fraction: float = 0.5, difficulty: float = 0.5,
               compress: bool = True, namespace: str = "synth") -> SynthReport:
    """Write ``studies`` synthetic studies of ``modality`` with labels and masks under ``out``.

    Parameters
    ----------
    out : Path
        Output folder (created); existing files with the same names are overwritten.
    studies : int
        Number of studies; each has one series (one image for CR/DX, 16-24 slices for CT/MR).
    seed : int
        Everything (UIDs, dates, geometry, pixels) derives from it.
    modality : {"CR", "DX", "CT", "MR"}
        SOP class: CR Image, Digital X-Ray For Presentation, CT Image or MR Image Storage.
    positive_fraction : float
        Fraction of studies with lesions, rounded to a whole number of studies.
    difficulty : float
        0 (large, high-contrast lesions) to 1 (small, faint ones).
    compress : bool
        When false every instance is written Explicit VR Little Endian; pixels, UIDs and
        headers are otherwise identical to the compressed run.
    namespace : str
        Part of every UID, with all arguments above that change content (not ``out`` or
        ``compress``): runs that differ in any of them never share a UID (PS3.5 9.1: a UID
        names one object). ``dicom-ai demo`` uses its own namespace, so ``synth`` never
        reproduces the demo's UIDs.

    Returns
    -------
    SynthReport
        Counts, the labels.csv path, transfer syntaxes used and encoder fallbacks.
    """
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASSES)}, not {modality!r}")
    if studies < 0:
        raise ValueError("studies must be >= 0")
    if not 0.0 <= positive_fraction <= 1.0 or not 0.0 <= difficulty <= 1.0:
        raise ValueError("positive_fraction and difficulty must be within [0, 1]")
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    # The label of study i depends on the study count (shuffled flags), its pixels on the
    # fraction and difficulty: all of them name the run.
    variant = f"{namespace}|{studies}|{positive_fraction!r}|{difficulty!r}"
    n_positive = round(studies * positive_fraction)
    flags = np.zeros(studies, dtype=bool)
    flags[:n_positive] = True
    np.random.default_rng([seed, _MODALITY_INDEX[modality]]).shuffle(flags)

    rows_out: list[dict[str, str]] = []
    syntaxes: Counter[str] = Counter()
    fallbacks: list[str] = []
    monochrome1 = lesions_total = instances = 0
    for index in range(studies):
        rng = np.random.default_rng([seed, _MODALITY_INDEX[modality], index])
        positive = bool(flags[index])
        make = _chest if modality in ("CR", "DX") else _abdomen
        image = make(rng, positive, difficulty, modality)
        codec = _CODECS[int(rng.integers(0, len(_CODECS)))]
        if not compress:
            codec = (ExplicitVRLittleEndian, "")
        study_uid = _uid(seed, modality, "study", index, variant=variant)
        series_uid = _uid(seed, modality, "series", index, variant=variant)
        frame_uid = _uid(seed, modality, "frame", index, variant=variant)
        header_rng = np.random.default_rng([seed, _MODALITY_INDEX[modality], index, 1])
        mask_path = ""
        if image.mask is not None:
            mask_name = f"masks/{series_uid}.npy"
            np.save(out / mask_name, image.mask, allow_pickle=False)
            mask_path = mask_name
        first = image.lesions[0] if image.lesions else None
        geometry = {
            "lesion_center_row": str(first.row) if first else "",
            "lesion_center_col": str(first.col) if first else "",
            "lesion_center_slice": str(first.slice) if first and first.slice >= 0 else "",
            "lesion_radius_px": f"{first.radius_px:g}" if first else "",
        }
        lesions_total += len(image.lesions)
        volume = image.stored.ndim == 3
        planes = list(image.stored) if volume else [image.stored]
        slice_values = {
            "kvp": float(header_rng.choice([100, 120, 140])),
            "tube_current": float(header_rng.integers(150, 400)),
            "exposure_time": float(header_rng.integers(500, 1000)),
            "exposure": float(header_rng.integers(100, 300)),
            "tr": float(header_rng.uniform(400, 700)), "te": float(header_rng.uniform(8, 20)),
            "field": float(header_rng.choice([1.5, 3.0])),
        }
        for k, plane in enumerate(planes):
            ds = Dataset()
            sop_uid = _uid(seed, modality, "instance", index, k, variant=variant)
            ds.SOPClassUID = SOP_CLASSES[modality]
            ds.SOPInstanceUID = sop_uid
            _common(ds, seed=seed, modality=modality, index=index,
                    rng=np.random.default_rng([seed, _MODALITY_INDEX[modality], index, 2]),
                    study_uid=study_uid, series_uid=series_uid)
            if volume:
                _slice(ds, image, modality, k, slice_values, frame_uid)
            else:
                _projection(ds, image, modality, np.random.default_rng(
                    [seed, _MODALITY_INDEX[modality], index, 3]))
            path = out / str(study_uid) / str(series_uid) / f"{sop_uid}.dcm"
            syntax = _write(ds, plane, path, codec, fallbacks)
            syntaxes[str(syntax)] += 1
            instances += 1
            monochrome1 += image.photometric == "MONOCHROME1"
            rows_out.append({
                "StudyInstanceUID": str(study_uid), "SeriesInstanceUID": str(series_uid),
                "SOPInstanceUID": str(sop_uid), "label": "1" if positive else "0",
                "lesion_count": str(len(image.lesions)), **geometry, "mask_path": mask_path,
            })
        logger.debug("synth: wrote study %s (%s, %d instances, positive=%s)",
                     study_uid, modality, len(planes), positive)

    labels_csv = out / "labels.csv"
    with labels_csv.open("w", newline="", encoding="ascii") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows_out)
    return SynthReport(
        out=out, labels_csv=labels_csv, studies=studies, instances=instances,
        positives=int(n_positive), negatives=studies - int(n_positive), lesions=lesions_total,
        transfer_syntaxes=tuple(sorted(syntaxes.items())), monochrome1=monochrome1,
        fallbacks=tuple(fallbacks),
    )
