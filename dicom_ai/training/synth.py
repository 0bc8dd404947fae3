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

With ``chest_ct`` (:class:`ChestCT`) CT studies are realistic chest volumes instead: 100-300
slices of 512 x 512 at 0.6-1 mm, 1-5 mm apart, in HU (air, lungs with vessels, fat, muscle,
heart, liver, spine, ribs, sternum, airway, table), 1..5 lesions of 3-30 mm and varied contrast
in the lungs (solid or ground-glass) and liver (hypo- or hyperdense), written one slice at a
time; their ground truth is ``masks/<SeriesInstanceUID>.npz`` (per-lesion crops with the
geometry, :func:`read_lesion_masks`) and ``lesions.csv`` (:data:`LESION_COLUMNS`).

Everything derives from ``seed``: UIDs (``generate_uid(entropy_srcs=...)``), dates, sizes and
pixels, so the same arguments give byte-identical files. UIDs also derive from every other
argument that changes content (study count, positive fraction, difficulty) and from a
``namespace`` (the demo has its own): two runs that differ in pixels never share a UID. For
volumes the label and lesion geometry are per study and repeated on each slice's row;
``mask_path`` is relative to ``out`` (empty for chest CT, whose masks ``lesions.csv`` names).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import zipfile
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
from scipy import ndimage
from skimage import filters

__all__ = ["LABEL_COLUMNS", "LESION_COLUMNS", "SOP_CLASSES", "ChestCT", "LesionMasks", "Modality",
           "SynthReport", "read_lesion_masks", "synthesize"]

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
    lesions_csv : Path or None
        ``out/lesions.csv`` (one row per lesion) for a chest CT run, else None.
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
    lesions_csv: Path | None = None


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


