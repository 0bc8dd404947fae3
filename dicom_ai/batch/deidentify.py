"""De-identification for training-set export: PS3.15 Annex E, Basic Profile, table-driven.

:class:`Deidentifier` applies the Basic Application Level Confidentiality Profile (PS3.15 E.1,
the actions of Table E.1-1 held in :mod:`dicom_ai.batch.profile_basic`) plus one option, and is
stateful across a whole export so that references between instances stay consistent:

* **UIDs (U).** Every UI value is replaced by ``2.25.<int>``, the integer being 128 bits of
  HMAC-SHA256(salt, uid) shaped as an RFC 9562 version-8 UUID (PS3.5 B.2). The same original
  gives the same new UID in every file of the export, in the file meta information
  (Media Storage SOP Instance UID) and inside sequences (Referenced SOP Instance UID ...);
  UIDs of the table and every other UI attribute are replaced, except well-known ones: values
  under the DICOM root ``1.2.840.10008.`` (SOP classes, transfer syntaxes, well-known frames of
  reference) and the class-like attributes in ``_KEEP_UID_KEYWORDS`` (SOP Class UIDs, Transfer
  Syntax UIDs, Coding Scheme UID, Mapping Resource UID, Implementation Class UID).
* **Patients.** Patient Name and Patient ID (Z in the table but Type 1 in many IODs) become the
  same pseudonym ``ANON-<10 hex>`` from HMAC(salt, issuer, patient id); other patient attributes
  follow the table (Birth Date Z, Age, Size and Weight X, Sex Z ...).
* **Retain Longitudinal Temporal Information with Modified Dates Option (PS3.15 E.3.6).** Every
  DA value and the date part of every DT value, wherever it is (dataset, sequences, attributes
  the table does not list), is shifted by the patient's offset, a whole number of days in
  ``[-max_shift_days, -1]`` fixed per patient by HMAC(salt, issuer, patient id): intervals
  between the studies of one patient are kept, calendar dates are not. Times (TM and the time
  of DT) are kept. Patient's Birth Date and Birth Time are outside the option (Z and X). Dates
  that cannot be parsed are emptied. Timezone Offset From UTC is removed (X, the Basic action).
  Longitudinal Temporal Information Modified (0028,0303) is set to ``MODIFIED``.
* **Not applied:** Retain Patient Characteristics (113108: Patient's Age, Sex, Size, Weight
  are removed or emptied as the Basic Profile says; the training labels do not need them),
  Retain UIDs, Retain Device/Institution Identity, Retain Safe Private (E.3.10: every private
  attribute is removed), Clean Descriptors, Clean Structured Content, Clean Graphics and Clean
  Pixel Data (113101): images whose pixels may show identity are refused instead, see
  :func:`burned_in_risk`.
* **Beyond the table**, for safety: every element of the overlay (60xx) and curve (50xx)
  groups is removed, not only Overlay/Curve Data; Data Set Trailing Padding and Digital
  Signatures are removed (table: X); an attribute with VR UN (not interpretable) is removed;
  a PN attribute without a row gets a dummy name; inside a sequence whose action is D (Content
  Sequence of SR, Verifying Observer Sequence, Graphic Annotation Sequence ...) the structure,
  codes and numbers are kept and every name and free-text value is replaced by a dummy.
* **Record (PS3.15 E.1.1, PS3.3 C.12.1.1.7).** Patient Identity Removed (0012,0062) ``YES``;
  De-identification Method (0012,0063) in words; De-identification Method Code Sequence
  (0012,0064) with CID 7050 codes 113100 (Basic Application Confidentiality Profile) and 113107
  (Retain Longitudinal Temporal Information Modified Dates Option), appended to any already
  there.

Everything a model reads is kept: pixel data (byte for byte, encapsulated or not), the Image
Pixel, Modality LUT and VOI LUT modules, Pixel Spacing, Photometric Interpretation, Modality,
Body Part Examined, Image Position/Orientation (Patient), SOP Class, Manufacturer (which marks
``dicom-ai synth`` phantoms). The output keeps the input's transfer syntax and has fresh file
meta information (the source's AE titles and implementation UID are not copied) and an empty
preamble.

``mapping`` holds everything needed to re-identify (original -> new UIDs, patient id and issuer
-> pseudonym and date shift); like ``salt`` it must be stored outside the export. Neither
appears in ``repr()``, and nothing here logs a patient's name, ID or birth date.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom import __version__ as pydicom_version
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_ai.batch.profile_basic import action_for_tag, is_curve_or_overlay
from dicom_ai.exceptions import DicomAIError

__all__ = ["DeidentificationRefused", "Deidentifier", "burned_in_risk"]

logger = logging.getLogger(__name__)

#: CID 7050 codes (PS3.16) of what :meth:`Deidentifier.deidentify` applies.
METHOD_CODES: Final[tuple[tuple[str, str], ...]] = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
#: De-identification Method (0012,0063) values (LO: at most 64 characters each).
METHOD_TEXT: Final[tuple[str, ...]] = (
    "dicom-ai: PS3.15 E.1 Basic Application Confidentiality Profile",
    "Retain Longitudinal Temporal Information Modified Dates Option",
)

#: UI attributes whose values name a class, syntax or scheme, not an instance: never remapped.
_KEEP_UID_KEYWORDS: Final[frozenset[str]] = frozenset({
    "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "AffectedSOPClassUID",
    "RequestedSOPClassUID", "ReferencedSOPClassUIDInFile", "RelatedGeneralSOPClassUID",
    "OriginalSpecializedSOPClassUID", "SOPClassesInStudy", "TransferSyntaxUID",
    "ReferencedTransferSyntaxUIDInFile", "EncryptedContentTransferSyntaxUID",
    "CodingSchemeUID", "MappingResourceUID", "ImplementationClassUID",
})
_DICOM_ROOT = "1.2.840.10008."

#: Dates that version a code set, not something that happened to the patient: never shifted.
_NOT_PATIENT_DATES: Final[frozenset[str]] = frozenset({
    "ContextGroupVersion", "ContextGroupLocalVersion", "MappingResourceVersion",
})
#: Inside a D sequence these texts are codes (PS3.3 Table 8.8-1), kept; other text is dummied.
_CODE_KEYWORDS: Final[frozenset[str]] = frozenset({
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning",
    "LongCodeValue", "URNCodeValue", "ContextIdentifier", "MappingResource",
    "MappingResourceName", "ContextGroupExtensionFlag", "CodingSchemeName",
    "CodingSchemeResponsibleOrganization",
})
_TEXT_VRS: Final[frozenset[str]] = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "PN"})
_PATIENT_PSEUDONYM_KEYWORDS: Final[frozenset[str]] = frozenset({"PatientName", "PatientID"})
_OUTSIDE_DATE_OPTION: Final[frozenset[str]] = frozenset({"PatientBirthDate", "PatientBirthTime"})

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: Final[dict[str, Any]] = {
    "PN": "ANONYMOUS", "AE": _DUMMY_TEXT, "CS": _DUMMY_TEXT, "LO": _DUMMY_TEXT,
    "SH": _DUMMY_TEXT, "LT": _DUMMY_TEXT, "ST": _DUMMY_TEXT, "UT": _DUMMY_TEXT,
    "UC": _DUMMY_TEXT, "UR": "", "AS": "000D", "DA": "19000101", "DT": "19000101000000",
    "TM": "000000", "IS": "0", "DS": "0", "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0,
    "SV": 0, "FL": 0.0, "FD": 0.0, "AT": 0, "OB": b"\x00\x00", "OW": b"\x00\x00",
    "OD": b"\x00" * 8, "OF": b"\x00" * 4, "OL": b"\x00" * 4, "OV": b"\x00" * 8,
}

# SOP classes (PS3.4 Annex B) whose pixels commonly show identity when nothing says otherwise.
_SECONDARY_CAPTURE: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image",
}
_ULTRASOUND: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image (retired)",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image (retired)",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image",
}
#: Visible-light photographs and video: faces, hands, labels (Recognizable Visual Features).
_VISIBLE_LIGHT: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.77.1.1": "VL Endoscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Video Endoscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.2": "VL Microscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": "Video Microscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.3": "VL Slide-Coordinates Microscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Video Photographic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.6": "VL Whole Slide Microscopy Image (slide label)",
}
#: Documents: identity is in the payload, which no attribute-level profile can clean.
_DOCUMENTS: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
}


class DeidentificationRefused(DicomAIError):  # noqa: N818 - name fixed by the batch API
    """The instance must be left out of the export; the message says why (never who)."""


def burned_in_risk(ds: Dataset) -> str | None:
    """Why an instance's pixels may show identity, or None when they are taken as clean.

    PS3.15 E.1.1 and the Basic Profile do not clean pixel data (that is the Clean Pixel Data
    Option, not applied here), so an instance whose pixels may carry names or faces is refused.

    Parameters
    ----------
    ds : Dataset
        The instance (header only is enough).

    Returns
    -------
    str or None
        The reason, naming the attribute or SOP class, when any of these holds:

        * Burned In Annotation (0028,0301) is ``YES``;
        * Recognizable Visual Features (0028,0302) is ``YES``;
        * the SOP class is Encapsulated PDF or CDA (identity in the document itself);
        * the SOP class is a Secondary Capture or Ultrasound image (screen captures and US
          carry burned-in text routinely) and Burned In Annotation is absent or empty;
        * the SOP class is a visible-light image or video (endoscopy, microscopy incl. whole
          slide label images, photography, ophthalmic photography) and Burned In Annotation
          or Recognizable Visual Features is not an explicit ``NO``.

        An explicit ``NO`` from the modality is trusted.
    """
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    visual = str(ds.get("RecognizableVisualFeatures", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if burned == "YES":
        return "Burned In Annotation (0028,0301) is YES"
    if visual == "YES":
        return "Recognizable Visual Features (0028,0302) is YES"
    if sop_class in _DOCUMENTS:
        return f"{_DOCUMENTS[sop_class]}: identity is in the encapsulated document"
    for classes in (_SECONDARY_CAPTURE, _ULTRASOUND):
        if sop_class in classes and not burned:
            return (f"{classes[sop_class]} without Burned In Annotation (0028,0301): "
                    "pixels may carry burned-in text")
    if sop_class in _VISIBLE_LIGHT and (burned != "NO" or visual != "NO"):
        return (f"{_VISIBLE_LIGHT[sop_class]} without Burned In Annotation and Recognizable "
                "Visual Features both NO: pixels may show identity")
    return None


def _new_mapping() -> dict[str, Any]:
    return {"uids": {}, "patients": {}}


@dataclass
class Deidentifier:
    """Stateful across a whole export: consistent UID remapping and per-patient date shifts.

    Parameters
    ----------
    salt : bytes
        Secret key of every HMAC. Keep it outside the export (with :attr:`mapping`); another
        salt gives other UIDs, pseudonyms and shifts.
    max_shift_days : int
        Dates move back by 1..``max_shift_days`` days, fixed per patient.

    Attributes
    ----------
    mapping : dict
        Everything needed to re-identify, JSON-serialisable: ``uids`` (original -> new UID) and
        ``patients`` (pseudonym -> ``patient_id``, ``issuer``, ``date_shift_days``).
    """

    salt: bytes = field(repr=False)
    max_shift_days: int = 365
    mapping: dict[str, Any] = field(default_factory=_new_mapping, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.salt, bytes) or len(self.salt) < 16:
            raise ValueError("salt must be at least 16 random bytes")
        if self.max_shift_days < 1:
            raise ValueError("max_shift_days must be at least 1")

    def _digest(self, *parts: str) -> bytes:
        message = b"\x00".join(part.encode("utf-8") for part in parts)
        return hmac.new(self.salt, message, hashlib.sha256).digest()

    def map_uid(self, uid: str) -> str:
        """The replacement of a UID (action U of PS3.15 Table E.1-1).

        Parameters
        ----------
        uid : str
            The original UID; surrounding spaces and NUL padding are ignored.

        Returns
        -------
        str
            ``2.25.<int>`` (PS3.5 B.2) where the integer is 128 bits of
            HMAC-SHA256(salt, uid) with the RFC 9562 version-8 and variant bits: the same
            input gives the same output for one salt; at most 44 characters. An empty input
            stays empty.
        """
        original = uid.strip().rstrip("\x00").strip()
        if not original:
            return ""
        uids: dict[str, str] = self.mapping["uids"]
        if original in uids:
            return uids[original]
        value = int.from_bytes(self._digest("uid", original)[:16], "big")
        value &= ~(0xF << 76)
        value |= 0x8 << 76  # version 8 (custom)
        value &= ~(0x3 << 62)
        value |= 0x2 << 62  # variant 10
        new = f"2.25.{value}"
        uids[original] = new
        return new

    def _patient(self, patient_id: str, issuer: str) -> tuple[str, int]:
        pseudonym = "ANON-" + self._digest("patient", issuer, patient_id).hex()[:10].upper()
        span = self.max_shift_days
        shift = -(int.from_bytes(self._digest("shift", issuer, patient_id)[:8], "big") % span + 1)
        self.mapping["patients"][pseudonym] = {
            "patient_id": patient_id, "issuer": issuer, "date_shift_days": shift,
        }
        return pseudonym, shift

    def pseudonym(self, patient_id: str, issuer: str = "") -> str:
        """The stable pseudonym of a patient, used for Patient Name and Patient ID.

        Parameters
        ----------
        patient_id : str
            Patient ID (0010,0020).
        issuer : str
            Issuer of Patient ID (0010,0021): the same ID from two issuers is two patients.

        Returns
        -------
        str
            ``ANON-`` and 10 upper-case hex digits of HMAC-SHA256(salt, issuer, id).
        """
        return self._patient(patient_id, issuer)[0]

    def date_shift_days(self, patient_id: str, issuer: str = "") -> int:
        """The patient's date offset (PS3.15 E.3.6, Modified Dates).

        Parameters
        ----------
        patient_id : str
            Patient ID (0010,0020).
        issuer : str
            Issuer of Patient ID (0010,0021).

        Returns
        -------
        int
            Days in ``[-max_shift_days, -1]``, the same for every call with this patient.
        """
        return self._patient(patient_id, issuer)[1]

    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds``; ``ds`` itself is not changed.

        Parameters
        ----------
        ds : Dataset
            A composite instance as read by pydicom (pixel data included).

        Returns
        -------
        Dataset
            A new dataset with ``file_meta`` (same transfer syntax, new Media Storage SOP
            Instance UID) and a zero preamble, ready for ``save_as(path,
            enforce_file_format=True)``.

        Raises
        ------
        DeidentificationRefused
            When :func:`burned_in_risk` gives a reason; the message has it.
        """
        reason = burned_in_risk(ds)
        if reason is not None:
            raise DeidentificationRefused(reason)
        patient_id, issuer = _patient_key(ds)
        pseudonym, shift = self._patient(patient_id, issuer)
        walker = _Walker(self.map_uid, pseudonym, shift)
        out = walker.dataset(ds, dummy=False)
        _record_method(out)
        out.file_meta = _file_meta(ds, out)
        out.preamble = b"\x00" * 128
        logger.debug("de-identified one %s instance as %s",
                     str(ds.get("Modality", "")) or "?", pseudonym)
        return out


