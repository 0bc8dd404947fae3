"""C-FIND matching over the index: one query per Query/Retrieve level (PS3.4 annex C).

The matching rules of PS3.4 C.2.2.2 are turned into SQL on the indexed columns:

- universal matching (C.2.2.2.3): an empty value, or a value of only ``*``, matches everything;
- single value matching (C.2.2.2.1): exact and case-sensitive, except for PN values (see below);
- wildcard matching (C.2.2.2.4): ``*`` (any run of characters) and ``?`` (one character) in text
  and PN values, translated to ``LIKE`` (PostgreSQL, with the other LIKE metacharacters escaped)
  or ``GLOB`` (SQLite, whose ``LIKE`` ignores case); in Python, :func:`wildcard_match`;
- range matching (C.2.2.2.5): ``A-B``, ``A-`` and ``-B`` for DA and TM values; a single TM value
  matches the whole minute/second it names (``1200`` matches 12:00:00-12:00:59.999999);
- list of UID matching (C.2.2.2.2): backslash-separated UIDs for UI keys.

Case: PN values (PatientName, ReferringPhysicianName) match case-insensitively, which C.2.2.2.1
permits for PN ("insensitive to some or all aspects of case"); users type names in any case.
On SQLite ``lower()`` folds ASCII letters only, on PostgreSQL every letter. Everything else is
case-sensitive, as the standard requires.

Results the service produced (``result_objects``) are part of the store: each result series is
answered at series and image level under its study, with Modality SR, SEG or OT by its kind. The
index does not copy their SeriesNumber, SeriesDescription, BodyPartExamined, SeriesDate or
InstanceNumber: conditions on those (:data:`HEADER_ONLY_FOR_RESULTS`) are not applied to result
rows here; the caller reads them from the file and applies :meth:`Condition.matches`.

Wildcard matching runs in polynomial time wherever it runs, whatever the pattern (a peer writes
it): :func:`wildcard_match` never backtracks (O(len(value) x len(pattern))). Both databases'
matchers stop a ``*`` scan as soon as the rest of the pattern cannot match anywhere further on
(SQLite's ``patternCompare`` returns ``SQLITE_NOWILDCARDMATCH``, PostgreSQL's ``MatchText``
returns ``LIKE_ABORT``): measured on SQLite 3.40 and PostgreSQL 15 with a 100,000-character
value, ``*?**?**?**?**?**?*Z``, ``*a*a*a*a*a*a*ab``, ``*a?b*a?b*a?b*a?c*`` and 20 ``a*``
segments each took under 2 ms (a backtracking regular expression needs 17 s for the first on a
32-character value).

Nothing here imports pynetdicom or pydicom: keys arrive as keyword -> text, answers leave as
plain dataclasses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sqlalchemy import ColumnElement, Select, and_, case, func, select
from sqlalchemy.orm import Session

from storage.models import Instance, Patient, ResultObject, Series, Study

Vr = Literal["text", "pn", "da", "tm", "ui", "is", "cs-list"]
ConditionKind = Literal["single", "wildcard", "range", "list"]

#: Matching keys, by keyword: (Query/Retrieve level, how the value matches).
ATTRIBUTES: dict[str, tuple[str, Vr]] = {
    "PatientName": ("PATIENT", "pn"),
    "PatientID": ("PATIENT", "text"),
    "IssuerOfPatientID": ("PATIENT", "text"),
    "PatientBirthDate": ("PATIENT", "da"),
    "PatientSex": ("PATIENT", "text"),
    "StudyInstanceUID": ("STUDY", "ui"),
    "StudyDate": ("STUDY", "da"),
    "StudyTime": ("STUDY", "tm"),
    "AccessionNumber": ("STUDY", "text"),
    "StudyID": ("STUDY", "text"),
    "StudyDescription": ("STUDY", "text"),
    "ReferringPhysicianName": ("STUDY", "pn"),
    "ModalitiesInStudy": ("STUDY", "cs-list"),
    "SeriesInstanceUID": ("SERIES", "ui"),
    "Modality": ("SERIES", "text"),
    "SeriesNumber": ("SERIES", "is"),
    "SeriesDescription": ("SERIES", "text"),
    "BodyPartExamined": ("SERIES", "text"),
    "SeriesDate": ("SERIES", "da"),
    "SOPInstanceUID": ("IMAGE", "ui"),
    "SOPClassUID": ("IMAGE", "ui"),
    "InstanceNumber": ("IMAGE", "is"),
}

#: Keys the index does not hold for result objects (read from their files by the caller).
HEADER_ONLY_FOR_RESULTS = frozenset(
    {"SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate", "InstanceNumber"}
)

#: Modality of a result series by its kind.
RESULT_MODALITIES = {"sr": "SR", "seg": "SEG", "heatmap": "OT"}

_LEVEL_ORDER = {"PATIENT": 0, "STUDY": 1, "SERIES": 2, "IMAGE": 3}
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_LIKE_ESCAPE = "!"
_CHUNK = 500  # values per IN (...) list
_Select = TypeVar("_Select", bound=Select[*tuple[Any, ...]])


class QueryValueError(ValueError):
    """A key's value breaks the matching rules of its VR (answered 0xA900 by the SCP)."""


