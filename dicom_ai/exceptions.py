"""The one error tree of dicom-ai.

::

    DicomAIError
    ├── ConfigError            bad or missing setting (names the key)
    ├── StorageError           the store or index cannot do what was asked
    │   ├── InvalidUIDError    a UID that is not DICOM UID syntax (never becomes a path)
    │   └── OutOfSpaceError    free space below ``storage.min_free_bytes``
    ├── IngestError            a received instance is refused; carries its DIMSE status
    ├── DicomReadError         a stored or given file is not readable DICOM (names the file)
    ├── NetworkError           association refused, aborted or timed out as a requestor
    ├── JobError               a job cannot run; says whether a retry could help
    └── ReportError            a result object (SR, SEG, SC) cannot be built (also a ValueError)

Code that refuses a received instance raises :class:`IngestError` with the DIMSE status
to answer; the C-STORE handler maps everything else to "cannot understand".

What an error may say
---------------------
The messages of these classes are ours: they name UIDs, AE titles, keywords and rules, never
an attribute value of a patient. Library messages are not ours: highdicom's
``Unable to convert '1901-12-31' to 'DA' object`` carries a birth date, a SQLAlchemy error
carries its bound parameters. :func:`safe_message` is the one way an exception becomes text
that is stored (``jobs.error``, routing decisions) or logged (``dicom_ai.logs`` applies it to
every exception a log record carries): known library messages are classified (which
attribute, which rule) without the value, unknown ones are reduced to the exception type, the
attribute keyword where one can be named and where it was raised.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterable, Iterator
from pathlib import PurePath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


class DicomAIError(Exception):
    """Base class of every error dicom-ai raises on purpose."""


class ConfigError(DicomAIError):
    """A configuration value is missing or invalid; the message names the key."""


class StorageError(DicomAIError):
    """The store or the index cannot complete an operation."""


class InvalidUIDError(StorageError):
    """A UID is not valid DICOM UID syntax (PS3.5 section 9.1) or is longer than 64 chars."""


class OutOfSpaceError(StorageError):
    """Free space on the store is below the configured minimum."""


class IngestError(DicomAIError):
    """A received instance is refused.

    Parameters
    ----------
    status : int
        The DIMSE status to answer (PS3.4 annex B.2.3), e.g. ``0xA900``.
    reason : str
        Why; written to the quarantine record and the log (never patient data).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class DicomReadError(DicomAIError):
    """A file that should be DICOM cannot be read as DICOM (names the file, never a value)."""


class NetworkError(DicomAIError):
    """An association could not be established or was aborted."""