def _patient_key(ds: Dataset) -> tuple[str, str]:
    """(patient id, issuer); without an ID, a key from name and birth date, else the study."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if patient_id:
        return patient_id, issuer
    name = str(ds.get("PatientName", "") or "").strip()
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    if name or birth:
        return f"(no ID) {name} {birth}", issuer
    return f"(no patient) study {str(ds.get('StudyInstanceUID', '')).strip()}", issuer


def _shift_date(value: str, days: int) -> str:
    """A DA value moved by ``days``; legacy ``YYYY.MM.DD`` accepted; '' when unparseable."""
    text = value.strip().replace(".", "") if len(value.strip()) == 10 else value.strip()
    try:
        day = dt.datetime.strptime(text, "%Y%m%d").date()
        return (day + dt.timedelta(days=days)).strftime("%Y%m%d")
    except ValueError:
        return ""


def _shift_datetime(value: str, days: int) -> str:
    """A DT value with its date part moved by ``days``, precision and time kept."""
    text = value.strip()
    digits = len(text) - len(text.lstrip("0123456789"))
    if digits >= 8:
        shifted = _shift_date(text[:8], days)
        return shifted + text[8:] if shifted else ""
    if digits in (4, 6):  # YYYY or YYYYMM: shift the first day, keep the precision
        first = _shift_date(text[:digits] + ("0101" if digits == 4 else "01"), days)
        return first[:digits] + text[digits:] if first else ""
    return ""


class _Walker:
    """One dataset's traversal: the table's actions, recursively into sequences."""

    def __init__(self, map_uid: Callable[[str], str], pseudonym: str, shift: int) -> None:
        self.map_uid = map_uid
        self.pseudonym = pseudonym
        self.shift = shift

    def dataset(self, src: Dataset, *, dummy: bool) -> Dataset:
        out = Dataset()
        for elem in src:
            new = self.element(elem, dummy=dummy)
            if new is not None:
                out.add(new)
        return out

    def _action(self, elem: DataElement, *, dummy: bool) -> str:
        tag = int(elem.tag)
        keyword = elem.keyword
        if elem.tag.is_private or is_curve_or_overlay(tag) or elem.tag.group == 0x0002:
            return "X"  # E.3.10 not applied; file meta is rebuilt
        if keyword in _PATIENT_PSEUDONYM_KEYWORDS:
            return "P"
        action = action_for_tag(tag)
        if elem.VR in ("DA", "DT", "TM") and keyword not in _OUTSIDE_DATE_OPTION:
            if keyword in _NOT_PATIENT_DATES:
                return "K"
            return "C"  # Modified Dates Option (E.3.6) supersedes the Basic action
        if action is not None:
            return action
        if elem.VR == "UN":
            return "X"
        if elem.VR == "UI":
            return "U"
        if elem.VR == "PN" or (dummy and elem.VR in _TEXT_VRS and keyword not in _CODE_KEYWORDS):
            return "D"
        return "K"

    def element(self, elem: DataElement, *, dummy: bool) -> DataElement | None:
        action = self._action(elem, dummy=dummy)
        vr = elem.VR
        if action == "X":
            return None
        if action == "P":
            return DataElement(elem.tag, vr, self.pseudonym)
        if vr == "SQ":
            if action == "Z":
                return DataElement(elem.tag, vr, Sequence())
            items = [self.dataset(item, dummy=dummy or action == "D") for item in elem.value]
            return DataElement(elem.tag, vr, Sequence(items))
        if action == "Z":
            return DataElement(elem.tag, vr, None if vr not in _TEXT_VRS else "")
        if action == "D":
            if vr == "UI":
                return self._uids(elem)
            return DataElement(elem.tag, vr, _DUMMY_BY_VR.get(vr, ""))
        if action == "C":
            return self._dates(elem)
        if action == "U" or vr == "UI":
            return self._uids(elem) if vr == "UI" else copy.deepcopy(elem)
        return copy.deepcopy(elem)

    @staticmethod
    def values(elem: DataElement) -> list[str]:
        if elem.value is None:
            return []
        if isinstance(elem.value, MultiValue | list | tuple):
            return [str(v) for v in elem.value]
        return [str(elem.value)]

    def _uids(self, elem: DataElement) -> DataElement:
        keep = elem.keyword in _KEEP_UID_KEYWORDS
        new = [v if keep or v.startswith(_DICOM_ROOT) else self.map_uid(v)
               for v in self.values(elem)]
        return DataElement(elem.tag, "UI", _one_or_many(new))

    def _dates(self, elem: DataElement) -> DataElement:
        if elem.VR == "TM":
            return copy.deepcopy(elem)
        shift = _shift_date if elem.VR == "DA" else _shift_datetime
        new = [shift(v, self.shift) if v.strip() else "" for v in self.values(elem)]
        return DataElement(elem.tag, elem.VR, _one_or_many(new))


def _one_or_many(values: list[str]) -> str | list[str]:
    if not values:
        return ""
    return values[0] if len(values) == 1 else values


def _record_method(out: Dataset) -> None:
    """Patient Identity Removed, De-identification Method (Code Sequence), Modified Dates."""
    out.PatientIdentityRemoved = "YES"
    existing = [v for v in _Walker.values(out["DeidentificationMethod"]) if v.strip()] \
        if "DeidentificationMethod" in out else []
    out.DeidentificationMethod = [*existing, *(t for t in METHOD_TEXT if t not in existing)]
    codes = Sequence(list(out.get("DeidentificationMethodCodeSequence", None) or []))
    present = {str(item.get("CodeValue", "")) for item in codes}
    for value, meaning in METHOD_CODES:
        if value in present:
            continue
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    out.DeidentificationMethodCodeSequence = codes
    out.LongitudinalTemporalInformationModified = "MODIFIED"


def _file_meta(src: Dataset, out: Dataset) -> FileMetaDataset:
    """Fresh PS3.10 file meta information: nothing of the source's but its transfer syntax."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID", "")
    syntax = None
    src_meta = getattr(src, "file_meta", None)
    if src_meta is not None:
        syntax = src_meta.get("TransferSyntaxUID", None)
    if not syntax:
        implicit, little = src.original_encoding
        syntax = (ImplicitVRLittleEndian if implicit else
                  ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    meta.TransferSyntaxUID = UID(str(syntax))
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom_version}"[:16]
    return meta