def _time_bound(value: str, *, upper: bool) -> str:
    """A TM value padded to ``HHMMSS.ffffff``: with zeros (lower bound) or nines (upper)."""
    digits, _, fraction = value.partition(".")
    if upper:
        # A partial time names a whole span: 12 -> 12:59:59.999999, 1230 -> 12:30:59.999999.
        pad = "595959"[len(digits):] if len(digits) < 6 else ""
        return f"{digits}{pad}.{fraction.ljust(6, '9')}"
    return f"{digits.ljust(6, '0')}.{fraction.ljust(6, '0')}"


def wildcard_match(value: str, pattern: str, *, ignore_case: bool = False) -> bool:
    """Wildcard matching (PS3.4 C.2.2.2.4) of a whole value, in linear time per segment.

    ``*`` matches any run of characters (also none), ``?`` exactly one character, every other
    character itself. The pattern is cut at its ``*``: the first piece must match at the start
    of the value, the last at its end, and each piece between them is searched leftmost after
    the previous one. Taking the leftmost place is never wrong (a later piece can only find
    more room after it), so nothing is tried twice: at most O(len(value) x len(pattern))
    character comparisons, where a regular expression with ``.*`` backtracks exponentially
    (``*?**?**?**?**?**?*Z`` took 17 s on a 32-character value).

    Parameters
    ----------
    value : str
        The stored value.
    pattern : str
        The key's value as the peer sent it (any length, any content).
    ignore_case : bool
        Compare letters case-insensitively (PN, as the SQL does), one character to one
        character as Python's ``re.IGNORECASE`` does.

    Returns
    -------
    bool
        True if the pattern matches the whole value.
    """
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)

    def piece(part: str) -> re.Pattern[str]:
        # A fixed-width expression (literals and ".", no repetition): it cannot backtrack.
        # Only pieces no longer than the value get here, so a huge pattern compiles little.
        return re.compile("".join("." if c == "?" else re.escape(c) for c in part), flags)

    parts = pattern.split("*")
    if len(parts) == 1:
        return len(pattern) == len(value) and piece(pattern).fullmatch(value) is not None
    first, *middle, last = parts
    end = len(value) - len(last)  # where the last piece must start
    if len(first) > end:
        return False
    if first and piece(first).match(value) is None:
        return False
    position = len(first)
    for part in middle:
        if not part:
            continue  # "**" is one "*"
        if len(part) > end - position:
            return False
        found = piece(part).search(value, position, end)
        if found is None:
            return False
        position = found.end()
    return not last or piece(last).fullmatch(value, end) is not None


