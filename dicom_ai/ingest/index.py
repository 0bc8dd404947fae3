"""Header parsing of received files: what the index keeps, and the checks that refuse an instance.

Reading is tolerant (vendors break VR length rules; values are clipped to the column sizes),
but the attributes that place an instance in the store must be present and valid.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from dicom_ai.dimse_status import Status
from dicom_ai.exceptions import IngestError, InvalidUIDError, safe_message
from dicom_ai.ingest import deflate
from dicom_ai.ingest.scan import Deflated, NeedsFullParse, Scan, Truncated, scan, scan_dataset
from storage.filestore import validate_uid
from storage.models import Instance, Patient, Series, Study
from storage.repository import InstanceRecord

LOGGER = logging.getLogger(__name__)

_UNDEFINED_LENGTH = 0xFFFFFFFF


def _column_sizes() -> dict[str, int]:
    """The declared length of every string column of the index's DICOM tables, by name.

    The fields of :class:`~storage.repository.InstanceRecord` are named after these columns;
    reading the lengths from the models keeps one declaration of each size.
    """
    sizes: dict[str, int] = {}
    for model in (Patient, Study, Series, Instance):
        for column in model.__table__.columns:
            length = getattr(column.type, "length", None)
            if isinstance(length, int):
                sizes.setdefault(column.name, length)
    return sizes


#: Column sizes values are clipped to (tolerant reading: vendors break VR length rules).
FIELD_SIZES = _column_sizes()


def _clip(field: str, value: str) -> str:
    """`value` cut to the declared size of the index column `field`."""
    return value[:FIELD_SIZES[field]]

#: Values longer than this stay on disk when pydicom parses an inflated dataset.
_DEFER_BYTES = 1024 * 1024


def _refuse_inflate(exc: Exception) -> IngestError:
    """The refusal of a deflated dataset above ``max_inflated_bytes`` or with a corrupt stream.

    0xC000 ("cannot understand"), not 0xA700 ("out of resources"): the size is a property of
    the object, not a passing shortage, so a sender retrying an A7xx would only send it again.
    """
    return IngestError(Status.CANNOT_UNDERSTAND, f"deflated dataset refused: {safe_message(exc)}")


def read_dataset(path: Path, *,
                 max_inflated_bytes: int = deflate.DEFAULT_MAX_INFLATED_BYTES) -> FileDataset:
    """Parse a received file completely, refusing one that is truncated or malformed.

    pydicom holds the whole dataset in memory: a deflated file is first inflated as a bounded
    stream (:mod:`dicom_ai.ingest.deflate`) and refused above `max_inflated_bytes`.

    Parameters
    ----------
    path : Path
        The file (preamble, file meta, dataset).
    max_inflated_bytes : int
        ``[limits] max_inflated_bytes``: the most a deflated dataset may inflate to.

    Returns
    -------
    FileDataset
        The parsed dataset (pixel data read as raw bytes, never decoded).

    Raises
    ------
    IngestError
        ``0xC000`` if it cannot be parsed, an element is shorter than declared, or a deflated
        dataset is corrupt or inflates beyond the limit.
    """
    try:
        deflate.deflated_size(path, max_inflated_bytes)
    except deflate.InflateError as exc:
        raise _refuse_inflate(exc) from None
    except OSError as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND,
                          f"dataset cannot be read: {safe_message(exc)}") from None
    try:
        # Elements stay raw until accessed: parsing is a walk over element headers, which is
        # what detects a structurally broken dataset without converting every value.
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND,
                          f"dataset cannot be parsed: {safe_message(exc)}") from None
    _check_lengths(ds)
    return ds


def _check_lengths(ds: Dataset, size: int | None = None) -> None:
    """Refuse a dataset whose top-level element runs past the end of the data.

    pydicom reads a value shorter than its declared length without complaint. A value pydicom
    left on disk (deferred) is checked against the data's `size` instead.
    """
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts each element
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        if raw.value is None and raw.length and size is not None:
            got = max(0, min(raw.length, size - raw.value_tell))
        else:
            got = len(raw.value or b"")
        if got != raw.length:
            raise IngestError(
                Status.CANNOT_UNDERSTAND,
                f"element {raw.tag} is truncated: {got} of {raw.length} declared bytes",
            )


# The index fields read from a header, by keyword (text ones are clipped to their column size,
# FIELD_SIZES, by _record).
_FIELDS = (
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription",
    "ReferringPhysicianName", "Modality", "BodyPartExamined", "SeriesDescription",
    "SeriesNumber", "SeriesDate", "InstanceNumber",
)
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
        raise IngestError(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from None
    if sop_class != sop_class_uid:
        raise IngestError(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOPClassUID {sop_class} differs from the request's {sop_class_uid}",
        )
    if sop_uid != sop_instance_uid:
        raise IngestError(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOPInstanceUID {sop_uid} differs from the request's {sop_instance_uid}",
        )
    values = {keyword: get(keyword) for keyword in _FIELDS}
    return InstanceRecord(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=_clip("transfer_syntax_uid", transfer_syntax),
        patient_id=_clip("patient_id", values["PatientID"]),
        issuer_of_patient_id=_clip("issuer_of_patient_id", values["IssuerOfPatientID"]),
        patient_name=_clip("patient_name", values["PatientName"]),
        patient_birth_date=_clip("patient_birth_date", values["PatientBirthDate"]),
        patient_sex=_clip("patient_sex", values["PatientSex"]),
        accession_number=_clip("accession_number", values["AccessionNumber"]),
        study_id=_clip("study_id", values["StudyID"]),
        study_date=_clip("study_date", values["StudyDate"]),
        study_time=_clip("study_time", values["StudyTime"]),
        study_description=_clip("study_description", values["StudyDescription"]),
        referring_physician_name=_clip("referring_physician_name",
                                       values["ReferringPhysicianName"]),
        modality=_clip("modality", values["Modality"]),
        body_part_examined=_clip("body_part_examined", values["BodyPartExamined"]),
        series_description=_clip("series_description", values["SeriesDescription"]),
        series_number=_integer(values["SeriesNumber"]),
        series_date=_clip("series_date", values["SeriesDate"]),
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


def _pydicom_inflated(inflated: BinaryIO, size: int) -> Dataset:
    """Parse an inflated dataset with pydicom, large values left on disk (the scan's fallback)."""
    try:
        ds = pydicom.filereader.read_dataset(inflated, is_implicit_VR=False,
                                             is_little_endian=True, defer_size=_DEFER_BYTES)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND,
                          f"dataset cannot be parsed: {safe_message(exc)}") from None
    _check_lengths(ds, size)
    for tag in _WANTED:
        raw = ds.get_item(tag) if tag in ds else None
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            # The index reads this value; nothing it keeps is anywhere near this long.
            raise IngestError(Status.CANNOT_UNDERSTAND,
                              f"element {raw.tag} is {raw.length} bytes long")
    return ds