class JobError(DicomAIError):
    """A job cannot complete; ``retryable`` is False when trying again cannot help.

    Parameters
    ----------
    message : str
        Why, for the job row and the operator.
    retryable : bool
        True for passing trouble (a busy resource), False for the input or the configuration.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class ReportError(DicomAIError, ValueError):
    """A result object (SR, SEG, heat-map SC) cannot be built from the run and its sources."""


# -- what an error may say ------------------------------------------------------------------------
# A quoted value as Python's repr or an f-string writes it; greedy, so a quote inside the value
# does not end it early (the pattern's fixed text after the value anchors the match).
_QUOTED = r"(?:'.*'|\".*\")"
_VR = r"(?P<vr>[A-Z]{2})"

#: Library messages that carry the offending value: the pattern (its ``value`` group is
#: withheld) and the rule, in words, that replaces it.
_VALUE_MESSAGES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.DOTALL), rule) for pattern, rule in (
        # pydicom.valuerep DA/DT/TM, as highdicom's copies of the patient module raise it
        (rf"Unable to convert (?:non-conformant value )?'(?P<value>.*)' to '{_VR}' object",
         "not a valid {vr} value"),
        # pydicom validation (warn_and_log) and DS/IS
        (rf"Invalid value for VR {_VR}: (?P<value>{_QUOTED})", "not a valid {vr} value"),
        (rf"Value (?P<value>{_QUOTED}) is not valid for elements with a VR of {_VR}",
         "not a valid {vr} value"),
        # highdicom's enumerations (PatientSexValues, ...): Python's Enum lookup
        (rf"(?P<value>{_QUOTED}) is not a valid (?P<enum>\w+)", "not one of the {enum}"),
        # highdicom.base logs a suspicious patient name; check_person_name warns
        (rf'value of argument "(?P<arg>\w+)" is potentially invalid: (?P<value>{_QUOTED})',
         'value of argument "{arg}" is potentially invalid'),
        (r'The string (?P<value>".*") is unlikely to represent the intended person name'
         r"(?P<rest>[^\n]*)", "not a valid PN value (a single component)"),
        # int()/float() of a string attribute
        (rf"invalid literal for (?P<type>\w+)\(\) with base \d+: (?P<value>{_QUOTED})",
         "not a valid {type}"),
        (rf"could not convert string to (?P<type>\w+): (?P<value>{_QUOTED})", "not a valid {type}"),
    ))

#: Library messages known to carry no value: kept as they are (whole message).
_SAFE_MESSAGES = re.compile("|".join((
    r"The value length \(\d+\) exceeds the maximum length of \d+ allowed for VR [A-Z]{2}\.?",
    r"The PN component length \(\d+\) exceeds the maximum allowed length of \d+\.?",
    r"A value of type '\w+' cannot be assigned to a tag with VR [A-Z]{2}\.?",
    r"Invalid value length \d+: the value length for a tag with VR [A-Z]{2} must be a "
    r"multiple of \d+\.?",
    r"Invalid type for a person name\.",
    r"'\w+' object has no attribute '\w+'",
    r"Unable to allocate [\d.]+ [KMGTPE]?i?B for an array with shape \([\d, ]*\) and data "
    r"type \w+",
    r"cannot reshape array of size \d+ into shape \([\d, ]*\)",
    r"could not broadcast input array from shape \([\d, ]*\) into shape \([\d, ]*\)",
    # sqlite3 (names of tables and columns only)
    r"(?:UNIQUE|NOT NULL|CHECK|FOREIGN KEY) constraint failed(?:: [\w.]+(?:, [\w.]+)*)?",
    r"database is locked|database table is locked(?:: \w+)?|disk I/O error",
    r"database or disk is full|attempt to write a readonly database",
    r"unable to open database file|no such (?:table|column): [\w.]+",
)))

# Exceptions of these packages describe arrays and operations, never DICOM attribute values.
_ARRAY_PACKAGES = ("numpy", "tensorflow", "keras", "onnxruntime")
_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)")
_WORD = re.compile(r"\b[A-Z][A-Za-z0-9]{2,}\b")
_LONGEST = 2000  # longer texts are cut before matching: every pattern stays cheap


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _keyword_of_tag(group: str, element: str) -> str | None:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(int(group + element, 16)) or None


def _is_keyword(word: str) -> bool:
    from pydicom.datadict import keyword_dict

    return word in keyword_dict


def _values(ds: Dataset) -> Iterator[tuple[str, list[str]]]:
    """(keyword, values as text) of each top-level text element of ``ds``."""
    from pydicom.multival import MultiValue

    for elem in ds:
        if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or not elem.keyword:
            continue
        value = elem.value
        items = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
        yield elem.keyword, [str(v) for v in items if v is not None]


def _attribute(text: str, value: str | None, datasets: Iterable[Dataset]) -> str | None:
    """The attribute a message is about: a keyword or tag it names, or whose value it carries."""
    for match in _TAG.finditer(text):
        keyword = _keyword_of_tag(*match.groups())
        if keyword:
            return keyword
    for word in _WORD.findall(text):
        if _is_keyword(word):
            return str(word)
    for ds in datasets:
        for keyword, values in _values(ds):
            if value is not None and value in values:
                return keyword
            if value is None and any(len(v) >= 3 and v in text for v in values):
                return keyword
    return None


def _classify(text: str, datasets: Iterable[Dataset]) -> str | None:
    """A known value-carrying message, as ``"Keyword: rule"``; None if not one of them."""
    for pattern, rule in _VALUE_MESSAGES:
        match = pattern.fullmatch(text.strip())
        if match is None:
            continue
        parts = match.groupdict()
        value = parts.pop("value")
        if value[:1] in "'\"" and value[-1:] == value[:1]:
            value = value[1:-1]
        keyword = None
        enum = parts.get("enum") or ""
        arg = parts.get("arg") or ""
        if enum.endswith("Values") and _is_keyword(enum[: -len("Values")]):
            keyword = enum[: -len("Values")]  # highdicom's PatientSexValues: PatientSex
        elif arg and _is_keyword(name := "".join(w.title() for w in arg.split("_"))):
            keyword = name  # highdicom's argument patient_name: PatientName
        keyword = keyword or _attribute("", value, datasets)
        said = rule.format(**{k: v or "" for k, v in parts.items()})
        return f"{keyword}: {said}" if keyword else said
    return None


def _where(exc: BaseException) -> str:
    """Where `exc` was raised, as ``package/module.py:line`` (no directories above it)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    path = PurePath(frames[-1].filename)
    parts = path.parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + 1:]
            break
    else:
        parts = parts[-2:]
    return f"{'/'.join(parts)}:{frames[-1].lineno}"


