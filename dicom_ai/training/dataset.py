"""Training data: a folder of DICOM files plus a labels CSV -> model inputs, split by patient.

The labels file is what ``dicom-ai synth`` writes (and ``dicom-ai batch export`` will): one row per
SOP instance with at least ``SOPInstanceUID`` and ``label`` (1 = finding present), usually also
``StudyInstanceUID`` and ``SeriesInstanceUID``, and optionally ``mask_path`` (a ``.npy`` mask,
relative to the CSV's folder) for segmentation. Files are found under the data folder by their
SOP Instance UID (any file name). Every input goes through
:func:`dicom_ai.pipeline.preview.model_inputs`, the function serving uses, so a file gives the
bit-identical array in training and in production. Inputs are cached as a memory-mapped ``.npy``
so data sets larger than memory train, and a resumed run does not preprocess again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError

from dicom_ai.exceptions import DicomAIError
from dicom_ai.pipeline.preprocessing import resize
from dicom_ai.pipeline.preview import model_inputs
from dicom_ai.values import PreprocessingSpec

__all__ = [
    "DatasetError",
    "Sample",
    "load_inputs",
    "load_masks",
    "read_samples",
    "split_by_patient",
]

logger = logging.getLogger(__name__)

_HEADER_TAGS = ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
                "Modality", "BodyPartExamined", "Manufacturer"]
#: Manufacturer (0008,0070) of ``dicom-ai synth`` phantoms.
SYNTH_MANUFACTURER = "dicom-ai synth"


class DatasetError(DicomAIError):
    """The labels file or the data folder cannot be used; the message says why."""


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes
    ----------
    path : Path
        The DICOM file.
    sop_instance_uid, study_instance_uid, series_instance_uid : str
        Its UIDs.
    patient_key : str
        What the split groups by: Patient ID (0010,0020), else the Study Instance UID. Used for
        grouping only, never logged or written.
    label : int
        1 = finding present.
    mask_path : Path, optional
        Ground-truth mask (``.npy``) for segmentation.
    modality, body_part : str
        Modality (0008,0060) and Body Part Examined (0018,0015).
    synthetic : bool
        A ``dicom-ai synth`` phantom (Manufacturer (0008,0070)), not a patient image.
    """

    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_key: str
    label: int
    mask_path: Path | None
    modality: str
    body_part: str
    synthetic: bool = False


def _index_files(data: Path) -> dict[str, tuple[Path, Any]]:
    """SOP Instance UID -> (path, header) for every DICOM file under ``data``."""
    found: dict[str, tuple[Path, Any]] = {}
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # labels.csv, masks and anything else that is not DICOM
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid:
            found.setdefault(uid, (path, ds))
    return found


