"""DIMSE event handlers of the receiver.

Handlers stay thin: the C-STORE handler hands the received file to the
:class:`~dicom_ai.ingest.spool.Ingestor` and returns its status; nothing else happens on the
association thread. Logs carry UIDs, AE titles and addresses, never patient data.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_STORE, N_CREATE, N_EVENT_REPORT, N_SET

from dicom_ai.audit import AuditEntry, Auditor, entry
from dicom_ai.config import Destination
from dicom_ai.dimse_status import Status
from dicom_ai.ingest.completion import MppsService
from dicom_ai.ingest.spool import Ingestor, Received
from dicom_ai.network.contexts import (
    MODALITY_PERFORMED_PROCEDURE_STEP,
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
)
from dicom_ai.network.counters import ReceiverCounters, context_refusal_reason
from dicom_ai.network.scu import CommitmentReport, parse_commitment_report
from storage import audit as audit_rows
from storage import outbox as outbox_rows
from storage.db import Database

LOGGER = logging.getLogger(__name__)


# A-ASSOCIATE-RJ: rejected-permanent (1), service-user (1), calling AE title not recognised (3).
_REJECT_PERMANENT, _SERVICE_USER, _CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03
# Rejected-transient (2), service-provider presentation (3), local limit exceeded (2).
_REJECT_TRANSIENT, _SERVICE_PROVIDER_PRESENTATION, _LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02


def _calling_ae(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def handle_echo(event: evt.Event) -> int:
    """C-ECHO (PS3.7 9.1.5): always success."""
    return Status.SUCCESS


def handle_store(event: evt.Event, ingestor: Ingestor,
                 audit: AssociationAudit | None = None,
                 counters: ReceiverCounters | None = None) -> int:
    """C-STORE (PS3.4 B.2.2): durably accept the received file or refuse it.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The EVT_C_STORE event (chunked receive: the dataset is already a file on disk).
    ingestor : Ingestor
        Moves the file into the store and indexes it.
    audit : AssociationAudit, optional
        Counts the store for the association's audit rows (in memory only).
    counters : ReceiverCounters, optional
        Counts the answer and, on success, the bytes received (for ``/metrics``).

    Returns
    -------
    int
        The DIMSE status to answer.
    """
    request = cast(C_STORE, event.request)
    try:
        path = Path(event.dataset_path)
    except AttributeError:
        LOGGER.error("chunked receive is off: cannot store without a dataset file")
        return Status.CANNOT_UNDERSTAND
    sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
    try:  # before ingest moves the file
        size = path.stat().st_size if counters is not None else 0
    except OSError:
        size = 0
    status = ingestor.ingest(
        Received(
            path=path,
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=sop_instance_uid,
            calling_ae_title=_calling_ae(event),
        )
    )
    if audit is not None:
        audit.stored(event, sop_instance_uid, status)
    if counters is not None:
        counters.store(status, size)
    return status


def host_allowed(address: str, networks: Sequence[ipaddress.IPv4Network
                                                   | ipaddress.IPv6Network]) -> bool:
    """True if `address` is in one of `networks` (an IPv4-mapped IPv6 address as IPv4: on a
    dual-stack listener, ``host = "::"``, IPv4 callers arrive as ``::ffff:a.b.c.d``)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c in n for c in candidates for n in networks)