def _database_text(exc: BaseException) -> str:
    """A SQLAlchemy error without its statement and bound parameters (they carry values)."""
    orig = getattr(exc, "orig", None)
    if orig is None:  # not a statement error: configuration and pool messages, no values
        return _first_line(str(exc)[:_LONGEST].split("[SQL:")[0])
    driver = type(orig).__name__
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:  # psycopg: the SQLSTATE and the names the server reports, never the DETAIL
        diag = getattr(orig, "diag", None)
        names = [getattr(diag, field, None) for field in
                 ("table_name", "column_name", "constraint_name")] if diag else []
        where = ", ".join(n for n in names if n)
        return f"({driver}, SQLSTATE {sqlstate}{', ' + where if where else ''})"
    first = _first_line(str(orig)[:_LONGEST])
    if _SAFE_MESSAGES.fullmatch(first) or (
            type(exc).__name__ == "OperationalError"
            and type(orig).__module__.startswith("psycopg")):
        return f"({driver}) {first}"  # sqlite3's fixed texts; a connection failure
    return f"({driver}; statement and parameters withheld)"


def _library_text(exc: BaseException, datasets: list[Dataset]) -> str:
    """What a library exception may say: the safe part of its message, or a description."""
    module = type(exc).__module__
    if module.startswith("sqlalchemy"):
        return _database_text(exc)
    text = str(exc)[:_LONGEST]
    if not text.strip():
        return ""
    classified = _classify(text, datasets)
    if classified is not None:
        return classified
    first = _first_line(text)
    if isinstance(exc, OSError) or _SAFE_MESSAGES.fullmatch(first) or \
            module.split(".")[0] in _ARRAY_PACKAGES:
        return first[:300]
    about = [f"about {keyword}"] if (keyword := _attribute(text, None, datasets)) else []
    where = [f"raised in {place}"] if (place := _where(exc)) else []
    return f"(library message withheld; {'; '.join([*where, *about]) or 'no detail'})"


def _own_text(exc: DicomAIError, datasets: list[Dataset], depth: int = 0) -> str:
    """Our message, with any library message it embeds replaced by its safe form."""
    text = str(exc)
    for inner in (exc.__cause__, exc.__context__):
        if inner is None or inner is exc or depth > 8:  # a chain made into a loop by hand
            continue
        raw = str(inner)
        safe = _own_text(inner, datasets, depth + 1) if isinstance(inner, DicomAIError) \
            else safe_message(inner, datasets)
        if raw and raw in text:
            text = text.replace(raw, safe)
            continue
        # a wrapper that kept only the first line(s)
        for line in (" ".join(raw.split("\n")[:3]).strip(), _first_line(raw)):
            if line and line in text:
                text = text.replace(line, safe)
    return text