def _sct_code(value: str, meaning: str) -> Dataset:
    """A code sequence item (PS3.3 8.8) of SNOMED CT."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


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
        ds.AnatomicRegionSequence = [_sct_code("51185008", "Thorax")]
        ds.ViewCodeSequence = [_sct_code("399348003", "postero-anterior")]
    _pixel_module(ds, image, rows, cols)


def _ct_acquisition(ds: Dataset, image: _Image, rng_values: dict[str, float], *,
                    field_of_view: float, kernel: str) -> None:
    """The CT Image module's rescale and acquisition attributes of one slice."""
    ds.RescaleIntercept = _ds_string(image.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = _ds_string(rng_values["kvp"])
    ds.ScanOptions = "HELICAL"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds_string(field_of_view)
    ds.ConvolutionKernel = kernel
    ds.ExposureTime = int(rng_values["exposure_time"])
    ds.XRayTubeCurrent = int(rng_values["tube_current"])
    ds.Exposure = int(rng_values["exposure"])
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.FilterType = "BODY"
    ds.GeneratorPower = int(rng_values["kvp"] * rng_values["tube_current"] / 1000)


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
        _ct_acquisition(ds, image, rng_values, field_of_view=cols * sp, kernel="STANDARD")
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


# --------------------------------------------------------------------------- chest CT volume


@dataclass(frozen=True)
class ChestCT:
    """Options of the realistic chest CT phantom (``synthesize(..., chest_ct=ChestCT())``).

    The defaults are a clinical chest CT: 512 x 512 slices at 0.6-1 mm, 1-5 mm apart, 100-300
    of them; tests shrink ``matrix`` (and widen ``pixel_spacing`` to keep the anatomy's size).

    Attributes
    ----------
    matrix : int
        Rows and columns of each slice (32..1024).
    pixel_spacing : tuple of float
        Range of the in-plane spacing (mm), drawn per study.
    slice_spacings : tuple of float
        Slice spacings (mm) a study may have, one drawn per study; the slice thickness is the
        same (contiguous slices).
    slices : tuple of int
        Range of the slice count; within it a study covers about 300-360 mm.
    lesions : tuple of int
        Range of the lesion count of a positive study.
    lesion_diameter_mm : tuple of float
        Range of lesion diameters (drawn log-uniformly).
    """

    matrix: int = 512
    pixel_spacing: tuple[float, float] = (0.6, 1.0)
    slice_spacings: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
    slices: tuple[int, int] = (100, 300)
    lesions: tuple[int, int] = (1, 5)
    lesion_diameter_mm: tuple[float, float] = (3.0, 30.0)

    @classmethod
    def for_matrix(cls, matrix: int) -> ChestCT:
        """Slices of ``matrix`` x ``matrix`` with the pixel spacing scaled by ``512 / matrix``:
        the same field of view and anatomy as the default, at a coarser (or finer) grid."""
        factor = 512.0 / matrix
        return cls(matrix=matrix, pixel_spacing=(0.6 * factor, 1.0 * factor))

    def check(self) -> None:
        """Raise ValueError for options that cannot make a volume."""
        if not 32 <= self.matrix <= 1024:
            raise ValueError("chest_ct.matrix must be within 32..1024")
        lo, hi = self.pixel_spacing
        if not 0 < lo <= hi or not self.slice_spacings or min(self.slice_spacings) <= 0:
            raise ValueError("chest_ct spacings must be positive ranges")
        if not 2 <= self.slices[0] <= self.slices[1]:
            raise ValueError("chest_ct.slices must be a range of at least 2")
        if not 1 <= self.lesions[0] <= self.lesions[1] or self.lesions[1] > 50:
            raise ValueError("chest_ct.lesions must be a range within 1..50")
        if not 0 < self.lesion_diameter_mm[0] <= self.lesion_diameter_mm[1]:
            raise ValueError("chest_ct.lesion_diameter_mm must be a positive range")


#: Columns of ``lesions.csv``: one row per lesion of a chest CT study.
LESION_COLUMNS = (
    "StudyInstanceUID", "SeriesInstanceUID", "lesion", "location", "diameter_mm",
    "volume_mm3", "voxels", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
    "longest_axial_diameter_mm", "lesion_hu", "background_hu", "contrast_hu", "mask_path",
)

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class _Sphere:
    """A lesion of the chest phantom in patient coordinates (mm)."""

    x: float
    y: float
    z: float
    radius: float
    hu: float
    background: float
    location: str


@dataclass(frozen=True)
class _Vessel:
    """A pulmonary vessel segment: a capsule from ``a`` to ``b`` (mm), radius in mm."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    radius: float


class _Anatomy:
    """The chest phantom: analytic shapes in patient coordinates, drawn one slice at a time.

    LPS (PS3.3 C.7.6.2.1.1): +x patient left, +y posterior, +z head. Everything is a function of
    (x, y, z) so a slice is computed on its own and a lesion can be placed by testing points.
    """

    def __init__(self, rng: np.random.Generator, fov: float, z_top: float,
                 z_bottom: float) -> None:
        self.ax = fov / 2 * rng.uniform(0.78, 0.88)  # body half-width
        self.ay = self.ax * rng.uniform(0.62, 0.72)  # body half-depth
        self.scale = self.ax / 170.0
        wall = rng.uniform(18.0, 30.0) * self.scale
        self.fat = rng.uniform(0.35, 0.55) * wall
        self.ix, self.iy = self.ax - wall, self.ay - wall  # inside the ribcage
        extent = z_top - z_bottom
        self.z_apex = z_top - rng.uniform(0.03, 0.08) * extent
        height = min(rng.uniform(220.0, 270.0), 0.72 * extent)
        self.z_base = self.z_apex - height
        self.dome = rng.uniform(0.12, 0.18) * height
        self.lung_c = [(s * 0.49 * self.ix, -0.04 * self.iy) for s in (-1, 1)]
        self.lung_r = (0.44 * self.ix, 0.80 * self.iy)
        self.heart = (0.14 * self.ix, -0.18 * self.iy, 0.36 * self.ix, 0.42 * self.iy)
        self.heart_z = (self.z_base + 0.5 * self.dome, self.z_base + 0.5 * self.dome
                        + rng.uniform(0.40, 0.50) * height)
        self.spine = (0.0, self.iy - 0.05 * self.iy, 17.0 * self.scale)
        self.aorta = (24.0 * self.scale, self.iy * 0.62, 11.0 * self.scale)
        self.carina = self.z_apex - rng.uniform(0.25, 0.35) * height
        self.disc_phase = rng.uniform(0.0, 28.0)
        self.rib_pitch = height / rng.uniform(9.5, 11.0)
        self.rib_drop = rng.uniform(35.0, 55.0) * self.scale
        self.texture = [(rng.normal(size=3) / rng.uniform(6.0, 20.0), rng.uniform(0, 2 * np.pi))
                        for _ in range(4)]
        self.vessels = self._vessels(rng)

    # -- organs as point tests (vectorised over x, y at one z, or over points) ----------------
    def _dome(self, x: F32, y: F32, side: int) -> F32:
        cx, cy = self.lung_c[0 if side < 0 else 1]
        rho = np.clip(((x - cx) / self.lung_r[0]) ** 2 + ((y - cy) / self.lung_r[1]) ** 2,
                      0.0, 1.0)
        lift = 15.0 * self.scale if side < 0 else 0.0  # the liver lifts the right dome
        return np.asarray(self.z_base + lift + self.dome * (1.0 - rho), dtype=np.float32)

    def lung(self, x: F32, y: F32, z: F32 | float) -> NDArray[np.bool_]:
        """Inside either lung (parenchyma, vessels included)."""
        inside = np.zeros(np.broadcast(x, y, z).shape, dtype=bool)
        apex = np.sqrt(np.clip((self.z_apex - np.asarray(z)) / (40.0 * self.scale), 0.0, 1.0))
        for side, (cx, cy) in zip((-1, 1), self.lung_c, strict=True):
            rx, ry = self.lung_r[0] * apex + 1e-6, self.lung_r[1] * apex + 1e-6
            ellipse = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
            inside |= ellipse & (np.asarray(z) > self._dome(x, y, side))
        medial = np.abs(x) < 0.07 * self.ix
        return np.asarray(inside & ~medial & ~self.heart_at(x, y, z) & ~self._column(x, y))

    def heart_at(self, x: F32, y: F32, z: F32 | float) -> NDArray[np.bool_]:
        hx, hy, rx, ry = self.heart
        lo, hi = self.heart_z
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        g = np.sqrt(np.clip(1.0 - ((np.asarray(z) - mid) / half) ** 2, 0.0, 1.0)) + 1e-6
        return np.asarray(((x - hx) / (rx * g)) ** 2 + ((y - hy) / (ry * g)) ** 2 <= 1.0)

    def _column(self, x: F32, y: F32) -> NDArray[np.bool_]:
        """Spine and descending aorta with a margin (never lung)."""
        sx, sy, sr = self.spine
        axx, ayy, ar = self.aorta
        return np.asarray(((x - sx) ** 2 + (y - sy) ** 2 <= (sr * 1.6) ** 2)
                          | ((x - axx) ** 2 + (y - ayy) ** 2 <= (ar * 1.3) ** 2))

    def liver(self, x: F32, y: F32, z: F32 | float) -> NDArray[np.bool_]:
        """Below the right dome, inside the body's inner wall."""
        ellipse = (((x + 0.33 * self.ix) / (0.62 * self.ix)) ** 2
                   + ((y - 0.02 * self.iy) / (0.78 * self.iy)) ** 2 <= 1.0)
        return np.asarray(ellipse & (np.asarray(z) < self._dome(x, y, -1) - 2.0)
                          & ((x / self.ix) ** 2 + (y / self.iy) ** 2 <= 1.0)
                          & ~self._column(x, y))

    # -- vessels ------------------------------------------------------------------------------
    def _vessels(self, rng: np.random.Generator) -> list[_Vessel]:
        vessels: list[_Vessel] = []
        hilum_z = self.carina - 25.0 * self.scale
        for side, (cx, cy) in zip((-1, 1), self.lung_c, strict=True):
            hilum = (side * 0.22 * self.ix, cy + 0.05 * self.iy, hilum_z)
            for _ in range(int(rng.integers(14, 22))):
                # A trunk to a random point inside the lung, then two thinner branches.
                for _try in range(20):
                    p = (cx + rng.uniform(-0.8, 0.8) * self.lung_r[0],
                         cy + rng.uniform(-0.8, 0.8) * self.lung_r[1],
                         rng.uniform(self.z_base + self.dome, self.z_apex - 10.0))
                    if bool(self.lung(np.array([p[0]], dtype=np.float32),
                                      np.array([p[1]], dtype=np.float32), p[2])[0]):
                        break
                mid = tuple(h + 0.5 * (q - h) for h, q in zip(hilum, p, strict=True))
                r0 = rng.uniform(2.5, 4.5) * self.scale
                vessels.append(_Vessel(hilum, (mid[0], mid[1], mid[2]), r0))
                vessels.append(_Vessel((mid[0], mid[1], mid[2]), p, r0 * 0.6))
                for _b in range(2):
                    end = (p[0] + rng.normal() * 25 * self.scale,
                           p[1] + rng.normal() * 25 * self.scale, p[2] + rng.normal() * 25)
                    vessels.append(_Vessel(p, end, r0 * 0.35))
        return vessels

    # -- one slice ------------------------------------------------------------------------------
    def render(self, z: float, xx: F32, yy: F32, lesions: list[_Sphere],
               pixel: float) -> F32:
        """Hounsfield units of the slice at ``z`` on the grid ``xx, yy`` (before noise)."""
        img = np.full(xx.shape, -1000.0, dtype=np.float32)
        # Only the box around the body and the table holds anything but air.
        box = self._box(xx, yy, -self.ax - pixel, self.ax + pixel, -self.ay - pixel,
                        self.ay + 14.0 + pixel)
        if box is not None:
            img[box] = self._render_box(z, xx[box], yy[box], lesions, pixel)
        return img

    def _render_box(self, z: float, xx: F32, yy: F32, lesions: list[_Sphere],
                    pixel: float) -> F32:
        img = np.full(xx.shape, -1000.0, dtype=np.float32)
        # Table under the patient.
        img[(np.abs(xx) < 0.85 * self.ax) & (yy > self.ay + 6.0) & (yy < self.ay + 14.0)] = 80.0
        body = (xx / self.ax) ** 2 + (yy / self.ay) ** 2 <= 1.0
        img[body] = -95.0
        wall_x, wall_y = self.ax - self.fat, self.ay - self.fat
        img[(xx / wall_x) ** 2 + (yy / wall_y) ** 2 <= 1.0] = 48.0
        inner = (xx / self.ix) ** 2 + (yy / self.iy) ** 2 <= 1.0
        img[inner] = 32.0
        if z < self.z_base + self.dome:
            img[self.liver(xx, yy, z)] = 58.0
            spleen = (((xx - 0.55 * self.ix) / (0.2 * self.ix)) ** 2
                      + ((yy - 0.45 * self.iy) / (0.3 * self.iy)) ** 2 <= 1.0)
            img[spleen & inner & (z < self._dome(xx, yy, 1) - 15.0)] = 46.0
        img[self.heart_at(xx, yy, z)] = 42.0
        lung = self.lung(xx, yy, z)
        if lung.any():
            lx, ly = xx[lung], yy[lung]
            texture = np.zeros(lx.shape, dtype=np.float32)
            for k, phase in self.texture:
                texture += np.cos(k[0] * lx + k[1] * ly + k[2] * z + phase)
            img[lung] = -865.0 + 12.0 * texture
            self._draw_vessels(img, z, xx, yy, lung, pixel)
        self._draw_airway(img, z, xx, yy)
        self._draw_bones(img, z, xx, yy)
        ax_, ay_, ar = self.aorta
        img[(xx - ax_) ** 2 + (yy - ay_) ** 2 <= ar ** 2] = 40.0
        for sphere in lesions:
            _draw_sphere(img, z, xx, yy, sphere, pixel)
        return img

    def _box(self, xx: F32, yy: F32, x0: float, x1: float, y0: float,
             y1: float) -> tuple[slice, slice] | None:
        cols = np.flatnonzero((xx[0] >= x0) & (xx[0] <= x1))
        rows = np.flatnonzero((yy[:, 0] >= y0) & (yy[:, 0] <= y1))
        if not len(cols) or not len(rows):
            return None
        return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)

    def _draw_vessels(self, img: F32, z: float, xx: F32, yy: F32, lung: NDArray[np.bool_],
                      pixel: float) -> None:
        for v in self.vessels:
            (ax_, ay_, az), (bx, by, bz) = v.a, v.b
            if not min(az, bz) - v.radius <= z <= max(az, bz) + v.radius:
                continue
            box = self._box(xx, yy, min(ax_, bx) - v.radius, max(ax_, bx) + v.radius,
                            min(ay_, by) - v.radius, max(ay_, by) + v.radius)
            if box is None:
                continue
            px, py = xx[box], yy[box]
            d = np.array([bx - ax_, by - ay_, bz - az], dtype=np.float32)
            length2 = float(d @ d) or 1.0
            u = np.clip(((px - ax_) * d[0] + (py - ay_) * d[1] + (z - az) * d[2]) / length2,
                        0.0, 1.0)
            dist = np.sqrt((px - ax_ - u * d[0]) ** 2 + (py - ay_ - u * d[1]) ** 2
                           + (z - az - u * d[2]) ** 2)
            alpha = np.clip((v.radius - dist) / pixel + 0.5, 0.0, 1.0) * lung[box]
            img[box] += alpha * (40.0 - img[box])

    def _draw_airway(self, img: F32, z: float, xx: F32, yy: F32) -> None:
        r = 8.0 * self.scale
        top = self.z_apex + 20.0
        if self.carina <= z <= top:
            centres = [(0.0, -0.30 * self.iy)]
        elif self.carina - 50.0 <= z < self.carina:
            spread = (self.carina - z) / 50.0 * 0.22 * self.ix
            centres = [(-spread, -0.30 * self.iy), (spread, -0.30 * self.iy)]
            r *= 0.75
        else:
            return
        for cx, cy in centres:
            dist2 = (xx - cx) ** 2 + (yy - cy) ** 2
            img[dist2 <= (r + 1.5 * self.scale) ** 2] = 30.0  # wall
            img[dist2 <= r ** 2] = -990.0

    def _draw_bones(self, img: F32, z: float, xx: F32, yy: F32) -> None:
        sx, sy, sr = self.spine
        disc = ((z - self.disc_phase) % 28.0) < 4.0
        dist2 = (xx - sx) ** 2 + (yy - sy) ** 2
        if disc:
            img[dist2 <= sr ** 2] = 85.0
        else:
            img[dist2 <= sr ** 2] = 700.0
            img[dist2 <= (sr - 2.5 * self.scale) ** 2] = 230.0
            # Posterior arch and spinous process, then the canal.
            arch = ((xx / (15.0 * self.scale)) ** 2
                    + ((yy - sy - sr - 12.0 * self.scale) / (7.0 * self.scale)) ** 2 <= 1.0)
            img[arch & ((xx / self.ax) ** 2 + (yy / self.ay) ** 2 <= 1.0)] = 520.0
        canal = xx ** 2 + (yy - sy - sr - 5.0 * self.scale) ** 2 <= (6.0 * self.scale) ** 2
        img[canal] = 15.0
        # Sternum at the front of the ribcage over the heart's height.
        if self.heart_z[0] <= z <= self.z_apex - 30.0:
            sternum = ((xx / (14.0 * self.scale)) ** 2
                       + ((yy + self.iy + 4.0 * self.scale) / (5.0 * self.scale)) ** 2 <= 1.0)
            img[sternum] = 450.0
        if not self.z_base - 40.0 <= z <= self.z_apex + 10.0:
            return
        # Ribs: each descends from the spine towards the front; drawn where it crosses z.
        theta = np.linspace(-np.pi * 0.88, np.pi * 0.88, 160)
        theta = theta[np.abs(theta + np.pi / 2) > 0.35]  # costal cartilage at the front
        front = (1.0 - np.sin(theta)) / 2.0  # 0 at the back, 1 at the front
        rib_r = 4.5 * self.scale
        for i in range(14):
            z_rib = self.z_apex + 5.0 - i * self.rib_pitch - self.rib_drop * front
            hit = np.abs(z_rib - z) < 4.0
            for t in theta[hit][::3]:
                cx = (self.ix + 3.0 * self.scale) * np.cos(t)
                cy = (self.iy + 3.0 * self.scale) * np.sin(t)
                box = self._box(xx, yy, cx - rib_r, cx + rib_r, cy - rib_r, cy + rib_r)
                if box is None:
                    continue
                d2 = (xx[box] - cx) ** 2 + (yy[box] - cy) ** 2
                img[box][d2 <= rib_r ** 2] = 650.0
                img[box][d2 <= (rib_r * 0.5) ** 2] = 220.0


