"""Header parsing of received files: what the index keeps, and the checks that refuse an instance.

Reading is tolerant (vendors break VR length rules; values are clipped to the column sizes),
but the attributes that place an instance in the store must be present and valid.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError

from dicom_ai.exceptions import IngestError, InvalidUIDError
from storage.filestore import validate_uid
from storage.repository import InstanceRecord

LOGGER = logging.getLogger(__name__)

# DIMSE statuses of PS3.4 annex B.2.3 (C-STORE) used when refusing an instance.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

_UNDEFINED_LENGTH = 0xFFFFFFFF


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword, "")
    text = "" if value is None else str(value)
    return text[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def read_dataset(path: Path) -> FileDataset:
    """Parse a received file completely, refusing one that is truncated or malformed.

    Parameters
    ----------
    path : Path
        The file (preamble, file meta, dataset).

    Returns
    -------
    FileDataset
        The parsed dataset (pixel data read as raw bytes, never decoded).

    Raises
    ------
    IngestError
        ``0xC000`` if it cannot be parsed or an element is shorter than declared.
    """
    try:
        # Elements stay raw until accessed: parsing is a walk over element headers, which is
        # what detects a structurally broken dataset without converting every value.
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        raise IngestError(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}") from None
    # pydicom reads a value shorter than its declared length without complaint: an element
    # that runs past the end of the data means the dataset is truncated or corrupt.
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts each element
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED_LENGTH:
            got = len(raw.value or b"")
            if got != raw.length:
                raise IngestError(
                    CANNOT_UNDERSTAND,
                    f"element {raw.tag} is truncated: {got} of {raw.length} declared bytes",
                )
    return ds


def instance_record(
    ds: FileDataset, *, sop_class_uid: str, sop_instance_uid: str
) -> InstanceRecord:
    """Check a parsed dataset against its C-STORE request and extract its index fields.

    Parameters
    ----------
    ds : FileDataset
        The received dataset.
    sop_class_uid, sop_instance_uid : str
        The Affected SOP Class/Instance UID of the C-STORE request.

    Returns
    -------
    InstanceRecord
        The fields the index keeps.

    Raises
    ------
    IngestError
        ``0xA900`` if a required UID is missing or invalid, or the dataset's SOP Class/Instance
        UID differs from the request's (PS3.4 B.2.3: "Data Set does not match SOP Class").
    """
    try:
        study_uid = validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop_uid = validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        sop_class = validate_uid(ds.get("SOPClassUID"), "SOPClassUID")
    except InvalidUIDError as exc:
        raise IngestError(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from None
    if sop_class != sop_class_uid:
        raise IngestError(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOPClassUID {sop_class} differs from the request's {sop_class_uid}",
        )
    if sop_uid != sop_instance_uid:
        raise IngestError(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOPInstanceUID {sop_uid} differs from the request's {sop_instance_uid}",
        )
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    return record_from_dataset(ds, study_uid, series_uid, sop_uid, sop_class, transfer_syntax)


def record_from_dataset(
    ds: Dataset,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    sop_class: str,
    transfer_syntax: str,
) -> InstanceRecord:
    """Build the index fields from a dataset whose UIDs were already validated."""
    return InstanceRecord(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax[:64],
        patient_id=_text(ds, "PatientID", 64),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
        patient_sex=_text(ds, "PatientSex", 16),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_id=_text(ds, "StudyID", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 32),
        study_description=_text(ds, "StudyDescription", 64),
        referring_physician_name=_text(ds, "ReferringPhysicianName", 324),
        modality=_text(ds, "Modality", 16),
        body_part_examined=_text(ds, "BodyPartExamined", 64),
        series_description=_text(ds, "SeriesDescription", 64),
        series_number=_int(ds, "SeriesNumber"),
        series_date=_text(ds, "SeriesDate", 8),
        instance_number=_int(ds, "InstanceNumber"),
    )


def read_stored_record(path: Path) -> InstanceRecord:
    """Parse a file already in the store (recovery) into its index fields.

    Raises
    ------
    IngestError
        If it cannot be parsed or lacks valid UIDs.
    """
    ds = read_dataset(path)
    sop_class = str(ds.get("SOPClassUID", ""))
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    return instance_record(ds, sop_class_uid=sop_class, sop_instance_uid=sop_uid)
