"""Header parsing of received files: what the index keeps, and the checks that refuse an instance.

Reading is tolerant (vendors break VR length rules; values are clipped to the column sizes),
but the attributes that place an instance in the store must be present and valid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from dicom_ai.exceptions import IngestError, InvalidUIDError
from dicom_ai.ingest.scan import NeedsFullParse, Scan, Truncated, scan
from storage.filestore import validate_uid
from storage.repository import InstanceRecord

LOGGER = logging.getLogger(__name__)

# DIMSE statuses of PS3.4 annex B.2.3 (C-STORE) used when refusing an instance.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

_UNDEFINED_LENGTH = 0xFFFFFFFF


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


# The index fields, by keyword, with the column size each is clipped to (0: an integer).
_FIELDS: dict[str, int] = {
    "PatientID": 64,
    "IssuerOfPatientID": 64,
    "PatientName": 324,
    "PatientBirthDate": 8,
    "PatientSex": 16,
    "AccessionNumber": 16,
    "StudyID": 16,
    "StudyDate": 8,
    "StudyTime": 32,
    "StudyDescription": 64,
    "ReferringPhysicianName": 324,
    "Modality": 16,
    "BodyPartExamined": 64,
    "SeriesDescription": 64,
    "SeriesNumber": 0,
    "SeriesDate": 8,
    "InstanceNumber": 0,
}
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_WANTED = frozenset(int(Tag(keyword)) for keyword in (*_FIELDS, *_UIDS))


def _pydicom_text(ds: Dataset) -> Callable[[str], str]:
    """Text of a top-level value of a pydicom dataset, multi-values joined by backslashes."""

    def get(keyword: str) -> str:
        value = ds.get(keyword)
        if value is None:
            return ""
        if isinstance(value, MultiValue):
            return "\\".join(str(v) for v in value)
        return str(value).strip(" \x00")

    return get


def _scan_text(found: Scan) -> Callable[[str], str]:
    def get(keyword: str) -> str:
        return found.text(int(Tag(keyword))).strip(" \x00")

    return get


def _integer(text: str) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _record(get: Callable[[str], str], transfer_syntax: str, *, sop_class_uid: str,
            sop_instance_uid: str) -> InstanceRecord:
    """Check the values against the C-STORE request and build the index fields."""
    try:
        study_uid = validate_uid(get("StudyInstanceUID") or None, "StudyInstanceUID")
        series_uid = validate_uid(get("SeriesInstanceUID") or None, "SeriesInstanceUID")
        sop_uid = validate_uid(get("SOPInstanceUID") or None, "SOPInstanceUID")
        sop_class = validate_uid(get("SOPClassUID") or None, "SOPClassUID")
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
    values = {keyword: get(keyword) for keyword in _FIELDS}
    return InstanceRecord(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax[:64],
        patient_id=values["PatientID"][:64],
        issuer_of_patient_id=values["IssuerOfPatientID"][:64],
        patient_name=values["PatientName"][:324],
        patient_birth_date=values["PatientBirthDate"][:8],
        patient_sex=values["PatientSex"][:16],
        accession_number=values["AccessionNumber"][:16],
        study_id=values["StudyID"][:16],
        study_date=values["StudyDate"][:8],
        study_time=values["StudyTime"][:32],
        study_description=values["StudyDescription"][:64],
        referring_physician_name=values["ReferringPhysicianName"][:324],
        modality=values["Modality"][:16],
        body_part_examined=values["BodyPartExamined"][:64],
        series_description=values["SeriesDescription"][:64],
        series_number=_integer(values["SeriesNumber"]),
        series_date=values["SeriesDate"][:8],
        instance_number=_integer(values["InstanceNumber"]),
    )


def instance_record(
    ds: FileDataset, *, sop_class_uid: str, sop_instance_uid: str
) -> InstanceRecord:
    """Check a dataset parsed by pydicom against its C-STORE request; extract its index fields.

    Raises
    ------
    IngestError
        ``0xA900`` if a required UID is missing or invalid, or the dataset's SOP Class/Instance
        UID differs from the request's (PS3.4 B.2.3: "Data Set does not match SOP Class").
    """
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    return _record(_pydicom_text(ds), transfer_syntax, sop_class_uid=sop_class_uid,
                   sop_instance_uid=sop_instance_uid)


def parse_received(path: Path, *, sop_class_uid: str, sop_instance_uid: str) -> InstanceRecord:
    """Check a received file and extract its index fields (the C-STORE handler's parse).

    The fast structural scan (:mod:`dicom_ai.ingest.scan`) handles the common little-endian
    files; anything else is parsed by pydicom. Both refuse the same files.

    Parameters
    ----------
    path : Path
        The received file.
    sop_class_uid, sop_instance_uid : str
        The Affected SOP Class/Instance UID of the C-STORE request.

    Returns
    -------
    InstanceRecord
        The fields the index keeps.

    Raises
    ------
    IngestError
        ``0xC000`` for an unparseable or truncated dataset, ``0xA900`` for missing, invalid or
        mismatching UIDs.
    """
    try:
        found = scan(path, _WANTED)
        return _record(_scan_text(found), found.transfer_syntax_uid,
                       sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid)
    except Truncated as exc:
        raise IngestError(CANNOT_UNDERSTAND, f"dataset is truncated: {exc}") from None
    except NeedsFullParse:
        ds = read_dataset(path)
        return instance_record(ds, sop_class_uid=sop_class_uid,
                               sop_instance_uid=sop_instance_uid)


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