def _draw_sphere(img: F32, z: float, xx: F32, yy: F32, s: _Sphere, pixel: float) -> None:
    """Blend a lesion into the slice; voxels whose centre lies inside get at least half."""
    dz = z - s.z
    if abs(dz) > s.radius + pixel:
        return
    cols = np.flatnonzero(np.abs(xx[0] - s.x) <= s.radius + pixel)
    rows = np.flatnonzero(np.abs(yy[:, 0] - s.y) <= s.radius + pixel)
    if not len(cols) or not len(rows):
        return
    box = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
    dist = np.sqrt((xx[box] - s.x) ** 2 + (yy[box] - s.y) ** 2 + dz * dz)
    alpha = np.clip((s.radius - dist) / pixel + 0.5, 0.0, 1.0)
    img[box] += alpha * (s.hu - img[box])


def _place_lesions(rng: np.random.Generator, anatomy: _Anatomy, options: ChestCT,
                   difficulty: float, z_range: tuple[float, float],
                   pixel: float) -> list[_Sphere]:
    """Lesions of varied size and contrast, each wholly inside a lung or the liver."""
    count = int(rng.integers(options.lesions[0], options.lesions[1] + 1))
    lo, hi = options.lesion_diameter_mm
    directions = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)],
                          dtype=np.float32)
    directions[13] = 0.0
    norms = np.linalg.norm(directions, axis=1)
    directions[norms > 0] /= norms[norms > 0, None]
    placed: list[_Sphere] = []
    for _ in range(count):
        diameter = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        for attempt in range(400):
            if attempt and attempt % 100 == 0:
                diameter = max(diameter * 0.7, lo)  # too big to fit where we looked
            radius = max(diameter / 2, 1.5 * pixel)
            in_liver = rng.random() < 0.3 and anatomy.z_base + anatomy.dome > z_range[0] + 30
            if in_liver:
                x = -0.33 * anatomy.ix + rng.uniform(-0.6, 0.6) * anatomy.ix
                y = rng.uniform(-0.7, 0.7) * anatomy.iy
                z = rng.uniform(z_range[0], anatomy.z_base + anatomy.dome)
                test = anatomy.liver
            else:
                side = int(rng.integers(0, 2))
                cx, cy = anatomy.lung_c[side]
                x = cx + rng.uniform(-1, 1) * anatomy.lung_r[0]
                y = cy + rng.uniform(-1, 1) * anatomy.lung_r[1]
                z = rng.uniform(anatomy.z_base, anatomy.z_apex)
                test = anatomy.lung
            points = np.array([x, y, z], dtype=np.float32) + directions * (radius + pixel)
            if not (z_range[0] + radius + 2 * pixel <= z <= z_range[1] - radius - 2 * pixel):
                continue
            if not bool(np.all(test(points[:, 0], points[:, 1], points[:, 2]))):
                continue
            if any(np.hypot(np.hypot(x - p.x, y - p.y), z - p.z) < radius + p.radius + 4.0
                   for p in placed):
                continue
            if in_liver:
                background = 58.0
                delta = rng.uniform(18.0, 70.0) * (1.0 - 0.6 * difficulty)
                hu = background + (delta if rng.random() < 0.35 else -delta)
            else:
                background = -865.0
                ground_glass = rng.random() < 0.2 + 0.4 * difficulty
                hu = rng.uniform(-650.0, -400.0) if ground_glass else rng.uniform(-20.0, 60.0)
            placed.append(_Sphere(x, y, z, radius, round(hu, 1), background,
                                  "liver" if in_liver else "lung"))
            break
    return placed