def _deflated_record(path: Path, offset: int, max_inflated_bytes: int, directory: Path,
                     request: tuple[str, str] | None) -> InstanceRecord:
    """The index fields of a deflated file, never holding its inflated dataset in memory.

    The stream is first inflated and counted with the output discarded (a bomb is refused
    before any disk write), then inflated into an anonymous temporary file in `directory`,
    which the structural scan walks through a memory map: only the element headers it reads
    are paged in. The pydicom fallback (non-ASCII text, unusual structures) leaves every value
    over 1 MiB on disk.
    """
    transfer_syntax = deflate.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    try:
        with path.open("rb") as source:
            source.seek(offset)
            deflate.inflate(source, max_inflated_bytes)
        with deflate.inflated_copy(path, offset, max_inflated_bytes, directory) as (inflated,
                                                                                    size):
            get: Callable[[str], str]
            try:
                if size == 0:
                    found = scan_dataset(b"", 0, transfer_syntax, _WANTED)
                else:
                    with mmap.mmap(inflated.fileno(), 0, access=mmap.ACCESS_READ) as data:
                        found = scan_dataset(data, 0, transfer_syntax, _WANTED)
                get = _scan_text(found)
                if request is None:
                    request = (get("SOPClassUID"), get("SOPInstanceUID"))
                return _record(get, transfer_syntax, sop_class_uid=request[0],
                               sop_instance_uid=request[1])
            except Truncated as exc:
                raise IngestError(Status.CANNOT_UNDERSTAND,
                                  f"dataset is truncated: {safe_message(exc)}") from None
            except NeedsFullParse:
                inflated.seek(0)
                get = _pydicom_text(_pydicom_inflated(inflated, size))
                if request is None:
                    request = (get("SOPClassUID"), get("SOPInstanceUID"))
                return _record(get, transfer_syntax, sop_class_uid=request[0],
                               sop_instance_uid=request[1])
    except deflate.InflateError as exc:
        raise _refuse_inflate(exc) from None


