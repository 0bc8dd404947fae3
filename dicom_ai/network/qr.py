"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET over what the service stores (PS3.4 annex C).

Both information models are served: Patient Root (levels PATIENT, STUDY, SERIES, IMAGE) and
Study Root (STUDY, SERIES, IMAGE). Matching (wildcards, ranges, UID lists, case rules) is
:mod:`storage.query`'s; this module turns the request identifier into conditions, answers with
the requested keys, and streams retrieved files. The results the service produced (SR, SEG,
heat-map SC) are answered and retrieved like received instances.

Queries are relational in one respect: the unique keys of the levels above the query level are
optional (a hierarchical SCU sends them and they match as usual). Logs carry levels, counts, UIDs
and AE titles, never the identifier (it holds patient names and IDs).

Closed by default (``[query_retrieve]``): a request from a calling AE title not in
``allowed_calling_aets``, or from a host outside ``allowed_hosts`` when that is set, is refused
before its identifier is used: C-FIND and C-GET with 0x0124 (Refused: Not Authorized, a general
status of PS3.7 annex C), C-MOVE with 0xA801 (Refused: Move Destination unknown), because
pynetdicom sends any other C-MOVE status only after opening the sub-association, and a refused
caller must not make us contact a destination. A retrieve identifier (C-MOVE, C-GET) selects by
unique keys only (PS3.4 C.4.2.2.1, C.4.3.2.1): the unique key of the retrieve level is a single
value or a list of UIDs, the unique keys above it single values; a wildcard or universal value
there, or any other key with a value, is refused with 0xA900. Every request is audited (caller,
host, level, the names of the keys that carried a value, never their values; matches or
sub-operations; the status).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.presentation import PresentationContext

from dicom_ai import transfer_syntaxes
from dicom_ai.config import Destination, DicomSettings, QueryRetrieveSettings
from dicom_ai.dimse_status import Status
from dicom_ai.ingest.deflate import DEFAULT_MAX_INFLATED_BYTES, dcmread_bounded
from dicom_ai.network.contexts import (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    VERIFICATION,
)
from dicom_ai.network.handlers import AssociationAudit, host_allowed
from dicom_ai.network.scu import MAX_CONTEXTS, client_ssl_context
from storage import query
from storage.db import Database
from storage.filestore import FileStore

LOGGER = logging.getLogger(__name__)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_DEPTH = {level: i for i, level in enumerate(LEVELS)}
# The unique key of each level (PS3.4 C.6.1.1 / C.6.2.1).
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
               "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
_PATIENT_ROOT = {PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET}

# Return keys answered from the index (beyond the matching keys of storage.query.ATTRIBUTES),
# with the level they belong to.
_RETURN_ONLY = {
    "NumberOfPatientRelatedStudies": "PATIENT",
    "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT",
    "SOPClassesInStudy": "STUDY",
    "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY",
    "NumberOfSeriesRelatedInstances": "SERIES",
}
# Keys that steer the query rather than match.
_CONTROL = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
            "InstanceAvailability"}
# Keys of a retrieve identifier that steer it rather than select (PS3.4 C.4.2.1.4.1).
_RETRIEVE_CONTROL = {"QueryRetrieveLevel", "SpecificCharacterSet", "QueryRetrieveView",
                     "TimezoneOffsetFromUTC"}
# At most this many key names per audit row (a hostile identifier may hold thousands).
_AUDIT_KEYS = 32
# Header values of result objects the index does not keep (storage.query module docstring).
_HEADER_TAGS = ["SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate",
                "InstanceNumber"]