def safe_message(exc: BaseException, datasets: Iterable[Dataset] = ()) -> str:
    """Text of `exc` fit for a log line, a database column or an API answer: no attribute value.

    * dicom-ai's own errors (:class:`DicomAIError`) keep their message; a library message
      they embed (``f"...: {exc}"`` with the library exception as cause or context) is
      replaced by its safe form.
    * Known library messages that carry a value (pydicom/highdicom VR conversion and
      validation, enumerations, person-name checks, ``int()``) become the attribute and the
      rule: ``ValueError: PatientBirthDate: not a valid DA value``.
    * Library messages known to be value-free, OS errors and array-library errors are kept;
      database errors lose their statement and bound parameters.
    * Anything else becomes its type, where it was raised and the attribute keyword if the
      message names a keyword or tag or carries the value of an attribute of `datasets`.

    Parameters
    ----------
    exc : BaseException
        Any exception.
    datasets : iterable of pydicom.dataset.Dataset
        The headers the failing operation worked on, if any: a value quoted by a library
        message is looked up in them to name its attribute (PS3.6 keyword).

    Returns
    -------
    str
        Never the value of an attribute.
    """
    datasets = list(datasets)
    if isinstance(exc, DicomAIError):
        return _own_text(exc, datasets) or type(exc).__name__
    text = _library_text(exc, datasets)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def redact(text: str) -> str:
    """`text` with the values of known value-carrying library messages withheld.

    For free text that is not an exception: what pydicom and highdicom log or warn
    (``Invalid value for VR DA: '1901-12-31'.`` becomes ``Invalid value for VR DA: (value
    withheld).``). Text around the message is kept.

    Parameters
    ----------
    text : str
        A log message.

    Returns
    -------
    str
    """
    if len(text) > _LONGEST:
        text = text[:_LONGEST] + " [cut]"
    for pattern, _rule in _VALUE_MESSAGES:
        if pattern.search(text):
            text = pattern.sub(_withheld, text)
    return text


def _withheld(match: re.Match[str]) -> str:
    start, end = match.span("value")
    offset = match.start()
    whole = match.group(0)
    return whole[: start - offset] + "(value withheld)" + whole[end - offset:]


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` with control characters written as escapes: one log record stays one line.

    Parameters
    ----------
    text : str
        A formatted log message, say.

    Returns
    -------
    str
        ``\\n``, ``\\r`` and ``\\t`` as those escapes, other C0/C1 controls as ``\\xNN``,
        U+2028/U+2029 as ``\\uNNNN``; a backslash is kept as it is.
    """
    def one(match: re.Match[str]) -> str:
        char = match.group(0)
        if char in _NAMED:
            return _NAMED[char]
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROLS.sub(one, text)


def safe_traceback(exc: BaseException) -> str:
    """A traceback of `exc` whose frames are kept and whose messages are :func:`safe_message`.

    Python's own traceback prints each exception's message (and notes), which may quote an
    attribute value; this one prints the same frames and chain with the safe messages.

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    str
        Lines without a trailing newline.
    """
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, (
                "The above exception was the direct cause of the following exception:")
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, (
                "During handling of the above exception, another exception occurred:")
        else:
            current = None
    lines: list[str] = []
    for item, link in reversed(chain):
        frames = traceback.format_tb(item.__traceback__)
        if frames:
            lines.append("Traceback (most recent call last):")
            lines.extend(frame.rstrip("\n") for frame in frames)
        kind = type(item)
        name = kind.__qualname__ if kind.__module__ == "builtins" else \
            f"{kind.__module__}.{kind.__qualname__}"
        body = _own_text(item, []) if isinstance(item, DicomAIError) else \
            _library_text(item, [])
        # The frames are code; the message line is ours to keep on one line.
        lines.append(escape_controls(f"{name}: {body}" if body else name))
        if link:
            lines.extend(("", link, ""))
    return "\n".join(lines)