def _lesion_crop(s: _Sphere, z_values: NDArray[np.float64], x0: float, y0: float,
                 pixel: float, matrix: int) -> tuple[tuple[int, int, int], NDArray[np.bool_]]:
    """The lesion's voxels (centres inside the sphere) as an offset and a boolean crop.

    ``z_values`` are the slice positions in mask order; the crop's first axis follows it.
    """
    ks = np.flatnonzero(np.abs(z_values - s.z) <= s.radius)
    c0 = max(int(np.floor((s.x - s.radius - x0) / pixel)), 0)
    c1 = min(int(np.ceil((s.x + s.radius - x0) / pixel)) + 1, matrix)
    r0 = max(int(np.floor((s.y - s.radius - y0) / pixel)), 0)
    r1 = min(int(np.ceil((s.y + s.radius - y0) / pixel)) + 1, matrix)
    zz = z_values[ks][:, None, None]
    yy = (y0 + np.arange(r0, r1) * pixel)[None, :, None]
    xx = (x0 + np.arange(c0, c1) * pixel)[None, None, :]
    crop = (xx - s.x) ** 2 + (yy - s.y) ** 2 + (zz - s.z) ** 2 <= s.radius ** 2
    k0 = int(ks[0]) if len(ks) else 0
    return (k0, r0, c0), np.asarray(crop, dtype=bool)


