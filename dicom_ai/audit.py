"""The audit trail's writer: who (AE title, API key id) did what to which UIDs, and when.

Components record actions through an :class:`Auditor`, which writes append-only rows through
:mod:`storage.audit` and never raises into its caller: a failed write is logged (actions and
counts only) and the action itself goes on. Two ways to record:

* :meth:`Auditor.record` writes now (operator actions, deliveries, retention);
* :meth:`Auditor.submit` hands rows to one background thread that writes whatever is queued in
  one transaction, so a DICOM association never waits for the audit table. The receiver keeps
  an in-memory tally of each association's stores and submits its rows once, when the
  association ends (:class:`dicom_ai.network.handlers.AssociationAudit`).

What is recorded (``action``):

=========================  ========  ===================================================
action                     actor     detail
=========================  ========  ===================================================
association.accepted       dicom     called AE title
association.rejected       dicom     reason (calling AE title, host, limit)
association.released       dicom     stores, other requests, duration; or .aborted
instances.stored           dicom     per study: instances stored, refused, series
query.find                 dicom     level, model, matches, status
retrieve.move/.get         dicom     destination, level, sub-operations, status
results.sent               system    per destination and study: SOP instances sent
job.rerun ... batch.cancel api       the ids acted on (``apikey:<id>`` is the actor)
purge.applied              system    per study or job: instances/bytes or results removed
service.started            system    node, clean shutdown or not, what recovery repaired
receiver.died              system    node, receiver slot, exit code (its queued rows are lost)
=========================  ========  ===================================================

Nothing recorded is patient data: rows carry UIDs, AE titles, hosts, key ids and counts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from dicom_ai.exceptions import safe_message
from storage import audit
from storage.audit import AuditEntry
from storage.db import Database

LOGGER = logging.getLogger(__name__)

__all__ = ["AuditEntry", "Auditor", "entry"]

#: Batches waiting for the background writer beyond this are dropped (the drop is logged).
MAX_PENDING = 10_000
_Item = Sequence[AuditEntry] | Callable[[], Sequence[AuditEntry]]


def entry(actor_kind: str, actor: str, action: str, *, uids: Iterable[str] = (),
          study_instance_uid: str | None = None, peer: str | None = None,
          detail: Mapping[str, Any] | None = None, at: datetime | None = None) -> AuditEntry:
    """Build one audit row dated now (see :class:`storage.audit.AuditEntry`)."""
    return AuditEntry(at=at or datetime.now(UTC), actor_kind=actor_kind, actor=actor,
                      action=action, peer=peer, study_instance_uid=study_instance_uid,
                      uids=tuple(uids), detail=dict(detail or {}))


class Auditor:
    """Writes audit rows; never raises into the caller.

    Parameters
    ----------
    db : Database
        The index database (the ``audit_events`` table).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None

    def record(self, actor_kind: str, actor: str, action: str, *, uids: Iterable[str] = (),
               study_instance_uid: str | None = None, peer: str | None = None,
               detail: Mapping[str, Any] | None = None) -> bool:
        """Write one row now.

        Parameters
        ----------
        actor_kind : str
            ``dicom``, ``api`` or ``system``.
        actor : str
            The calling AE title, ``apikey:<id>``, or the component.
        action : str
            What was done (``job.rerun``, ``results.sent``...).
        uids : iterable of str
            The UIDs acted on (the first 100 are kept).
        study_instance_uid : str, optional
            The study acted on.
        peer : str, optional
            The other side's host.
        detail : mapping, optional
            Counts, ids, statuses; never patient data.

        Returns
        -------
        bool
            False if the row could not be written (the failure is logged, never raised).
        """
        return self.write([entry(actor_kind, actor, action, uids=uids,
                                 study_instance_uid=study_instance_uid, peer=peer,
                                 detail=detail)])

    def write(self, entries: Sequence[AuditEntry]) -> bool:
        """Write rows now, in one transaction; False (logged) if that failed."""
        if not entries:
            return True
        try:
            with self.db.write_session() as session:
                audit.insert_events(session, entries)
        except Exception as exc:  # the audit must never break the action it records
            actions = sorted({e.action for e in entries})
            LOGGER.error("audit: could not record %d event(s) (%s): %s", len(entries),
                         ", ".join(actions), safe_message(exc).splitlines()[0][:200])
            return False
        return True

    def submit(self, entries: Sequence[AuditEntry] | Callable[[], Sequence[AuditEntry]]
               ) -> None:
        """Queue rows for the background writer (returns at once; never raises).

        Parameters
        ----------
        entries : sequence of AuditEntry, or callable
            The rows, or a function the writer thread calls to make them (for work that reads
            the database, such as resolving an association's SOP Instance UIDs to studies).
        """
        if not callable(entries) and not entries:
            return
        with self._lock:
            if self._pending >= MAX_PENDING:
                LOGGER.error("audit: events dropped: the writer is %d batches behind",
                             self._pending)
                return
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="audit-writer",
                                                daemon=True)
                self._thread.start()
        self._queue.put(entries)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # take whatever else is queued: one transaction for all of it
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in items
            batch: list[AuditEntry] = []
            for item in items:
                if item is None:
                    continue
                if callable(item):
                    try:
                        batch.extend(item())
                    except Exception as exc:  # e.g. the index is unreachable
                        LOGGER.error("audit: could not prepare events: %s",
                                     safe_message(exc).splitlines()[0][:200])
                else:
                    batch.extend(item)
            self.write(batch)
            with self._lock:
                self._pending -= sum(1 for item in items if item is not None)
                self._lock.notify_all()
            if stop:
                return

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted row is written (or failed); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the background writer."""
        self.flush(timeout)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        self._thread = None