def parse_received(path: Path, *, sop_class_uid: str, sop_instance_uid: str,
                   max_inflated_bytes: int = deflate.DEFAULT_MAX_INFLATED_BYTES
                   ) -> InstanceRecord:
    """Check a received file and extract its index fields (the C-STORE handler's parse).

    The fast structural scan (:mod:`dicom_ai.ingest.scan`) handles the common little-endian
    files, and deflated ones after a bounded inflation (PS3.5 A.5); anything else is parsed by
    pydicom. Both refuse the same files.

    Parameters
    ----------
    path : Path
        The received file.
    sop_class_uid, sop_instance_uid : str
        The Affected SOP Class/Instance UID of the C-STORE request.
    max_inflated_bytes : int
        ``[limits] max_inflated_bytes``: the most a deflated dataset may inflate to.

    Returns
    -------
    InstanceRecord
        The fields the index keeps.

    Raises
    ------
    IngestError
        ``0xC000`` for an unparseable or truncated dataset, or a deflated one that is corrupt
        or inflates beyond the limit; ``0xA900`` for missing, invalid or mismatching UIDs.
    """
    try:
        found = scan(path, _WANTED)
        return _record(_scan_text(found), found.transfer_syntax_uid,
                       sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid)
    except Truncated as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND,
                          f"dataset is truncated: {safe_message(exc)}") from None
    except Deflated as deflated:
        # The temporary inflated copy goes next to the received file (the store's disk).
        return _deflated_record(path, deflated.offset, max_inflated_bytes, path.parent,
                                (sop_class_uid, sop_instance_uid))
    except NeedsFullParse:
        ds = read_dataset(path, max_inflated_bytes=max_inflated_bytes)
        return instance_record(ds, sop_class_uid=sop_class_uid,
                               sop_instance_uid=sop_instance_uid)


def read_stored_record(path: Path, *,
                       max_inflated_bytes: int = deflate.DEFAULT_MAX_INFLATED_BYTES,
                       workdir: Path | None = None) -> InstanceRecord:
    """Parse a file already in the store (recovery) into its index fields.

    Parameters
    ----------
    path : Path
        The stored file.
    max_inflated_bytes : int
        ``[limits] max_inflated_bytes``: the most a deflated dataset may inflate to.
    workdir : Path, optional
        Where a deflated dataset's temporary inflated copy goes (the store's ``incoming/``
        folder, so nothing appears among the instances); default: the file's folder.

    Raises
    ------
    IngestError
        If it cannot be parsed or lacks valid UIDs; ``0xC000`` for a deflated dataset that is
        corrupt or inflates beyond the limit.
    """
    try:
        with path.open("rb") as source:
            transfer_syntax, offset = deflate.dataset_start(source)
    except deflate.InflateError:
        transfer_syntax, offset = "", 0  # not Part 10 as this reader sees it: pydicom decides
    except OSError as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND,
                          f"dataset cannot be read: {safe_message(exc)}") from None
    if transfer_syntax == deflate.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return _deflated_record(path, offset, max_inflated_bytes, workdir or path.parent, None)
    ds = read_dataset(path, max_inflated_bytes=max_inflated_bytes)
    sop_class = str(ds.get("SOPClassUID", ""))
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    return instance_record(ds, sop_class_uid=sop_class, sop_instance_uid=sop_uid)