def _chest_header(ds: Dataset, *, k: int, z: float, x0: float, y0: float, pixel: float,
                  thickness: float, image: _Image, rng_values: dict[str, float],
                  frame_uid: UID) -> None:
    """Frame of Reference, Image Plane (PS3.3 C.7.6.2) and CT Image (C.8.2.1) of a chest slice."""
    rows = cols = image.stored.shape[-1]
    ds.StudyDescription = "Synthetic chest CT"
    ds.SeriesDescription = "Synthetic chest CT phantom"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds_string(x0), _ds_string(y0), _ds_string(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds_string(pixel)] * 2
    ds.SliceThickness = _ds_string(thickness)
    ds.SliceLocation = _ds_string(z)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    _ct_acquisition(ds, image, rng_values, field_of_view=cols * pixel, kernel="LUNG")
    _pixel_module(ds, image, rows, cols)


@dataclass(frozen=True)
class LesionMasks:
    """Ground-truth lesion masks of a chest CT study, read back by :func:`read_lesion_masks`.

    Attributes
    ----------
    labels : numpy.ndarray
        ``uint8`` ``(slices, rows, columns)``: 0 background, ``i`` lesion ``i`` of
        ``lesions.csv``. Slices in order along the normal (increasing
        ``dot(ImagePositionPatient, normal)``, PS3.3 C.7.6.2.1.1), the order
        :func:`~dicom_ai.pipeline.loading.load_volume` gives.
    spacing : tuple of float
        ``(slice, row, column)`` in mm.
    origin : tuple of float
        Image Position (Patient) of the first slice in that order.
    orientation : tuple of float
        Image Orientation (Patient).
    sop_instance_uids : list of str
        The SOP Instance UID of each slice, in that order.
    """

    labels: NDArray[np.uint8]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    sop_instance_uids: list[str]