def handle_requested(event: evt.Event, allowed: list[str],
                     audit: AssociationAudit | None = None,
                     counters: ReceiverCounters | None = None) -> None:
    """Reject associations from hosts outside the allow-list (checked before negotiation).

    Parameters
    ----------
    event : pynetdicom.events.Event
        The EVT_REQUESTED notification.
    allowed : list of str
        IP addresses or networks (CIDR); empty allows every host.
    audit : AssociationAudit, optional
        Records the rejection.
    counters : ReceiverCounters, optional
        Counts it.
    """
    if not allowed:
        return
    address = str(event.assoc.requestor.address)
    if host_allowed(address, [ipaddress.ip_network(n, strict=False) for n in allowed]):
        return
    primitive = event.assoc.requestor.primitive
    calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
    LOGGER.warning("rejected association from %s (%s): host not allowed", address, calling)
    if audit is not None:
        audit.rejected(event, "host not allowed", calling=calling)
    if counters is not None:
        counters.rejection("host not allowed")
    event.assoc.acse.send_reject(_REJECT_PERMANENT, _SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
    # As pynetdicom's own rejections do: stop the association thread so the A-ASSOCIATE-RJ is
    # written before the connection closes (otherwise the caller mostly sees an abort).
    event.assoc.kill()


def handle_accepted(event: evt.Event, audit: AssociationAudit | None = None,
                    counters: ReceiverCounters | None = None) -> None:
    """Log (audit, count) an accepted association (notification; must not raise)."""
    LOGGER.info("association from %s at %s:%s accepted", _calling_ae(event),
                event.assoc.requestor.address, event.assoc.requestor.port)
    if audit is not None:
        audit.accepted(event)
    if counters is not None:
        counters.association("accepted")
    log_refused_contexts(event, counters)


def _printable(uid: object) -> str:
    # A peer's UID is any bytes it sent: never let it forge log lines.
    return "".join(c if c.isprintable() else "?" for c in str(uid)[:64])


# At most this many refused contexts are named in the one log line of an association.
_REFUSED_CONTEXTS_LOGGED = 10


def log_refused_contexts(event: evt.Event, counters: ReceiverCounters | None = None) -> None:
    """Log (one line) and count the presentation contexts refused at negotiation.

    PS3.8 9.3.3.2: each proposed context the association does not accept carries a result
    (0x03 abstract syntax not supported, 0x04 transfer syntaxes not supported). Refused
    contexts leave no other record: the requestor's C-STOREs of that class fail on its side.
    Only SOP class UIDs are logged. Notification: never raises.
    """
    try:
        refused = list(event.assoc.rejected_contexts)
    except Exception:  # a notification handler must not raise
        return
    if not refused:
        return
    if counters is not None:
        for cx in refused:
            counters.context_refused(cx.result)
    named = ", ".join(f"{_printable(cx.abstract_syntax)} ({context_refusal_reason(cx.result)})"
                      for cx in refused[:_REFUSED_CONTEXTS_LOGGED])
    more = len(refused) - _REFUSED_CONTEXTS_LOGGED
    LOGGER.warning("association from %s: %d presentation context(s) refused: %s%s",
                   _calling_ae(event), len(refused), named,
                   f" and {more} more" if more > 0 else "")


def handle_rejected(event: evt.Event, allowed_calling_aets: list[str],
                    audit: AssociationAudit | None = None,
                    counters: ReceiverCounters | None = None) -> None:
    """Log (audit, count) a rejected association (notification; must not raise)."""
    LOGGER.warning("association from %s at %s rejected", _calling_ae(event),
                   event.assoc.requestor.address)
    reason = reject_reason(event, allowed_calling_aets)
    if audit is not None:
        audit.rejected(event, reason)
    if counters is not None:
        counters.rejection(reason)


def reject_reason(event: evt.Event, allowed_calling_aets: list[str]) -> str:
    """Why pynetdicom rejected an association (our allow-list or its limits)."""
    allowed = [a.strip() for a in allowed_calling_aets]
    if allowed and _calling_ae(event) not in allowed:
        return "calling AE title not allowed"
    return "limit or called AE title"


def handle_released(event: evt.Event, audit: AssociationAudit | None = None,
                    counters: ReceiverCounters | None = None) -> None:
    """Log (audit, count) a released association (notification; must not raise)."""
    LOGGER.info("association from %s released", _calling_ae(event))
    if audit is not None:
        audit.ended(event, "released")
    if counters is not None:
        counters.association("released")


def handle_aborted(event: evt.Event, audit: AssociationAudit | None = None,
                   counters: ReceiverCounters | None = None) -> None:
    """Log (audit, count) an aborted association (notification; must not raise)."""
    LOGGER.warning("association from %s aborted", _calling_ae(event))
    if audit is not None:
        audit.ended(event, "aborted")
    if counters is not None:
        counters.association("aborted")


def handle_n_create(event: evt.Event, mpps: MppsService) -> tuple[int, Dataset | None]:
    """N-CREATE of a Modality Performed Procedure Step (PS3.4 F.7.2.1)."""
    request = cast(N_CREATE, event.request)
    if request.AffectedSOPClassUID != MODALITY_PERFORMED_PROCEDURE_STEP:
        return Status.NO_SUCH_SOP_CLASS, None
    sop_uid = request.AffectedSOPInstanceUID
    if not sop_uid:  # the SCU may leave the UID to the SCP; we require it to track the step
        return Status.PROCESSING_FAILURE, None
    ds = event.attribute_list
    status = mpps.create(str(sop_uid), ds)
    return status, (ds if status == Status.SUCCESS else None)


def handle_n_set(event: evt.Event, mpps: MppsService) -> tuple[int, Dataset | None]:
    """N-SET of a Modality Performed Procedure Step (PS3.4 F.7.2.2)."""
    request = cast(N_SET, event.request)
    if request.RequestedSOPClassUID != MODALITY_PERFORMED_PROCEDURE_STEP:
        return Status.NO_SUCH_SOP_CLASS, None
    ds = event.modification_list
    status = mpps.set(str(request.RequestedSOPInstanceUID), ds)
    return status, (ds if status == Status.SUCCESS else None)


# -- audit ------------------------------------------------------------------------------------
# SOP Instance UIDs are resolved to studies in chunks of this many, on the audit writer thread.
_RESOLVE_CHUNK = 1000


@dataclass
class _Tally:
    """What one association did so far (touched only by its own thread, plus the writer)."""

    calling: str
    peer: str
    started: float
    assoc: Any  # the pynetdicom Association (a thread): a dead one's tally is stale
    pending: list[str] = field(default_factory=list)  # stored, not yet resolved to studies
    studies: dict[str, Counter[str]] = field(default_factory=dict)  # writer thread only
    stored: int = 0
    refused: int = 0
    requests: Counter[str] = field(default_factory=Counter)


class AssociationAudit:
    """The receiver's audit rows, per association, kept off the C-STORE path.

    A C-STORE only appends its SOP Instance UID to the association's in-memory tally. The UIDs
    are resolved to studies and series on the audit writer thread (in chunks), and when the
    association ends one ``association.released`` (or ``.aborted``) row and one
    ``instances.stored`` row per study touched (instances and series counted) are written.

    Parameters
    ----------
    auditor : Auditor
        Writes the rows (its background thread).
    db : Database
        The index, to find the studies of stored instances.
    """

    def __init__(self, auditor: Auditor, db: Database) -> None:
        self.auditor = auditor
        self.db = db
        self._tallies: dict[int, _Tally] = {}
        self._lock = threading.Lock()

    def _tally(self, event: evt.Event) -> _Tally | None:
        with self._lock:
            return self._tallies.get(id(event.assoc))

    def _peer(self, event: evt.Event) -> str:
        return str(event.assoc.requestor.address)

    def accepted(self, event: evt.Event) -> None:
        """Start the association's tally and record ``association.accepted``."""
        calling = _calling_ae(event)
        tally = _Tally(calling, self._peer(event), time.monotonic(), event.assoc)
        with self._lock:
            # An association whose thread ended without a release or abort event ends here.
            stale = [key for key, t in self._tallies.items() if not t.assoc.is_alive()]
            ended = [self._tallies.pop(key) for key in stale]
            self._tallies[id(event.assoc)] = tally
        for old in ended:
            self._finish(old, "closed")
        self.auditor.submit([entry("dicom", calling, "association.accepted", peer=tally.peer,
                                   detail={"called": str(event.assoc.acceptor.ae_title)
                                           .strip()})])

    def rejected(self, event: evt.Event, reason: str, *, calling: str | None = None) -> None:
        """Record ``association.rejected`` with its reason."""
        self.auditor.submit([entry("dicom", calling if calling is not None
                                   else _calling_ae(event), "association.rejected",
                                   peer=self._peer(event), detail={"reason": reason})])

    def stored(self, event: evt.Event, sop_instance_uid: str, status: int) -> None:
        """Count one C-STORE (its UID is kept until resolved; nothing is written now)."""
        tally = self._tally(event)
        if tally is None:
            return
        if status != Status.SUCCESS:
            tally.refused += 1
            return
        tally.stored += 1
        tally.pending.append(sop_instance_uid)
        if len(tally.pending) >= _RESOLVE_CHUNK:
            chunk, tally.pending = tally.pending, []
            self.auditor.submit(lambda: self._resolve(tally, chunk))

    def operation(self, event: evt.Event, action: str, *, study_uids: Iterable[str],
                  detail: Mapping[str, Any]) -> None:
        """Record a C-FIND/C-MOVE/C-GET (``query.find``, ``retrieve.move``, ``retrieve.get``).

        The row names the studies answered or retrieved (the identifier itself is never
        recorded: it holds patient names and IDs); the association's closing row counts it.
        """
        tally = self._tally(event)
        if tally is not None:
            tally.requests[action] += 1
        uids = list(dict.fromkeys(u for u in study_uids if u))
        self.auditor.submit([entry(
            "dicom", _calling_ae(event), action, peer=self._peer(event),
            study_instance_uid=uids[0] if len(uids) == 1 else None, uids=uids,
            detail={**detail, "studies": len(uids)})])

    def _resolve(self, tally: _Tally, chunk: list[str]) -> list[AuditEntry]:
        """On the writer thread: add the studies/series of `chunk` to the tally."""
        with self.db.sessions() as session:
            found = audit_rows.studies_of_instances(session, chunk)
        for study, series in found.items():
            tally.studies.setdefault(study, Counter()).update(series)
        return []

    def ended(self, event: evt.Event, how: str) -> None:
        """Record the association's end and what it stored (on the writer thread)."""
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is not None:
            self._finish(tally, how)

    def _finish(self, tally: _Tally, how: str) -> None:
        chunk, tally.pending = tally.pending, []
        seconds = round(time.monotonic() - tally.started, 3)

        def rows() -> list[AuditEntry]:
            try:
                if chunk:
                    self._resolve(tally, chunk)
            except Exception as exc:  # the association's own row is written all the same
                LOGGER.error("audit: cannot find the studies stored by %s: %s", tally.calling,
                             type(exc).__name__)
            resolved = sum(sum(c.values()) for c in tally.studies.values())
            closing = entry("dicom", tally.calling, f"association.{how}", peer=tally.peer,
                            uids=tally.studies, detail={
                                "stored": tally.stored, "refused": tally.refused,
                                "studies": len(tally.studies),
                                "unresolved": tally.stored - resolved,
                                "requests": dict(tally.requests), "seconds": seconds})
            return [closing] + [
                entry("dicom", tally.calling, "instances.stored", peer=tally.peer,
                      study_instance_uid=study, uids=series,
                      detail={"instances": sum(series.values()), "series": len(series)})
                for study, series in tally.studies.items()]

        self.auditor.submit(rows)

    def close(self) -> None:
        """The receiver stops: record the associations still open as ``closed``."""
        with self._lock:
            left = list(self._tallies.values())
            self._tallies.clear()
        for tally in left:
            self._finish(tally, "closed")


# -- Storage Commitment reports ---------------------------------------------------------------
# Answers to an N-EVENT-REPORT we refuse (PS3.7 C.4, PS3.4 J.3.3): Status.UNKNOWN_TRANSACTION
# (no result of ours awaits this Transaction UID), NOT_AUTHORISED (the caller is not the AE the
# transaction's objects were sent to), NO_SUCH_EVENT_TYPE, NO_SUCH_SOP_INSTANCE,
# MISSING_ATTRIBUTE.


class CommitmentReports:
    """Applies Storage Commitment N-EVENT-REPORTs (PS3.4 J.3.3) to the outbox.

    A report counts only for a Transaction UID one of our senders issued (it is in the
    outbox) and only from the AE title of that transaction's destination; anything else is
    answered with a named failure status, logged, and changes nothing. The outcome is written
    to the database, so whichever receiver of a deployment the destination calls can take it.

    Parameters
    ----------
    db : Database
        The index (the outbox).
    destinations : sequence of Destination
        ``[[destinations]]``: the AE title each transaction's report must come from.
    auditor : Auditor
        Writes one ``results.committed`` row per study.
    """

    def __init__(self, db: Database, destinations: Sequence[Destination],
                 auditor: Auditor) -> None:
        self.db = db
        self.ae_titles = {d.name: d.ae_title.strip() for d in destinations}
        self.auditor = auditor

    def apply(self, report: CommitmentReport, *, calling: str, peer: str) -> int:
        """Record `report` from `calling` (AE title) at `peer`; returns the DIMSE status."""
        now = datetime.now(UTC)
        with self.db.write_session() as session:
            found = outbox_rows.transaction(session, report.transaction_uid)
            if found is None:
                LOGGER.warning("storage commitment report from %s (%s) for unknown transaction "
                               "%s refused", _printable(calling), peer,
                               _printable(report.transaction_uid))
                return Status.UNKNOWN_TRANSACTION
            expected = self.ae_titles.get(found.destination)
            if expected is None or calling.strip() != expected:
                LOGGER.warning("storage commitment report for transaction %s came from %s (%s), "
                               "not from destination %s: refused",
                               _printable(report.transaction_uid),
                               _printable(calling), peer, found.destination)
                return Status.NOT_AUTHORISED
            outcome = outbox_rows.record_report(
                session, found, committed=[uid for _, uid in report.committed],
                failed=[(uid, reason) for _, uid, reason in report.failed], now=now)
        LOGGER.info("storage commitment transaction %s from %s: %d committed, %d failed "
                    "(sent again), %d not ours or already reported", report.transaction_uid,
                    found.destination, outcome.committed_count, outcome.failed_count,
                    outcome.unknown)
        studies = dict.fromkeys([*outcome.committed, *outcome.failed])
        self.auditor.submit([
            entry("dicom", calling, "results.committed", peer=peer,
                  study_instance_uid=study or None, uids=outcome.committed.get(study, []),
                  detail={"destination": found.destination, "ae_title": calling,
                          "transaction_uid": report.transaction_uid,
                          "committed": len(outcome.committed.get(study, [])),
                          "failed": len(outcome.failed.get(study, []))})
            for study in studies])
        return Status.SUCCESS


def handle_n_event_report(event: evt.Event,
                          reports: CommitmentReports) -> tuple[int, Dataset | None]:
    """N-EVENT-REPORT of the Storage Commitment Push Model (PS3.4 J.3.3) on a new association.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The EVT_N_EVENT_REPORT event.
    reports : CommitmentReports
        Checks the transaction and the caller, and records the outcome.

    Returns
    -------
    tuple of (int, None)
        Status.SUCCESS, or the named failure status of a refused report.
    """
    request = cast(N_EVENT_REPORT, event.request)
    calling, peer = _calling_ae(event), str(event.assoc.requestor.address)
    if str(request.AffectedSOPClassUID or "") != STORAGE_COMMITMENT_PUSH_MODEL:
        return Status.NO_SUCH_SOP_CLASS, None
    if str(request.AffectedSOPInstanceUID or "") != STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE:
        LOGGER.warning("storage commitment report from %s names SOP instance %s: refused",
                       _printable(calling), _printable(request.AffectedSOPInstanceUID))
        return Status.NO_SUCH_SOP_INSTANCE, None
    try:
        report = parse_commitment_report(int(request.EventTypeID or 0),
                                         event.event_information)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        LOGGER.warning("storage commitment report from %s (%s) refused: %s",
                       _printable(calling), peer, exc)
        return (Status.NO_SUCH_EVENT_TYPE if "event type" in str(exc)
                else Status.MISSING_ATTRIBUTE), None
    return reports.apply(report, calling=calling, peer=peer), None