def read_samples(data: Path, labels: Path) -> list[Sample]:
    """Join a labels CSV with the DICOM files under ``data``.

    Parameters
    ----------
    data : Path
        Folder searched recursively for DICOM files.
    labels : Path
        CSV with a header holding at least ``SOPInstanceUID`` and ``label``.

    Returns
    -------
    list of Sample
        In the CSV's row order.

    Raises
    ------
    DatasetError
        Missing file or columns, a label that is not 0/1, an instance the data folder lacks, a
        mask file that does not exist, or no rows.
    """
    if not labels.is_file():
        raise DatasetError(f"labels file {labels} does not exist")
    if not data.is_dir():
        raise DatasetError(f"data folder {data} does not exist")
    with open(labels, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        missing = {"SOPInstanceUID", "label"} - columns
        if missing:
            raise DatasetError(f"{labels.name} lacks column(s) {', '.join(sorted(missing))}")
        rows = list(reader)
    if not rows:
        raise DatasetError(f"{labels.name} has no rows")
    files = _index_files(data)
    samples: list[Sample] = []
    absent = 0
    for number, row in enumerate(rows, start=2):
        uid = (row.get("SOPInstanceUID") or "").strip()
        raw_label = (row.get("label") or "").strip()
        if raw_label not in {"0", "1"}:
            raise DatasetError(f"{labels.name} line {number}: label must be 0 or 1, "
                               f"not {raw_label!r}")
        if uid not in files:
            absent += 1
            continue
        path, ds = files[uid]
        mask_text = (row.get("mask_path") or "").strip()
        mask = (labels.parent / mask_text) if mask_text else None
        if mask is not None and not mask.is_file():
            raise DatasetError(f"{labels.name} line {number}: mask {mask_text} does not exist")
        study = str(ds.get("StudyInstanceUID", "") or row.get("StudyInstanceUID", ""))
        samples.append(Sample(
            path=path,
            sop_instance_uid=uid,
            study_instance_uid=study,
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            patient_key=str(ds.get("PatientID", "") or "") or study,
            label=int(raw_label),
            mask_path=mask,
            modality=str(ds.get("Modality", "") or "").upper(),
            body_part=str(ds.get("BodyPartExamined", "") or "").upper(),
            synthetic=str(ds.get("Manufacturer", "")) == SYNTH_MANUFACTURER,
        ))
    if absent:
        raise DatasetError(f"{absent} of {len(rows)} labelled instances are not under {data}")
    return samples


def split_by_patient(
    samples: Sequence[Sample], *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split into training and validation sets with no patient in both.

    Patients are shuffled with ``seed`` and assigned to validation, positives and negatives
    separately (by whether a patient has any positive image), until each reaches
    ``val_fraction`` of its images; so both sets hold both classes whenever there are at least
    two patients of each.

    Parameters
    ----------
    samples : sequence of Sample
    val_fraction : float
        Wanted share of images in validation (0 < f < 1).
    seed : int

    Returns
    -------
    train, validation : list of Sample

    Raises
    ------
    DatasetError
        Fewer than two patients, or a fraction outside (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"validation fraction must be between 0 and 1, not {val_fraction}")
    by_patient: dict[str, list[Sample]] = {}
    for sample in samples:
        by_patient.setdefault(sample.patient_key, []).append(sample)
    if len(by_patient) < 2:
        raise DatasetError("need at least two patients to split into training and validation")
    rng = np.random.default_rng(seed)
    validation_keys: set[str] = set()
    for positive in (True, False):
        keys = sorted(k for k, group in by_patient.items()
                      if any(s.label for s in group) == positive)
        rng.shuffle(keys)
        total = sum(len(by_patient[k]) for k in keys)
        taken = 0
        for key in keys[: max(len(keys) - 1, 0)]:  # keep at least one patient for training
            if taken >= val_fraction * total:
                break
            validation_keys.add(key)
            taken += len(by_patient[key])
    train = [s for s in samples if s.patient_key not in validation_keys]
    validation = [s for s in samples if s.patient_key in validation_keys]
    if not train or not validation:
        raise DatasetError("the split left an empty training or validation set")
    return train, validation


def _cache_key(samples: Sequence[Sample], spec: PreprocessingSpec, kind: str) -> str:
    digest = hashlib.sha256(kind.encode())
    digest.update(spec.model_dump_json().encode())
    for sample in samples:
        stat = sample.path.stat()
        digest.update(f"{sample.path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        if kind == "masks" and sample.mask_path is not None:
            digest.update(str(sample.mask_path).encode())
    return digest.hexdigest()[:16]


def _cached(cache: Path | None, key: str, shape: tuple[int, ...], dtype: Any,
            fill: Callable[[NDArray[Any]], None]) -> NDArray[Any]:
    """A cached array: reuse ``cache/<key>.npy`` if complete, else fill and keep it."""
    if cache is None:
        out = np.zeros(shape, dtype=dtype)
        fill(out)
        return out
    cache.mkdir(parents=True, exist_ok=True)
    path, done = cache / f"{key}.npy", cache / f"{key}.done"
    if path.is_file() and done.is_file():
        arr: NDArray[Any] = np.load(path, mmap_mode="r")
        if arr.shape == shape:
            return arr
    mm: np.memmap[Any, Any] = np.lib.format.open_memmap(  # type: ignore[no-untyped-call]
        path, mode="w+", dtype=dtype, shape=shape)
    fill(mm)
    mm.flush()
    done.write_text(json.dumps({"shape": list(shape)}))
    loaded: NDArray[Any] = np.load(path, mmap_mode="r")
    return loaded


def load_inputs(
    samples: Sequence[Sample],
    spec: PreprocessingSpec,
    *,
    cache: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> NDArray[np.float32]:
    """The model input of every sample, through the serving path.

    Parameters
    ----------
    samples : sequence of Sample
        Single-frame images (a multi-frame file contributes its first frame).
    spec : PreprocessingSpec
        The model's preprocessing.
    cache : Path, optional
        Folder for a memory-mapped cache keyed by the files and the spec.
    progress : callable, optional
        Called with ``(done, total)``.

    Returns
    -------
    numpy.ndarray
        ``(N, H, W, C)`` float32 (memory-mapped when cached).

    Raises
    ------
    LoadError, DecodeError, PreprocessingError
        A file that cannot be read, decoded or preprocessed (named in the message).
    """
    shape = (len(samples), *spec.input_shape, spec.channels)

    def fill(out: NDArray[Any]) -> None:
        for i, sample in enumerate(samples):
            arrays, _ = model_inputs([sample.path], spec)
            out[i] = arrays[0]
            if progress is not None:
                progress(i + 1, len(samples))

    return _cached(cache, _cache_key(samples, spec, "inputs"), shape, np.float32, fill)


def load_masks(
    samples: Sequence[Sample], spec: PreprocessingSpec, *, cache: Path | None = None
) -> NDArray[np.float32]:
    """Ground-truth masks resized exactly like the images (0/1 float32, ``(N, H, W, 1)``).

    A sample without a mask (a negative image) gets an empty mask. A mask is resized with the
    spec's geometry (:func:`~dicom_ai.pipeline.preprocessing.resize`, same aspect handling as
    the image) and binarised at 0.5.

    Raises
    ------
    DatasetError
        A mask whose shape is not the image's rows x columns.
    """
    shape = (len(samples), *spec.input_shape, 1)

    def fill(out: NDArray[Any]) -> None:
        for i, sample in enumerate(samples):
            if sample.mask_path is None:
                out[i] = 0.0
                continue
            mask = np.load(sample.mask_path)
            if mask.ndim == 3:  # a volume's mask: the slice of this instance is not known here
                raise DatasetError(f"{sample.mask_path.name} is a 3D mask; 2D masks only")
            header = pydicom.dcmread(sample.path, stop_before_pixels=True)
            if mask.shape != (int(header.Rows), int(header.Columns)):
                raise DatasetError(f"{sample.mask_path.name} is {mask.shape}, the image is "
                                   f"{header.Rows}x{header.Columns}")
            resized = resize(mask.astype(np.float32), spec.input_shape,
                             keep_aspect=spec.keep_aspect)
            out[i, ..., 0] = (resized >= 0.5).astype(np.float32)

    return _cached(cache, _cache_key(samples, spec, "masks"), shape, np.float32, fill)