def read_lesion_masks(path: Path) -> LesionMasks:
    """Read a chest CT study's ``masks/<SeriesInstanceUID>.npz`` (see :class:`LesionMasks`).

    The file holds the geometry (``shape``, ``spacing``, ``origin``, ``orientation``,
    ``sop_instance_uids``) and, per lesion ``i`` (1-based), ``lesion_<i>_offset`` (first slice,
    row, column) and ``lesion_<i>_mask`` (a boolean crop): small even for 300 x 512 x 512.
    """
    with np.load(path, allow_pickle=False) as npz:
        shape = tuple(int(v) for v in npz["shape"])
        labels = np.zeros(shape, dtype=np.uint8)
        count = int(npz["lesions"])
        for i in range(1, count + 1):
            s0, r0, c0 = (int(v) for v in npz[f"lesion_{i}_offset"])
            crop = npz[f"lesion_{i}_mask"]
            region = labels[s0:s0 + crop.shape[0], r0:r0 + crop.shape[1], c0:c0 + crop.shape[2]]
            region[crop] = i
        sp = [float(v) for v in npz["spacing"]]
        og = [float(v) for v in npz["origin"]]
        orient = [float(v) for v in npz["orientation"]]
        uids = [str(v) for v in npz["sop_instance_uids"]]
    return LesionMasks(labels, (sp[0], sp[1], sp[2]), (og[0], og[1], og[2]),
                       (orient[0], orient[1], orient[2], orient[3], orient[4], orient[5]), uids)


def _save_npz(path: Path, arrays: dict[str, NDArray[Any]]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps: the same masks give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arr),  # type: ignore[no-untyped-call]
                                      allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue())


@dataclass
class _StudyOutput:
    rows: list[dict[str, str]]
    lesion_rows: list[dict[str, str]]
    syntaxes: Counter[str]
    lesions: int