@dataclass(frozen=True)
class Condition:
    """One non-universal matching key.

    Attributes
    ----------
    vr : str
        How the value matches: ``text``, ``pn``, ``da``, ``tm``, ``ui``, ``is`` or ``cs-list``.
    kind : str
        ``single``, ``wildcard``, ``range`` (values: low, high; ``""`` is open) or ``list``.
    values : tuple of str
        The operands.
    """

    vr: Vr
    kind: ConditionKind
    values: tuple[str, ...]

    def matches(self, value: str | int | None) -> bool:
        """Apply the condition to one stored value in Python (same rules as the SQL).

        Parameters
        ----------
        value : str, int or None
            The attribute's value; None or ``""`` when absent.
        """
        text = "" if value is None else str(value).strip()
        if self.vr == "is":
            try:
                return text != "" and int(text) == int(self.values[0])
            except ValueError:
                return False
        if self.kind == "list":
            return text in self.values
        if self.kind == "wildcard":
            return wildcard_match(text, self.values[0], ignore_case=self.vr == "pn")
        if self.kind == "range":
            if not text:
                return False
            low, high = self.values
            if self.vr == "tm":
                stored = _time_bound(text, upper=False)
                return (not low or stored >= _time_bound(low, upper=False)) and (
                    not high or stored <= _time_bound(high, upper=True))
            return (not low or text >= low) and (not high or text <= high)
        if self.vr == "pn":
            return text.casefold() == self.values[0].casefold()
        return text == self.values[0]

    def matches_any(self, values: Iterable[str]) -> bool:
        """True if any of `values` matches (multi-valued attributes, e.g. ModalitiesInStudy)."""
        return any(self.matches(v) for v in values)


def parse_condition(vr: Vr, raw: str) -> Condition | None:
    """Turn a C-FIND key value into a condition; None for universal matching.

    Parameters
    ----------
    vr : str
        The matching kind of the key (see :data:`ATTRIBUTES`).
    raw : str
        The value as sent (multiple values joined by backslashes).

    Returns
    -------
    Condition or None
        None when the value is empty or only ``*`` (PS3.4 C.2.2.2.3 / C.2.2.2.4).

    Raises
    ------
    QueryValueError
        For a malformed date, time, range or integer.
    """
    value = raw.strip(" \x00")
    if not value or set(value) == {"*"}:
        return None
    if vr == "ui":
        uids = tuple(u.strip(" \x00") for u in value.split("\\") if u.strip(" \x00"))
        return Condition(vr, "list", uids) if len(uids) > 1 else Condition(vr, "single", uids)
    if vr == "cs-list":
        return Condition(vr, "list", tuple(v.strip() for v in value.split("\\") if v.strip()))
    if vr == "is":
        try:
            int(value)
        except ValueError:
            raise QueryValueError(f"{value!r} is not an integer") from None
        return Condition(vr, "single", (value,))
    if vr in ("da", "tm"):
        pattern = _DATE if vr == "da" else _TIME
        if "-" in value:
            low, _, high = (v.strip() for v in value.partition("-"))
            if not (low or high) or any(v and not pattern.match(v) for v in (low, high)):
                raise QueryValueError(f"{value!r} is not a valid {vr.upper()} range")
            return Condition(vr, "range", (low, high))
        if not pattern.match(value):
            raise QueryValueError(f"{value!r} is not a valid {vr.upper()} value")
        if vr == "tm":  # a time names a span: match it as a range of itself
            return Condition(vr, "range", (value, value))
        return Condition(vr, "single", (value,))
    if "*" in value or "?" in value:
        return Condition(vr, "wildcard", (value,))
    return Condition(vr, "single", (value,))


# -- SQL ---------------------------------------------------------------------------------------
def _like_pattern(pattern: str) -> str:
    escaped = "".join(_LIKE_ESCAPE + c if c in f"%_{_LIKE_ESCAPE}" else c for c in pattern)
    return escaped.replace("*", "%").replace("?", "_")


def _glob_pattern(pattern: str) -> str:
    # In GLOB, '*' and '?' already mean what DICOM means; only '[' opens a class.
    return pattern.replace("[", "[[]")


def _sql(expr: Any, cond: Condition, dialect: str) -> ColumnElement[bool]:
    """The SQL form of `cond` applied to a column expression."""
    if cond.vr == "is":
        return expr == int(cond.values[0])  # type: ignore[no-any-return]
    if cond.kind == "list":
        return expr.in_(list(cond.values))  # type: ignore[no-any-return]
    if cond.kind == "range":
        low, high = cond.values
        clauses = [expr != ""]
        if cond.vr == "tm":
            # Stored times vary in precision: compare the padded stored value.
            stored = func.substr(func.coalesce(expr, "") + "000000", 1, 6)
            if low:
                clauses.append(stored >= _time_bound(low, upper=False)[:6])
            if high:
                clauses.append(stored <= _time_bound(high, upper=True)[:6])
        else:
            if low:
                clauses.append(expr >= low)
            if high:
                clauses.append(expr <= high)
        return and_(*clauses)
    value = cond.values[0]
    if cond.kind == "wildcard":
        pattern: Any = _glob_pattern(value) if dialect == "sqlite" else _like_pattern(value)
    else:
        pattern = value
    if cond.vr == "pn":  # both sides folded by the database, so they fold alike
        expr, pattern = func.lower(expr), func.lower(pattern)
    if cond.kind == "wildcard":
        if dialect == "sqlite":
            return expr.op("GLOB")(pattern)  # type: ignore[no-any-return]
        return expr.like(pattern, escape=_LIKE_ESCAPE)  # type: ignore[no-any-return]
    return expr == pattern  # type: ignore[no-any-return]


