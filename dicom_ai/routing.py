"""Declarative routing: which model a completed series goes to, and why (``[[routes]]``).

A route's ``match`` maps DICOM keywords to expected values. A series matches when every key
matches its header (read from one of its files, without pixel data). A value is:

* a string: equal after trimming spaces, or a wildcard pattern (``*`` any run, ``?`` one
  character, as in C-FIND matching, PS3.4 C.2.2.2.4, and with the same linear-time matcher,
  :func:`storage.query.wildcard_match`), case-sensitive like DICOM code strings;
* ``/regex/``: a Python regular expression that must match the whole value;
* a list of the above: any one matches.

A multi-valued attribute (e.g. ImageType, or an MR ScanningSequence ``SE\\IR``) matches when any
of its values does, or its whole ``\\``-joined text does: ``ScanningSequence = "IR"`` matches a
FLAIR's ``SE\\IR``, and so does ``"SE"``. A plain number given for a numeric attribute (VR DS,
IS, FL, FD, US, SS, UL, SL, UV, SV: EchoTime, RepetitionTime, ...) is compared as a number, so
``EchoTime = "95"`` matches a stored ``95.000``; there is no range syntax (a ``/regex/`` on the
text serves). The pseudo-key ``CallingAETitle`` matches the AE title(s) that sent the series.

An enhanced multi-frame object (Enhanced or Legacy Converted Enhanced MR/CT, PS3.3 C.7.6.16)
keeps many attributes inside its functional groups rather than at the top level: a keyword the
top level lacks is looked up in the items of the Shared Functional Groups Sequence (the Unassigned
Shared Converted Attributes of a legacy conversion included), else in every frame's Per-frame
Functional Groups (any frame's value matching). An attribute found nowhere never matches (an
empty value matches only ``""``).

Body Part Examined (0018,0015) is read by :func:`body_parts_examined`, the rule the model scope
gate uses too: the top-level value, else one in the functional groups, else the anatomic region
code of the Frame Anatomy functional group (C.7.6.16.2.8) mapped back to its Body Part Examined
term (PS3.16 Annex L, CID 4031): a Legacy Converted Enhanced CT/MR keeps the body part only as
that code (highdicom writes SCT 816094009 "Chest" for ``CHEST``), so a route on
``BodyPartExamined = "CHEST"`` matches it as it matches the single-frame slices.

Every route that matches gets the series (one job per route); the order of ``[[routes]]`` is
the order of the report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_ai.exceptions import DicomReadError, safe_message
from storage.query import wildcard_match

__all__ = [
    "BODY_PART_CODES",
    "CALLING_AE_TITLE",
    "KeyResult",
    "RouteMatch",
    "body_parts_examined",
    "check_match",
    "evaluate",
    "evaluate_file",
    "header_values",
]

#: The pseudo-keyword that matches the sender's AE title.
CALLING_AE_TITLE = "CallingAETitle"

MatchSpec = Mapping[str, str | list[str]]


def _as_patterns(expected: str | list[str]) -> list[str]:
    return [expected] if isinstance(expected, str) else list(expected)


def check_match(match: MatchSpec) -> None:
    """Validate a route's ``match`` table: known keywords, compilable expressions.

    Raises
    ------
    ValueError
        Naming the bad key or pattern (pydantic reports it under ``routes.N.match``).
    """
    for key, expected in match.items():
        if key != CALLING_AE_TITLE and tag_for_keyword(key) is None:
            raise ValueError(f"{key!r} is not a DICOM keyword (nor {CALLING_AE_TITLE})")
        patterns = _as_patterns(expected)
        if not patterns:
            raise ValueError(f"{key}: an empty list matches nothing")
        for pattern in patterns:
            if _is_regex(pattern):
                try:
                    re.compile(pattern[1:-1])
                except re.error as exc:
                    raise ValueError(f"{key}: bad regular expression {pattern!r}: {exc}") from None


def _is_regex(pattern: str) -> bool:
    return len(pattern) >= 2 and pattern.startswith("/") and pattern.endswith("/")


#: Value representations whose values are numbers (PS3.5 6.2): a plain number matches by value.
_NUMERIC_VRS = frozenset({"DS", "IS", "FL", "FD", "US", "SS", "UL", "SL", "UV", "SV"})
#: A decimal number as DS/IS write it (PS3.5 6.2); float() alone would also take "1_4", "nan".
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number(text: str) -> float | None:
    text = text.strip()
    return float(text) if _NUMBER.fullmatch(text) else None


def _is_numeric(keyword: str) -> bool:
    tag = tag_for_keyword(keyword)
    if tag is None:
        return False
    try:
        return dictionary_VR(tag) in _NUMERIC_VRS
    except KeyError:
        return False


def _value_matches(value: str, pattern: str, numeric: bool = False) -> bool:
    if _is_regex(pattern):
        return re.fullmatch(pattern[1:-1], value) is not None
    if any(c in pattern for c in "*?"):
        # The values come from peers: the same non-backtracking matcher as C-FIND (brackets
        # are literal, as in DICOM; fnmatch would read them as a class).
        return wildcard_match(value, pattern)
    if value == pattern.strip():
        return True
    if numeric:
        # DS/IS text varies by writer ("95", "95.0", "9.5E1"): a user means the number.
        wanted, got = _number(pattern), _number(value)
        return wanted is not None and got is not None and wanted == got
    return False


#: At most this many values of one key are shown in a reason.
_SHOWN_VALUES = 8


@dataclass(frozen=True)
class KeyResult:
    """How one key of a route fared against a series."""

    key: str
    expected: str | list[str]
    actual: list[str] | None
    matched: bool

    def describe(self) -> str:
        """E.g. ``Modality 'CR' in ['CR', 'DX']: yes``.

        The value of a patient attribute (group 0010: PatientSex, PatientAge, ...) is not shown:
        the reason is stored and answered by the API.
        """
        if self.actual is None:
            shown = "absent"
        elif _is_patient_attribute(self.key):
            shown = "(value withheld)"
        elif len(self.actual) == 1:
            shown = repr(self.actual[0])
        elif len(self.actual) > _SHOWN_VALUES:
            # e.g. a per-frame value of a 300-frame object: the reason stays readable
            shown = (repr(self.actual[:_SHOWN_VALUES])[:-1]
                     + f", ... ({len(self.actual)} values)]")
        else:
            shown = repr(self.actual)
        return f"{self.key} {shown} ~ {self.expected!r}: {'yes' if self.matched else 'no'}"


def _is_patient_attribute(keyword: str) -> bool:
    """Whether `keyword` is an attribute of the Patient group (0010,xxxx), PS3.6."""
    tag = tag_for_keyword(keyword)
    return tag is not None and tag >> 16 == 0x0010


@dataclass(frozen=True)
class RouteMatch:
    """One route against one series: matched or not, key by key."""

    route: str
    matched: bool
    keys: tuple[KeyResult, ...]

    @property
    def reason(self) -> str:
        """The keys, in words; for a miss, the failing keys first."""
        ordered = sorted(self.keys, key=lambda k: k.matched)
        return "; ".join(k.describe() for k in ordered) or "no conditions (matches everything)"


def header_values(ds: Dataset, keywords: Iterable[str],
                  calling_ae_titles: Sequence[str] = ()) -> dict[str, list[str] | None]:
    """The values routing compares, as lists of strings (None when the header lacks one)."""
    values: dict[str, list[str] | None] = {}
    for key in keywords:
        if key == CALLING_AE_TITLE:
            values[key] = [a.strip() for a in calling_ae_titles] if calling_ae_titles else None
            continue
        elements = [ds[key]] if key in ds else _functional_group_elements(ds, key)
        if key == _BODY_PART:
            coded = body_parts_examined(ds)
            if coded or not elements:  # an empty written value stays "" when no code helps
                values[key] = coded or None
                continue
        if not elements:
            values[key] = None
            continue
        if len(elements) == 1:
            values[key] = _element_values(elements[0])
            continue
        found: list[str] = []  # every frame's value, each once
        for element in elements:
            found.extend(v for v in _element_values(element) if v not in found)
        values[key] = found
    return values


def _element_values(element: DataElement) -> list[str]:
    raw = element.value
    if raw is None:
        return [""]
    if isinstance(raw, MultiValue | list):
        items = [str(v).strip() for v in raw]
        return [*items, "\\".join(items)] if len(items) > 1 else items
    return [str(raw).strip()]


def _functional_group_elements(ds: Dataset, key: str) -> list[DataElement]:
    """`key` inside the functional group macros of an enhanced multi-frame object.

    The shared groups first (one value for every frame); else each frame's own groups, every
    frame's element (a value that varies by frame, e.g. the echo of a multi-echo series).
    """
    for groups_key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        found: list[DataElement] = []
        for group in ds.get(groups_key) or ():
            for macro in group:
                if macro.VR != "SQ" or not macro.value:
                    continue
                for item in macro.value:
                    if key in item:
                        found.append(item[key])
        if found:
            return found
    return []


#: Anatomic region codes (SNOMED CT, CID 4031 "Common Anatomic Regions") and the Body Part
#: Examined term each stands for (PS3.16 Annex L, the table highdicom's legacy conversion
#: follows). Where two terms share a code (CHEST and THORAX, HEART and ENDOCARDIAC, ...) the
#: term a modality writes is given. The last group are the codes of older editions of the table
#: (before the 2019 revision of CID 4031), which converters of that time wrote.
BODY_PART_CODES: dict[str, str] = {
    "818981001": "ABDOMEN", "818982008": "ABDOMENPELVIS", "23451007": "ADRENAL",
    "15825003": "AORTA", "70258002": "ANKLE", "89837001": "BLADDER", "12738006": "BRAIN",
    "76752008": "BREAST", "80144004": "CALCANEUS", "69105007": "CAROTID",
    "816094009": "CHEST", "416550000": "CHESTABDOMEN", "416775004": "CHESTABDPELVIS",
    "51299004": "CLAVICLE", "64688005": "COCCYX", "122494005": "CSPINE",
    "1217257000": "CTSPINE", "117590005": "EAR", "16953009": "ELBOW",
    "32849002": "ESOPHAGUS", "66019005": "EXTREMITY", "81745001": "EYE", "89545001": "FACE",
    "71341001": "FEMUR", "87342007": "FIBULA", "7569003": "FINGER", "56459004": "FOOT",
    "14975008": "FOREARM", "28231008": "GALLBLADDER", "85562004": "HAND",
    "69536005": "HEAD", "774007": "HEADNECK", "80891009": "HEART", "24136001": "HIP",
    "85050009": "HUMERUS", "361078006": "IAC", "661005": "JAW", "64033007": "KIDNEY",
    "72696002": "KNEE", "4596009": "LARYNX", "10200004": "LIVER",
    "61685007": "LOWERLIMB", "122496007": "LSPINE", "1217253001": "LSSPINE",
    "39607008": "LUNG", "123851003": "MOUTH", "45048000": "NECK",
    "417437006": "NECKCHEST", "416152001": "NECKCHESTABDOMEN",
    "416319003": "NECKCHESTABDPELV", "45206002": "NOSE", "363654007": "ORBIT",
    "15497006": "OVARY", "15776009": "PANCREAS", "45289007": "PAROTID",
    "816092008": "PELVIS", "54066008": "PHARYNX", "41216001": "PROSTATE", "113197003": "RIB",
    "79601000": "SCAPULA", "16982005": "SHOULDER", "89546000": "SKULL",
    "421060004": "SPINE", "78961009": "SPLEEN", "54735007": "SSPINE", "56873002": "STERNUM",
    "69695003": "STOMACH", "40689003": "TESTIS", "69748006": "THYROID", "76505004": "THUMB",
    "12611008": "TIBIA", "1217256009": "TLSPINE", "53620006": "TMJ", "29707007": "TOE",
    "21974007": "TONGUE", "122495006": "TSPINE", "53120007": "UPPERLIMB",
    "35039007": "UTERUS", "38266002": "WHOLEBODY", "74670003": "WRIST",
    "13881006": "ZYGOMA",
    # Older editions: Thorax, Abdomen, Pelvis, Abdomen and Pelvis.
    "51185008": "CHEST", "113345001": "ABDOMEN", "12921003": "PELVIS",
    "416949008": "ABDOMENPELVIS",
}
#: Coding schemes of those codes: SNOMED CT, and its designator before 2017 (PS3.16 8).
_SNOMED = frozenset({"SCT", "SRT", "SNM3"})
_BODY_PART = "BodyPartExamined"


def body_parts_examined(ds: Dataset) -> list[str]:
    """The Body Part Examined terms of an image header, for routing and the model scope gate.

    Body Part Examined (0018,0015) at the top level; else inside the functional groups of an
    enhanced multi-frame object (the shared groups, e.g. a converter's Unassigned Shared
    Converted Attributes, else any frame's); else the Anatomic Region Sequence of the Frame
    Anatomy functional group (PS3.3 C.7.6.16.2.8; shared, else per frame) or of the top
    level, each SNOMED CT code mapped to its term by :data:`BODY_PART_CODES`. A code outside
    that table gives no term (an unknown body part, not a wrong one).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        An image header (pixel data not needed).

    Returns
    -------
    list of str
        Stripped terms as written (not upper-cased), each once; empty when the header names
        no body part. An empty top-level value counts as none when a code gives one.
    """
    written: list[str] = []
    elements = [ds[_BODY_PART]] if _BODY_PART in ds else _functional_group_elements(ds, _BODY_PART)
    for element in elements:
        for value in _element_values(element):
            if value and value not in written:
                written.append(value)
    if written:
        return written
    return _coded_body_parts(ds)


def _coded_body_parts(ds: Dataset) -> list[str]:
    """The terms of the anatomic region codes of Frame Anatomy, else of the top level."""
    regions: list[Dataset] = []
    for groups_key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups_key) or ():
            for anatomy in group.get("FrameAnatomySequence") or ():
                regions.extend(anatomy.get("AnatomicRegionSequence") or ())
        if regions:
            break
    if not regions:
        regions = list(ds.get("AnatomicRegionSequence") or ())
    terms: list[str] = []
    for item in regions:
        scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
        term = BODY_PART_CODES.get(str(item.get("CodeValue", "") or "").strip())
        if scheme in _SNOMED and term is not None and term not in terms:
            terms.append(term)
    return terms


def evaluate(routes: Sequence[tuple[str, MatchSpec]],
             values: Mapping[str, list[str] | None]) -> list[RouteMatch]:
    """Match each ``(name, match)`` route against a series' values (:func:`header_values`)."""
    results: list[RouteMatch] = []
    for name, match in routes:
        keys: list[KeyResult] = []
        for key, expected in match.items():
            actual = values.get(key)
            numeric = _is_numeric(key)
            ok = actual is not None and any(
                _value_matches(v, p, numeric) for v in actual for p in _as_patterns(expected)
            )
            keys.append(KeyResult(key, expected, actual, ok))
        results.append(RouteMatch(name, all(k.matched for k in keys), tuple(keys)))
    return results


def evaluate_file(routes: Sequence[tuple[str, MatchSpec]], path: Path,
                  calling_ae_titles: Sequence[str] = ()) -> list[RouteMatch]:
    """Read one file's header and match every route against it.

    Raises
    ------
    DicomReadError
        The file is not readable DICOM.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises several types for non-DICOM input
        raise DicomReadError(f"{path}: not a readable DICOM file ({safe_message(exc)})") \
            from None
    keys = {k for _, match in routes for k in match}
    return evaluate(routes, header_values(ds, keys, calling_ae_titles))