class _RefusedError(Exception):
    """The identifier cannot be answered: carries the failure status and a reason.

    The reason names keys, never their values (it is logged and audited).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class _Request:
    level: str
    patient_root: bool
    conditions: dict[str, query.Condition]
    unsupported: bool  # optional keys were asked that we neither match nor return


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _level(identifier: Dataset, sop_class: str) -> tuple[str, bool]:
    """The Query/Retrieve level and whether the model is Patient Root.

    Raises
    ------
    _RefusedError
        0xA900 for a missing or unknown level, or a level outside the model.
    """
    patient_root = sop_class in _PATIENT_ROOT
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise _RefusedError(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                            f"unsupported QueryRetrieveLevel {level[:16]!r}")
    if level == "PATIENT" and not patient_root:
        raise _RefusedError(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                            "PATIENT level is not part of the Study Root model")
    return level, patient_root


def _key_name(elem: Any) -> str:
    return str(elem.keyword or elem.tag)


def _retrieve_conditions(identifier: Dataset, sop_class: str
                         ) -> tuple[str, dict[str, query.Condition]]:
    """The level and unique-key conditions of a C-MOVE/C-GET identifier (PS3.4 C.4.2.2.1).

    The identifier holds the unique key of the retrieve level (a single value, or a list of
    UIDs) and, optionally, those of the levels above it (single values). Selection is by
    identity only, never by pattern, so a wildcard (``PatientID=?*``) cannot retrieve the whole
    store. Other keys of the retrieve level or above (a PatientID in a Study Root retrieve, a
    C-FIND answer copied whole, as some viewers send) are ignored, not matched; a unique key of
    a level below the retrieve level is refused (it would narrow the retrieve, which a
    retrieve at this level cannot do).

    Raises
    ------
    _RefusedError
        0xA900 naming the offending key (never its value).
    """
    level, patient_root = _level(identifier, sop_class)
    depth = _DEPTH[level]
    unique = {UNIQUE_KEYS[lvl] for lvl in LEVELS[:depth + 1] if lvl != "PATIENT" or patient_root}
    below = {UNIQUE_KEYS[lvl] for lvl in LEVELS[depth + 1:]}
    conditions: dict[str, query.Condition] = {}
    for elem in identifier:
        keyword = elem.keyword
        if elem.tag.element == 0 or keyword in _RETRIEVE_CONTROL:
            continue
        text = "" if elem.VR == "SQ" and not elem.value else (
            "sequence" if elem.VR == "SQ" else _text(elem.value).strip(" \x00"))
        if keyword not in unique:
            if text and keyword in below:
                raise _RefusedError(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                                    f"{_key_name(elem)}: a unique key below the level of a "
                                    f"{level} retrieve")
            continue  # not used for selection (a copied C-FIND key, a Study Root PatientID)
        if not text:
            continue  # universal on a key above the level: as if absent; checked below
        if "*" in text or "?" in text:
            raise _RefusedError(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                                f"{keyword}: wildcard in a unique key")
        vr = query.ATTRIBUTES[keyword][1]
        if "\\" in text and (keyword != UNIQUE_KEYS[level] or vr != "ui"):
            raise _RefusedError(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                                f"{keyword}: more than one value (only the UIDs of the "
                                "retrieve level may be a list)")
        condition = query.parse_condition(vr, text)
        if condition is not None:
            conditions[keyword] = condition
    if UNIQUE_KEYS[level] not in conditions:
        raise _RefusedError(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                            f"no {UNIQUE_KEYS[level]} for a {level} retrieve")
    return level, conditions


def _key_names(identifier: Dataset) -> list[str]:
    """The keys that carried a value (what the request matched on), names only, capped."""
    names = []
    for elem in identifier:
        if elem.tag.element == 0 or elem.keyword in _RETRIEVE_CONTROL:
            continue
        if elem.VR == "SQ" and not elem.value:
            continue
        if elem.VR != "SQ" and not _text(elem.value).strip(" \x00"):
            continue
        names.append(_key_name(elem))
    return sorted(names)[:_AUDIT_KEYS]


def _parse(identifier: Dataset, sop_class: str) -> _Request:
    """Check the level against the model and turn the keys into conditions.

    Raises
    ------
    _RefusedError
        0xA900 for a missing or unknown level, a level outside the model, or a malformed value.
    """
    level, patient_root = _level(identifier, sop_class)
    conditions: dict[str, query.Condition] = {}
    unsupported = False
    for elem in identifier:
        keyword = elem.keyword
        if elem.tag.element == 0 or keyword in _CONTROL:
            continue
        known = query.ATTRIBUTES.get(keyword)
        if known is None:
            unsupported = unsupported or keyword not in _RETURN_ONLY
            continue
        if elem.VR == "SQ":
            unsupported = True
            continue
        key_level, vr = known
        if keyword == "ModalitiesInStudy" and level != "STUDY":
            continue  # a study-level aggregate: matched at the study level only
        if _DEPTH[key_level] > _DEPTH[level]:
            continue  # below the query level: nothing to match (answered empty)
        try:
            condition = query.parse_condition(vr, _text(elem.value))
        except query.QueryValueError:
            # The reason is logged and audited: no value (a birth date, a study date) in it.
            raise _RefusedError(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                                f"{keyword}: not a valid {vr.upper()} value") from None
        if condition is not None:
            conditions[keyword] = condition
    return _Request(level, patient_root, conditions, unsupported)


def _header(store: FileStore, path: str) -> Dataset:
    """What the index lacks about a result object, from its file header (empty if unreadable)."""
    try:
        return dcmread(store.absolute(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (OSError, InvalidDicomError, ValueError) as exc:
        LOGGER.warning("cannot read the header of %s: %s", path, exc)
        return Dataset()


def _header_values(ds: Dataset) -> dict[str, Any]:
    return {k: ds.get(k) for k in _HEADER_TAGS if ds.get(k) not in (None, "")}


def _header_matches(values: dict[str, Any], request: _Request) -> bool:
    for keyword in query.HEADER_ONLY_FOR_RESULTS:
        condition = request.conditions.get(keyword)
        if condition is not None and not condition.matches(_text(values.get(keyword))):
            return False
    return True


def _patient_values(p: query.PatientAttributes) -> dict[str, Any]:
    return {"PatientName": p.patient_name, "PatientID": p.patient_id,
            "IssuerOfPatientID": p.issuer_of_patient_id,
            "PatientBirthDate": p.patient_birth_date, "PatientSex": p.patient_sex}


def _study_values(s: query.StudyAttributes) -> dict[str, Any]:
    return {"StudyInstanceUID": s.study_instance_uid, "StudyDate": s.study_date,
            "StudyTime": s.study_time, "AccessionNumber": s.accession_number,
            "StudyID": s.study_id, "StudyDescription": s.study_description,
            "ReferringPhysicianName": s.referring_physician_name}


def _series_values(s: query.SeriesAttributes) -> dict[str, Any]:
    return {"SeriesInstanceUID": s.series_instance_uid, "Modality": s.modality,
            "SeriesNumber": s.series_number, "SeriesDescription": s.series_description,
            "BodyPartExamined": s.body_part_examined, "SeriesDate": s.series_date}


class QueryRetrieveSCP:
    """The C-FIND, C-MOVE and C-GET handlers of the receiver (PS3.4 annex C.4).

    Parameters
    ----------
    store : FileStore
        Where the files are (index paths are relative to its root).
    db : Database
        The index.
    settings : DicomSettings
        Our AE title and TLS material (for C-MOVE destinations with ``tls = true``).
    destinations : sequence of Destination
        The configured ``[[destinations]]``: the only nodes C-MOVE sends to, by AE title.
    audit : AssociationAudit, optional
        Records each request (``query.find``, ``retrieve.move``, ``retrieve.get``): who, from
        where, the level, the names of the keys used, how many matches or sub-operations,
        which studies, the status; never a value of the identifier.
    access : QueryRetrieveSettings, optional
        Who may query and retrieve (``[query_retrieve]``); the default refuses everyone.
    max_inflated_bytes : int
        ``[limits] max_inflated_bytes``: a stored deflated file that inflates to more is not
        sent (a failed sub-operation).
    """

    def __init__(self, store: FileStore, db: Database, settings: DicomSettings,
                 destinations: Sequence[Destination],
                 audit: AssociationAudit | None = None,
                 access: QueryRetrieveSettings | None = None,
                 max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> None:
        self.access = access or QueryRetrieveSettings()
        self._callers = frozenset(a.strip() for a in self.access.allowed_calling_aets)
        self._networks = [ipaddress.ip_network(h, strict=False)
                          for h in self.access.allowed_hosts]
        self.max_inflated_bytes = max_inflated_bytes
        self.store = store
        self.db = db
        self.settings = settings
        self.destinations = {d.ae_title: d for d in destinations}
        self.audit = audit

    def _audit(self, event: evt.Event, action: str, study_uids: Sequence[str],
               **detail: Any) -> None:
        if self.audit is not None:
            try:
                model = ("patient" if str(event.request.AffectedSOPClassUID) in _PATIENT_ROOT
                         else "study")
                if "level" not in detail:
                    with contextlib.suppress(Exception):  # an undecodable identifier: no level
                        detail["level"] = str(event.identifier.get("QueryRetrieveLevel", "")
                                              ).strip().upper()[:8]
                with contextlib.suppress(Exception):  # names only: values are patient data
                    detail["keys"] = _key_names(event.identifier)
                self.audit.operation(event, action, study_uids=study_uids,
                                     detail={"model": model, **detail})
            except Exception:  # auditing never fails a request
                LOGGER.exception("audit of %s failed", action)

    # -- access ------------------------------------------------------------------------------
    def refusal(self, event: evt.Event) -> str | None:
        """Why this association may not query or retrieve (``[query_retrieve]``), or None.

        Parameters
        ----------
        event : pynetdicom.events.Event
            A C-FIND, C-MOVE or C-GET request event.

        Returns
        -------
        str or None
            ``"calling AE title not allowed"`` or ``"host not allowed"``; None if allowed.
        """
        if str(event.assoc.requestor.ae_title).strip() not in self._callers:
            return "calling AE title not allowed"
        if self._networks and not host_allowed(str(event.assoc.requestor.address),
                                                self._networks):
            return "host not allowed"
        return None

    def _refused(self, event: evt.Event, what: str, action: str, reason: str,
                 status: int) -> None:
        """Log and audit a request refused to its caller (status and reason, no identifier)."""
        LOGGER.warning("%s from %s at %s refused (0x%04X): %s for query/retrieve", what,
                       str(event.assoc.requestor.ae_title).strip(),
                       event.assoc.requestor.address, status, reason)
        self._audit(event, action, [], status=f"0x{status:04X}", reason=reason)

    # -- C-FIND ------------------------------------------------------------------------------
    def handle_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND (PS3.4 C.4.1): pending answers, one per match, then success.

        Yields
        ------
        tuple of (int, Dataset or None)
            ``0xFF00`` (``0xFF01`` when optional keys were not supported) with each answer;
            ``0xFE00`` once cancelled; ``0x0124`` for a caller outside ``[query_retrieve]``;
            ``0xA900`` for an identifier the model cannot answer (bad level or value);
            ``0xC000`` when the index cannot be read. Success is sent by pynetdicom when the
            generator ends.
        """
        calling = str(event.assoc.requestor.ae_title).strip()
        refusal = self.refusal(event)
        if refusal is not None:
            self._refused(event, "C-FIND", "query.find", refusal, Status.NOT_AUTHORISED)
            yield Status.NOT_AUTHORISED, None
            return
        try:
            identifier = event.identifier
            request = _parse(identifier, str(event.request.AffectedSOPClassUID))
            answers = self._answers(request, identifier)
        except _RefusedError as exc:
            LOGGER.warning("C-FIND from %s refused (0x%04X): %s", calling, exc.status,
                           exc.reason)
            self._audit(event, "query.find", [], status=f"0x{exc.status:04X}",
                        reason=exc.reason)
            yield exc.status, None
            return
        except Exception as exc:  # the index or a file failed: answer a status, never crash
            LOGGER.error("C-FIND from %s failed: %s", calling, type(exc).__name__)
            self._audit(event, "query.find", [], status=f"0x{Status.UNABLE_TO_PROCESS:04X}")
            yield Status.UNABLE_TO_PROCESS, None
            return
        LOGGER.info("C-FIND %s from %s: %d match(es)", request.level, calling, len(answers))
        self._audit(event, "query.find", [str(a.get("StudyInstanceUID", "")) for a in answers],
                    level=request.level, matches=len(answers), status="0x0000")
        status = Status.PENDING_OPTIONAL_KEYS_UNSUPPORTED if request.unsupported else Status.PENDING
        for answer in answers:
            if event.is_cancelled:
                LOGGER.info("C-FIND from %s cancelled", calling)
                yield Status.CANCEL, None
                return
            yield status, answer

    def _answers(self, request: _Request, identifier: Dataset) -> list[Dataset]:
        """The answer datasets of a C-FIND, in index order."""
        level = request.level
        rows: list[dict[str, Any]] = []
        with self.db.sessions() as session:
            if level == "PATIENT":
                for p in query.find_patients(session, request.conditions):
                    rows.append({**_patient_values(p.patient),
                                 "NumberOfPatientRelatedStudies": p.related_studies,
                                 "NumberOfPatientRelatedSeries": p.related_series,
                                 "NumberOfPatientRelatedInstances": p.related_instances})
            elif level == "STUDY":
                for s in query.find_studies(session, request.conditions):
                    rows.append({**_patient_values(s.patient), **_study_values(s.study),
                                 "ModalitiesInStudy": list(s.modalities),
                                 "SOPClassesInStudy": list(s.sop_classes),
                                 "NumberOfStudyRelatedSeries": s.related_series,
                                 "NumberOfStudyRelatedInstances": s.related_instances})
            elif level == "SERIES":
                series = query.find_series(session, request.conditions)
            else:
                instances = query.find_instances(session, request.conditions)
        if level == "SERIES":
            for se in series:
                values = {**_patient_values(se.patient), **_study_values(se.study),
                          **_series_values(se.series),
                          "NumberOfSeriesRelatedInstances": se.related_instances}
                if se.result:
                    values.update(_header_values(_header(self.store, se.path)))
                    if not _header_matches(values, request):
                        continue
                rows.append(values)
        elif level == "IMAGE":
            for i in instances:
                values = {**_patient_values(i.patient), **_study_values(i.study),
                          **_series_values(i.series), "SOPInstanceUID": i.sop_instance_uid,
                          "SOPClassUID": i.sop_class_uid, "InstanceNumber": i.instance_number}
                if i.result:
                    values.update(_header_values(_header(self.store, i.path)))
                    if not _header_matches(values, request):
                        continue
                rows.append(values)
        return [self._answer(identifier, request, values) for values in rows]

    def _answer(self, identifier: Dataset, request: _Request,
                values: dict[str, Any]) -> Dataset:
        """One answer: every requested key (empty where we have no value), PS3.4 C.4.1.2.2."""
        ds = Dataset()
        depth = _DEPTH[request.level]
        # The unique keys of this level and those above are always returned.
        wanted = {UNIQUE_KEYS[lvl] for lvl in LEVELS[:depth + 1]
                  if lvl != "PATIENT" or request.patient_root}
        for elem in identifier:
            if elem.tag.element == 0 or elem.keyword in ("SpecificCharacterSet",
                                                         "QueryRetrieveLevel"):
                continue
            keyword = elem.keyword
            level = (query.ATTRIBUTES[keyword][0] if keyword in query.ATTRIBUTES
                     else _RETURN_ONLY.get(keyword))
            value = values.get(keyword)
            if keyword == "RetrieveAETitle":
                ds.RetrieveAETitle = self.settings.ae_title
            elif level is not None and _DEPTH[level] <= depth and value not in (None, ""):
                setattr(ds, keyword, value)
            else:
                ds.add_new(elem.tag, elem.VR, [] if elem.VR == "SQ" else None)
        for keyword in wanted:
            if keyword not in ds:
                setattr(ds, keyword, values.get(keyword) or "")
        ds.QueryRetrieveLevel = request.level
        if any(isinstance(v, str) and not v.isascii() for v in values.values()):
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds

    # -- C-MOVE and C-GET --------------------------------------------------------------------
    def _to_retrieve(self, event: evt.Event) -> list[query.InstanceMatch]:
        """The instances a C-MOVE/C-GET identifier names (PS3.4 C.4.2.2.1, C.4.3.2.1).

        Raises
        ------
        _RefusedError
            0xA900 if the level is unknown, its unique key is missing, or a key selects by
            anything but identity (see :func:`_retrieve_conditions`).
        """
        _, conditions = _retrieve_conditions(event.identifier,
                                             str(event.request.AffectedSOPClassUID))
        with self.db.sessions() as session:
            return query.find_instances(session, conditions)

    def _datasets(self, event: evt.Event, matches: list[query.InstanceMatch], what: str
                  ) -> Iterator[tuple[int, Dataset | None]]:
        """Pending statuses with each stored file, honouring C-CANCEL between files."""
        for match in matches:
            if event.is_cancelled:
                LOGGER.info("%s cancelled", what)
                yield Status.CANCEL, None
                return
            ds: Dataset
            path = self.store.absolute(match.path)
            try:
                # A deflated dataset is inflated as a bounded stream, never whole in memory
                # (InflateError, a ValueError, above [limits] max_inflated_bytes or corrupt).
                ds = dcmread_bounded(path, self.max_inflated_bytes, self.store.incoming)
            except (OSError, InvalidDicomError, ValueError) as exc:
                LOGGER.error("%s: cannot read %s: %s", what, match.path, exc)
                # A dataset without file meta has no presentation context: pynetdicom counts
                # the sub-operation as failed and lists its UID in FailedSOPInstanceUIDList.
                ds = Dataset()
                ds.SOPClassUID = match.sop_class_uid
                ds.SOPInstanceUID = match.sop_instance_uid
            yield Status.PENDING, ds

    def _transfer_syntax(self, match: query.InstanceMatch) -> str:
        if match.transfer_syntax_uid:
            return match.transfer_syntax_uid
        try:
            return str(read_file_meta_info(self.store.absolute(match.path)).TransferSyntaxUID)
        except (OSError, InvalidDicomError, AttributeError):
            return ExplicitVRLittleEndian

    def _move_contexts(self, matches: list[query.InstanceMatch]) -> list[PresentationContext]:
        """Contexts for the sub-association: each (SOP class, transfer syntax) stored.

        An uncompressed file may also go in the other uncompressed syntaxes; a compressed one
        only as stored (nothing is transcoded).
        """
        pairs = sorted({(m.sop_class_uid, self._transfer_syntax(m)) for m in matches})
        if len(pairs) > MAX_CONTEXTS:
            LOGGER.warning("C-MOVE needs %d presentation contexts; only %d can be proposed",
                           len(pairs), MAX_CONTEXTS)
        contexts = []
        for sop_class, syntax in pairs[:MAX_CONTEXTS]:
            syntaxes = [syntax] + ([s for s in transfer_syntaxes.NATIVE if s != syntax]
                                   if syntax in transfer_syntaxes.NATIVE else [])
            contexts.append(build_context(sop_class, syntaxes))
        return contexts

    def handle_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE (PS3.4 C.4.2): send the matches to a configured destination.

        Yields
        ------
        Any
            As pynetdicom expects: the destination ``(host, port, kwargs)`` (``(None, None)``:
            0xA801 move destination unknown, for an AE title not among ``[[destinations]]``
            and for a caller outside ``[query_retrieve]``), the number of sub-operations, then
            ``(0xFF00, dataset)`` per instance, or one failure status (0xA900 bad identifier,
            0xC000 index unreadable) or 0xFE00 on cancel. pynetdicom sends the final status
            with the sub-operation counts.
        """
        calling = str(event.assoc.requestor.ae_title).strip()
        refusal = self.refusal(event)
        if refusal is not None:
            # Checked before the destination (a refused caller learns none); any status but
            # 0xA801 would need the sub-association to the destination opened first.
            self._refused(event, "C-MOVE", "retrieve.move", refusal,
                          Status.MOVE_DESTINATION_UNKNOWN)
            yield None, None
            return
        request = cast(C_MOVE, event.request)
        target = str(request.MoveDestination or "").strip()
        destination = self.destinations.get(target)
        if destination is None:
            LOGGER.warning("C-MOVE from %s to unknown destination %r", calling, target[:16])
            self._audit(event, "retrieve.move", [], destination=target[:16],
                        status=f"0x{Status.MOVE_DESTINATION_UNKNOWN:04X}")
            yield None, None
            return
        failure: int | None = None
        reason: dict[str, str] = {}
        matches: list[query.InstanceMatch] = []
        try:
            matches = self._to_retrieve(event)
        except _RefusedError as exc:
            LOGGER.warning("C-MOVE from %s refused (0x%04X): %s", calling, exc.status,
                           exc.reason)
            failure, reason = exc.status, {"reason": exc.reason}
        except Exception as exc:  # the index or a file failed: answer a status, never crash
            LOGGER.error("C-MOVE from %s failed: %s", calling, type(exc).__name__)
            failure = Status.UNABLE_TO_PROCESS
        # With nothing to send (a failure to report), Verification keeps the association valid.
        options: dict[str, Any] = {"contexts": self._move_contexts(matches)
                                   or [build_context(VERIFICATION)]}
        if destination.tls:
            options["tls_args"] = (client_ssl_context(self.settings), destination.host)
        yield destination.host, destination.port, options
        if failure is not None:
            self._audit(event, "retrieve.move", [], destination=target,
                        status=f"0x{failure:04X}", **reason)
            # pynetdicom answers a failure only once a sub-operation is announced.
            yield 1
            yield failure, None
            return
        LOGGER.info("C-MOVE from %s to %s: %d instance(s)", calling, target, len(matches))
        # 0xFF00: accepted, the sub-operations follow (pynetdicom sends the final status).
        self._audit(event, "retrieve.move", [m.study.study_instance_uid for m in matches],
                    destination=target, destination_host=destination.host,
                    suboperations=len(matches), status=f"0x{Status.PENDING:04X}")
        yield len(matches)
        yield from self._datasets(event, matches, f"C-MOVE to {target}")

    def handle_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET (PS3.4 C.4.3): send the matches back on the caller's association.

        The caller must have proposed the SCP role for the storage classes it retrieves; an
        instance without an accepted context counts as a failed sub-operation.

        Yields
        ------
        Any
            The number of sub-operations, then ``(0xFF00, dataset)`` per instance, or one
            failure status (0x0124 caller outside ``[query_retrieve]``, 0xA900 bad identifier,
            0xC000 index unreadable), or 0xFE00 on cancel.
        """
        calling = str(event.assoc.requestor.ae_title).strip()
        refusal = self.refusal(event)
        if refusal is not None:
            self._refused(event, "C-GET", "retrieve.get", refusal, Status.NOT_AUTHORISED)
            # pynetdicom answers a failure only once a sub-operation is announced.
            yield 1
            yield Status.NOT_AUTHORISED, None
            return
        try:
            matches = self._to_retrieve(event)
        except _RefusedError as exc:
            LOGGER.warning("C-GET from %s refused (0x%04X): %s", calling, exc.status,
                           exc.reason)
            self._audit(event, "retrieve.get", [], status=f"0x{exc.status:04X}",
                        reason=exc.reason)
            yield 1
            yield exc.status, None
            return
        except Exception as exc:  # the index or a file failed: answer a status, never crash
            LOGGER.error("C-GET from %s failed: %s", calling, type(exc).__name__)
            self._audit(event, "retrieve.get", [], status=f"0x{Status.UNABLE_TO_PROCESS:04X}")
            yield 1
            yield Status.UNABLE_TO_PROCESS, None
            return
        LOGGER.info("C-GET from %s: %d instance(s)", calling, len(matches))
        self._audit(event, "retrieve.get", [m.study.study_instance_uid for m in matches],
                    suboperations=len(matches), status=f"0x{Status.PENDING:04X}")
        yield len(matches)
        yield from self._datasets(event, matches, f"C-GET from {calling}")