def _columns(results: bool) -> dict[str, Any]:
    """Column expressions by keyword; for result rows Series/Instance come from ResultObject."""
    cols: dict[str, Any] = {
        "PatientName": Patient.patient_name,
        "PatientID": Patient.patient_id,
        "IssuerOfPatientID": Patient.issuer_of_patient_id,
        "PatientBirthDate": Patient.patient_birth_date,
        "PatientSex": Patient.patient_sex,
        "StudyInstanceUID": Study.study_instance_uid,
        "StudyDate": Study.study_date,
        "StudyTime": Study.study_time,
        "AccessionNumber": Study.accession_number,
        "StudyID": Study.study_id,
        "StudyDescription": Study.study_description,
        "ReferringPhysicianName": Study.referring_physician_name,
    }
    if results:
        cols.update({
            "SeriesInstanceUID": ResultObject.series_instance_uid,
            "Modality": _result_modality(),
            "SOPInstanceUID": ResultObject.sop_instance_uid,
            "SOPClassUID": ResultObject.sop_class_uid,
        })
    else:
        cols.update({
            "SeriesInstanceUID": Series.series_instance_uid,
            "Modality": Series.modality,
            "SeriesNumber": Series.series_number,
            "SeriesDescription": Series.series_description,
            "BodyPartExamined": Series.body_part_examined,
            "SeriesDate": Series.series_date,
            "SOPInstanceUID": Instance.sop_instance_uid,
            "SOPClassUID": Instance.sop_class_uid,
            "InstanceNumber": Instance.instance_number,
        })
    return cols


def _result_modality() -> Any:
    return case(*((ResultObject.kind == k, v) for k, v in RESULT_MODALITIES.items()),
                else_="OT")


def _where(query: _Select, conditions: Mapping[str, Condition], level: str, *,
           results: bool, dialect: str) -> _Select:
    """Add the conditions on keys at or above `level` that the index holds."""
    cols = _columns(results)
    for keyword, cond in conditions.items():
        known = ATTRIBUTES.get(keyword)
        if known is None or _LEVEL_ORDER[known[0]] > _LEVEL_ORDER[level]:
            continue
        column = cols.get(keyword)
        if column is not None:
            query = query.where(_sql(column, cond, dialect))
    return query


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