def _chest_study(out: Path, *, index: int, seed: int, positive: bool, difficulty: float,
                 options: ChestCT, compress: bool, variant: str,
                 fallbacks: list[str]) -> _StudyOutput:
    """Write one chest CT study slice by slice, its lesion masks and its label rows."""
    rng = np.random.default_rng([seed, _MODALITY_INDEX["CT"], index, 10])
    m = options.matrix
    pixel = round(float(rng.uniform(*options.pixel_spacing)), 4)
    dz = float(rng.choice(np.asarray(options.slice_spacings, dtype=np.float64)))
    n = int(np.clip(round(rng.uniform(300.0, 360.0) / dz), *options.slices))
    x0 = y0 = round(-(m - 1) / 2 * pixel, 3)
    z_top = round(float(rng.uniform(-40.0, 40.0)) * 4) / 4 + (n - 1) / 2 * dz
    z_values = z_top - dz * np.arange(n, dtype=np.float64)  # instance order: head first
    anatomy = _Anatomy(rng, m * pixel, float(z_values[0]), float(z_values[-1]))
    lesions = (_place_lesions(rng, anatomy, options, difficulty,
                              (float(z_values[-1]), float(z_values[0])), pixel)
               if positive else [])
    if positive and not lesions:
        raise ValueError("no lesion fits the chest phantom: widen chest_ct options")
    codec = _CODECS[int(rng.integers(0, len(_CODECS)))] if compress else (
        ExplicitVRLittleEndian, "")
    signed = bool(rng.random() < 0.5)
    bits, intercept = (16, 0.0) if signed else (12, -1024.0)
    noise_sd = float(rng.uniform(8.0, 25.0))
    header_rng = np.random.default_rng([seed, _MODALITY_INDEX["CT"], index, 1])
    rng_values = {
        "kvp": float(header_rng.choice([100, 120, 140])),
        "tube_current": float(header_rng.integers(150, 400)),
        "exposure_time": float(header_rng.integers(500, 1000)),
        "exposure": float(header_rng.integers(100, 300)),
    }
    study_uid = _uid(seed, "CT", "study", index, variant=variant)
    series_uid = _uid(seed, "CT", "series", index, variant=variant)
    frame_uid = _uid(seed, "CT", "frame", index, variant=variant)
    sop_uids = [_uid(seed, "CT", "instance", index, k, variant=variant) for k in range(n)]
    image = _Image(np.empty((0, m, m), dtype=np.int16), None, [], pixel, dz, bits, signed,
                   "MONOCHROME2", (-600.0, 1500.0), intercept)

    # Masks and lesion labels, in the order along the normal (+z: reversed instance order).
    mask_z = z_values[::-1]
    mask_name = f"masks/{series_uid}.npz"
    arrays: dict[str, NDArray[Any]] = {
        "shape": np.array([n, m, m]), "spacing": np.array([dz, pixel, pixel]),
        "origin": np.array([x0, y0, float(mask_z[0])]),
        "orientation": np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        "sop_instance_uids": np.array([str(u) for u in sop_uids[::-1]]),
        "lesions": np.array(len(lesions)),
    }
    lesion_rows: list[dict[str, str]] = []
    for i, s in enumerate(lesions, start=1):
        (k0, r0, c0), crop = _lesion_crop(s, mask_z, x0, y0, pixel, m)
        arrays[f"lesion_{i}_offset"] = np.array([k0, r0, c0])
        arrays[f"lesion_{i}_mask"] = crop
        ks, rs, cs = np.nonzero(crop)
        nearest = float(np.min(np.abs(mask_z - s.z)))
        lesion_rows.append({
            "StudyInstanceUID": str(study_uid), "SeriesInstanceUID": str(series_uid),
            "lesion": str(i), "location": s.location, "diameter_mm": f"{2 * s.radius:.3f}",
            "volume_mm3": f"{len(ks) * pixel * pixel * dz:.3f}", "voxels": str(len(ks)),
            "centroid_x_mm": f"{x0 + (c0 + cs.mean()) * pixel:.3f}",
            "centroid_y_mm": f"{y0 + (r0 + rs.mean()) * pixel:.3f}",
            "centroid_z_mm": f"{float(mask_z[k0 + ks].mean()):.3f}",
            "longest_axial_diameter_mm":
                f"{2 * np.sqrt(max(s.radius ** 2 - nearest ** 2, 0.0)):.3f}",
            "lesion_hu": f"{s.hu:g}", "background_hu": f"{s.background:g}",
            "contrast_hu": f"{s.hu - s.background:g}", "mask_path": mask_name,
        })
    if lesions:
        _save_npz(out / mask_name, arrays)

    first = lesions[0] if lesions else None
    geometry = {
        "lesion_center_row": str(round((first.y - y0) / pixel)) if first else "",
        "lesion_center_col": str(round((first.x - x0) / pixel)) if first else "",
        "lesion_center_slice": str(int(np.argmin(np.abs(z_values - first.z)))) if first
        else "",
        "lesion_radius_px": f"{first.radius / pixel:.2f}" if first else "",
    }
    axis = (x0 + pixel * np.arange(m)).astype(np.float32)
    xx, yy = np.meshgrid(axis, axis)  # columns along x, rows along y
    delta = np.zeros((9, 9), dtype=np.float32)
    delta[4, 4] = 1.0
    noise_gain = 1.0 / float(np.sqrt((ndimage.gaussian_filter(delta, 0.6) ** 2).sum()))
    lo_value, hi_value = (-(2 ** 15), 2 ** 15 - 1) if signed else (0, 2 ** 12 - 1)
    rows_out: list[dict[str, str]] = []
    syntaxes: Counter[str] = Counter()
    for k in range(n):
        z = float(z_values[k])
        hu = anatomy.render(z, xx, yy, lesions, pixel)
        hu = ndimage.gaussian_filter(hu, 0.5)  # the scanner's point spread
        slice_rng = np.random.default_rng([seed, _MODALITY_INDEX["CT"], index, 11, k])
        noise = slice_rng.standard_normal(hu.shape, dtype=np.float32)
        hu += ndimage.gaussian_filter(noise, 0.6) * np.float32(noise_sd * noise_gain)
        stored = np.clip(np.rint(hu - intercept), lo_value, hi_value).astype(
            np.int16 if signed else np.uint16)
        ds = Dataset()
        ds.SOPClassUID = SOP_CLASSES["CT"]
        ds.SOPInstanceUID = sop_uids[k]
        _common(ds, seed=seed, modality="CT", index=index,
                rng=np.random.default_rng([seed, _MODALITY_INDEX["CT"], index, 2]),
                study_uid=study_uid, series_uid=series_uid)
        _chest_header(ds, k=k, z=z, x0=x0, y0=y0, pixel=pixel, thickness=dz, image=image,
                      rng_values=rng_values, frame_uid=frame_uid)
        path = out / str(study_uid) / str(series_uid) / f"{sop_uids[k]}.dcm"
        syntaxes[str(_write(ds, stored, path, codec, fallbacks))] += 1
        rows_out.append({
            "StudyInstanceUID": str(study_uid), "SeriesInstanceUID": str(series_uid),
            "SOPInstanceUID": str(sop_uids[k]), "label": "1" if positive else "0",
            "lesion_count": str(len(lesions)), **geometry, "mask_path": "",
        })
    logger.debug("synth: wrote chest CT study %s (%d slices of %dx%d, %.4g mm, %.4g mm apart, "
                  "%d lesions)", study_uid, n, m, m, pixel, dz, len(lesions))
    return _StudyOutput(rows_out, lesion_rows, syntaxes, len(lesions))


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
               compress: bool = True, namespace: str = "synth",
               chest_ct: ChestCT | None = None) -> SynthReport:
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
    chest_ct : ChestCT, optional
        With ``modality="CT"``: realistic chest CT volumes instead of the small abdominal
        phantom (see :class:`ChestCT`): 100-300 slices of 512 x 512 in HU (air, lung with
        vessels, soft tissue, fat, bone), lesions of 3-30 mm and varied contrast in the lungs
        and liver, one ``masks/<SeriesInstanceUID>.npz`` per positive study
        (:func:`read_lesion_masks`) and ``lesions.csv`` (:data:`LESION_COLUMNS`: volume in mm3,
        centroid in patient coordinates, longest axial diameter). Written one slice at a
        time. Without it the output is what it always was, byte for byte.

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
    if chest_ct is not None:
        if modality != "CT":
            raise ValueError(f"chest_ct needs modality CT, not {modality!r}")
        chest_ct.check()
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    # The label of study i depends on the study count (shuffled flags), its pixels on the
    # fraction and difficulty: all of them name the run.
    variant = f"{namespace}|{studies}|{positive_fraction!r}|{difficulty!r}"
    if chest_ct is not None:  # other pixels, other UIDs
        variant += f"|{chest_ct!r}"
    n_positive = round(studies * positive_fraction)
    flags = np.zeros(studies, dtype=bool)
    flags[:n_positive] = True
    np.random.default_rng([seed, _MODALITY_INDEX[modality]]).shuffle(flags)

    rows_out: list[dict[str, str]] = []
    syntaxes: Counter[str] = Counter()
    fallbacks: list[str] = []
    lesion_rows: list[dict[str, str]] = []
    monochrome1 = lesions_total = instances = 0
    for index in range(studies):
        positive = bool(flags[index])
        if chest_ct is not None:
            done = _chest_study(out, index=index, seed=seed, positive=positive,
                                difficulty=difficulty, options=chest_ct, compress=compress,
                                variant=variant, fallbacks=fallbacks)
            rows_out.extend(done.rows)
            lesion_rows.extend(done.lesion_rows)
            syntaxes.update(done.syntaxes)
            instances += len(done.rows)
            lesions_total += done.lesions
            continue
        rng = np.random.default_rng([seed, _MODALITY_INDEX[modality], index])
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
    lesions_csv = None
    if chest_ct is not None:
        lesions_csv = out / "lesions.csv"
        with lesions_csv.open("w", newline="", encoding="ascii") as fh:
            writer = csv.DictWriter(fh, fieldnames=LESION_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(lesion_rows)
    return SynthReport(
        out=out, labels_csv=labels_csv, studies=studies, instances=instances,
        positives=int(n_positive), negatives=studies - int(n_positive), lesions=lesions_total,
        transfer_syntaxes=tuple(sorted(syntaxes.items())), monochrome1=monochrome1,
        fallbacks=tuple(fallbacks), lesions_csv=lesions_csv,
    )