# -- answers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatientAttributes:
    """Patient-level attributes from the index."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str


@dataclass(frozen=True)
class StudyAttributes:
    """Study-level attributes from the index."""

    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str


@dataclass(frozen=True)
class SeriesAttributes:
    """Series-level attributes; for a result series only UID and modality are indexed."""

    series_instance_uid: str
    modality: str
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    series_date: str = ""


@dataclass(frozen=True)
class PatientMatch:
    """A patient-level answer."""

    patient: PatientAttributes
    related_studies: int
    related_series: int
    related_instances: int


@dataclass(frozen=True)
class StudyMatch:
    """A study-level answer (counts and modalities include the service's results)."""

    patient: PatientAttributes
    study: StudyAttributes
    modalities: tuple[str, ...]
    sop_classes: tuple[str, ...]
    related_series: int
    related_instances: int


@dataclass(frozen=True)
class SeriesMatch:
    """A series-level answer; ``result`` is True for a series of the service's results.

    ``path`` is a store-relative path of one of its files (to read what the index lacks).
    """

    patient: PatientAttributes
    study: StudyAttributes
    series: SeriesAttributes
    related_instances: int
    result: bool
    path: str


@dataclass(frozen=True)
class InstanceMatch:
    """An image-level answer; ``transfer_syntax_uid`` is ``""`` for results (read the file)."""

    patient: PatientAttributes
    study: StudyAttributes
    series: SeriesAttributes
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    path: str
    transfer_syntax_uid: str
    result: bool


def _patient(row: Patient) -> PatientAttributes:
    return PatientAttributes(row.patient_id, row.issuer_of_patient_id, row.patient_name,
                             row.patient_birth_date, row.patient_sex)


def _study(row: Study) -> StudyAttributes:
    return StudyAttributes(row.study_instance_uid, row.study_date, row.study_time,
                           row.accession_number, row.study_id, row.study_description,
                           row.referring_physician_name)


def _series(row: Series) -> SeriesAttributes:
    return SeriesAttributes(row.series_instance_uid, row.modality, row.series_number,
                            row.series_description, row.body_part_examined, row.series_date)


@dataclass
class _Stats:
    modalities: set[str] = field(default_factory=set)
    sop_classes: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    instances: int = 0


def _chunks(values: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(values), _CHUNK):
        yield list(values[start:start + _CHUNK])


def _study_stats(session: Session, study_uids: Sequence[str]) -> dict[str, _Stats]:
    """Series, instances, modalities and SOP classes of studies, results included."""
    stats = {uid: _Stats() for uid in study_uids}
    for chunk in _chunks(list(study_uids)):
        rows = session.execute(
            select(Study.study_instance_uid, Series.series_instance_uid, Series.modality,
                   Instance.sop_class_uid, func.count(Instance.id))
            .join(Series, Series.study_pk == Study.id)
            .join(Instance, Instance.series_pk == Series.id)
            .where(Study.study_instance_uid.in_(chunk))
            .group_by(Study.study_instance_uid, Series.series_instance_uid, Series.modality,
                      Instance.sop_class_uid)
        ).all()
        result_rows = session.execute(
            select(ResultObject.study_instance_uid, ResultObject.series_instance_uid,
                   _result_modality(), ResultObject.sop_class_uid, func.count(ResultObject.id))
            .where(ResultObject.study_instance_uid.in_(chunk))
            .group_by(ResultObject.study_instance_uid, ResultObject.series_instance_uid,
                      ResultObject.kind, ResultObject.sop_class_uid)
        ).all()
        for study_uid, series_uid, modality, sop_class, count in [*rows, *result_rows]:
            entry = stats[study_uid]
            entry.series.add(series_uid)
            if modality:
                entry.modalities.add(modality)
            entry.sop_classes.add(sop_class)
            entry.instances += int(count)
    return stats


def find_patients(session: Session, conditions: Mapping[str, Condition]) -> list[PatientMatch]:
    """PATIENT level (Patient Root, PS3.4 C.6.1.1.2): patients matching the patient keys.

    Parameters
    ----------
    session : Session
        A session of the index.
    conditions : mapping of str to Condition
        Non-universal keys by keyword; keys below the patient level are ignored.
    """
    query = _where(select(Patient), conditions, "PATIENT", results=False,
                   dialect=_dialect(session))
    patients = list(session.scalars(query.order_by(Patient.patient_id, Patient.id)).all())
    if not patients:
        return []
    by_patient: dict[int, list[str]] = {p.id: [] for p in patients}
    for chunk in _chunks([str(p.id) for p in patients]):
        for pk, uid in session.execute(
            select(Study.patient_pk, Study.study_instance_uid)
            .where(Study.patient_pk.in_([int(c) for c in chunk]))
        ).all():
            by_patient[pk].append(uid)
    stats = _study_stats(session, [u for uids in by_patient.values() for u in uids])
    answers = []
    for p in patients:
        uids = by_patient[p.id]
        answers.append(PatientMatch(
            _patient(p), len(uids), sum(len(stats[u].series) for u in uids),
            sum(stats[u].instances for u in uids),
        ))
    return answers


def find_studies(session: Session, conditions: Mapping[str, Condition]) -> list[StudyMatch]:
    """STUDY level (PS3.4 C.6.1.1.3 / C.6.2.1.2): studies matching patient and study keys.

    ModalitiesInStudy matches when any of its values matches any modality of the study
    (results included).
    """
    query = _where(select(Patient, Study).join(Study, Study.patient_pk == Patient.id),
                   conditions, "STUDY", results=False, dialect=_dialect(session))
    rows = session.execute(
        query.order_by(Study.study_date, Study.study_time, Study.study_instance_uid)
    ).all()
    stats = _study_stats(session, [s.study_instance_uid for _, s in rows])
    wanted = conditions.get("ModalitiesInStudy")
    answers = []
    for patient, study in rows:
        entry = stats[study.study_instance_uid]
        if wanted is not None and not wanted.matches_any(entry.modalities):
            continue
        answers.append(StudyMatch(_patient(patient), _study(study),
                                  tuple(sorted(entry.modalities)),
                                  tuple(sorted(entry.sop_classes)),
                                  len(entry.series), entry.instances))
    return answers


def find_series(session: Session, conditions: Mapping[str, Condition]) -> list[SeriesMatch]:
    """SERIES level (PS3.4 C.6.1.1.4 / C.6.2.1.3): indexed series, then result series.

    Conditions on :data:`HEADER_ONLY_FOR_RESULTS` keys are not applied to result series.
    """
    dialect = _dialect(session)
    count = (select(func.count(Instance.id)).where(Instance.series_pk == Series.id)
             .scalar_subquery())
    first_path = (select(func.min(Instance.path)).where(Instance.series_pk == Series.id)
                  .scalar_subquery())
    query = _where(
        select(Patient, Study, Series, count, first_path)
        .join(Study, Study.patient_pk == Patient.id).join(Series, Series.study_pk == Study.id),
        conditions, "SERIES", results=False, dialect=dialect,
    )
    answers = [
        SeriesMatch(_patient(p), _study(st), _series(se), int(n), False, str(path or ""))
        for p, st, se, n, path in session.execute(
            query.order_by(Study.study_instance_uid, Series.series_number, Series.id)
        ).all()
    ]
    result_query = _where(
        select(Patient, Study, ResultObject.series_instance_uid, func.min(_result_modality()),
               func.count(ResultObject.id), func.min(ResultObject.path))
        .join(Study, Study.patient_pk == Patient.id)
        .join(ResultObject, ResultObject.study_instance_uid == Study.study_instance_uid)
        .group_by(Patient.id, Study.id, ResultObject.series_instance_uid),
        conditions, "SERIES", results=True, dialect=dialect,
    )
    for p, st, series_uid, modality, n, path in session.execute(
        result_query.order_by(ResultObject.series_instance_uid)
    ).all():
        answers.append(SeriesMatch(_patient(p), _study(st),
                                   SeriesAttributes(series_uid, modality), int(n), True,
                                   str(path)))
    return answers


def find_instances(session: Session,
                   conditions: Mapping[str, Condition]) -> list[InstanceMatch]:
    """IMAGE level (PS3.4 C.6.1.1.5 / C.6.2.1.4): indexed instances, then result objects.

    Also what C-MOVE and C-GET retrieve. Conditions on :data:`HEADER_ONLY_FOR_RESULTS` keys
    are not applied to result objects.
    """
    dialect = _dialect(session)
    query = _where(
        select(Patient, Study, Series, Instance)
        .join(Study, Study.patient_pk == Patient.id).join(Series, Series.study_pk == Study.id)
        .join(Instance, Instance.series_pk == Series.id),
        conditions, "IMAGE", results=False, dialect=dialect,
    )
    answers = [
        InstanceMatch(_patient(p), _study(st), _series(se), i.sop_instance_uid, i.sop_class_uid,
                      i.instance_number, i.path, i.transfer_syntax_uid, False)
        for p, st, se, i in session.execute(
            query.order_by(Study.study_instance_uid, Series.series_number, Series.id,
                           Instance.instance_number, Instance.id)
        ).all()
    ]
    result_query = _where(
        select(Patient, Study, ResultObject)
        .join(Study, Study.patient_pk == Patient.id)
        .join(ResultObject, ResultObject.study_instance_uid == Study.study_instance_uid),
        conditions, "IMAGE", results=True, dialect=dialect,
    )
    for p, st, r in session.execute(result_query.order_by(ResultObject.id)).all():
        series = SeriesAttributes(r.series_instance_uid, RESULT_MODALITIES.get(r.kind, "OT"))
        answers.append(InstanceMatch(_patient(p), _study(st), series, r.sop_instance_uid,
                                     r.sop_class_uid, None, r.path, "", True))
    return answers
