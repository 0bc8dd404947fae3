"""Sending results back: the outbox, drained by C-STORE with durable retries and backoff.

Every result object has one outbox row per destination, written in the same transaction that
completed its job. :class:`OutboxSender` claims due rows (a short lease, so several serve
processes never send the same row at once), sends each destination's files on one
association, and marks each row sent or schedules the next attempt
(``retry_initial_seconds`` doubling up to ``retry_max_seconds``). A row is never given up: a
destination down for hours receives everything once it is back, and a restart in between loses
nothing because the rows, not memory, hold the work.

A destination with ``storage_commitment = true`` must also confirm what it stored (PS3.4
annex J): after an association's C-STOREs the sender records the rows ``sent`` with a new
Transaction UID and requests commitment on that association (:class:`~dicom_ai.network.scu.
Commitment`). The rows count as delivered once the destination's N-EVENT-REPORT (same
association, or a new one to any of our receivers: :class:`~dicom_ai.network.handlers.
CommitmentReports`) says committed; objects reported failed go back to pending at once, and
rows with no report within ``delivery.commitment_timeout_seconds`` are swept back to pending at
each poll (:func:`storage.outbox.expire_commitments`): the same file, the same SOP Instance UID.

The claim lasts ``delivery.claim_seconds`` for other serve processes; the sender records what
it holds in ``state/<node>.outbox-claims.json`` under the store root, so the next start of the
same node releases a killed predecessor's claims at once (:func:`release_previous_claims`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dicom_ai.audit import Auditor, entry
from dicom_ai.config import Settings
from dicom_ai.network.handlers import CommitmentReports
from dicom_ai.network.scu import Commitment, FileToSend, Peer, SendReport, inspect, send_files
from dicom_ai.periodic import PeriodicWorker
from storage import outbox as outbox_rows
from storage.db import Database
from storage.filestore import default_node

LOGGER = logging.getLogger(__name__)

__all__ = ["OutboxSender", "claims_file", "release_previous_claims", "retry_delay"]


def claims_file(settings: Settings) -> Path:
    """Where this node's sender records the outbox rows it holds (one sender per node)."""
    node = settings.storage.node or default_node()
    return settings.storage.root / "state" / f"{node}.outbox-claims.json"


def release_previous_claims(settings: Settings, db: Database) -> int:
    """Release the rows this node's previous sender held when it died; returns how many.

    Called at start, before the sender runs. Only rows whose claim still carries the recorded
    expiry are released (another sender may have claimed them since theirs expired).
    """
    path = claims_file(settings)
    try:
        record = json.loads(path.read_text())
        ids = [int(i) for i in record["ids"]]
        lease = datetime.fromisoformat(record["lease"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError):  # a torn write: the claims then simply expire
        LOGGER.warning("unreadable outbox claims file %s; its claims expire on their own", path)
        path.unlink(missing_ok=True)
        return 0
    with db.write_session() as session:
        released = outbox_rows.release_outbox_claims(session, ids, lease=lease)
    path.unlink(missing_ok=True)
    return released


def retry_delay(attempts: int, initial: float, maximum: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones (exponential, capped)."""
    return float(min(maximum, initial * 2 ** max(0, attempts - 1)))


class OutboxSender(PeriodicWorker):
    """Drains the outbox on a polling thread (every ``delivery.poll_seconds``, and on
    :meth:`wake`; :meth:`stop` lets a send in progress finish first).

    Parameters
    ----------
    settings : Settings
        Destinations, our AE title/TLS material, delivery policy.
    db : Database
        The shared database.
    """

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.store = settings.storage.file_store()
        self.auditor = Auditor(db)
        self._claims = claims_file(settings)
        self.commitment_reports = CommitmentReports(db, settings.destinations, self.auditor)
        # The index may be full or unavailable for a while: keep polling, log the outage once.
        super().__init__("outbox", LOGGER, [("outbox run", self.send_due)],
                         interval=settings.delivery.poll_seconds, join_timeout=60)

    def _record_claims(self, claimed: list[outbox_rows.Delivery], lease: datetime) -> None:
        """Write what we hold (after the claim committed) for the next start of this node."""
        try:
            self._claims.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._claims.with_suffix(".tmp")
            temporary.write_text(json.dumps(
                {"ids": [item.outbox_id for item in claimed], "lease": lease.isoformat()}))
            os.replace(temporary, self._claims)  # never a torn file; no fsync: a hint only
        except OSError:  # e.g. a full disk: the claims then expire after claim_seconds
            LOGGER.warning("cannot record outbox claims in %s", self._claims, exc_info=True)

    def send_due(self, now: datetime | None = None) -> int:
        """Send every due row once; returns how many were delivered."""
        now = now or datetime.now(UTC)
        claim_seconds = self.settings.delivery.claim_seconds
        self.expire_commitments(now)
        with self.db.write_session() as session:
            claimed = outbox_rows.claim_outbox(session, now=now, lease_seconds=claim_seconds)
        if not claimed:
            return 0
        # The expiry claim_outbox wrote: it identifies this claim for release_previous_claims.
        self._record_claims(claimed, now + timedelta(seconds=claim_seconds))
        try:
            return self._deliver(claimed)
        finally:
            self._claims.unlink(missing_ok=True)

    def expire_commitments(self, now: datetime) -> int:
        """Rows sent with commitment requested and no report in time go back to pending."""
        timeout = self.settings.delivery.commitment_timeout_seconds
        with self.db.write_session() as session:
            expired = outbox_rows.expire_commitments(session, now=now, timeout_seconds=timeout)
        if expired:
            LOGGER.warning("%d result(s) had no storage commitment report within %g s; "
                           "sending them again", expired, timeout)
        return expired

    def _deliver(self, claimed: list[outbox_rows.Delivery]) -> int:
        """Send claimed rows per destination and record each outcome."""
        by_destination: dict[str, list[outbox_rows.Delivery]] = defaultdict(list)
        for item in claimed:
            by_destination[item.destination].append(item)
        delivered = 0
        peers = {d.name: Peer(d.ae_title, d.host, d.port, d.tls)
                 for d in self.settings.destinations}
        committing = {d.name for d in self.settings.destinations if d.storage_commitment}
        policy = self.settings.delivery
        for name, items in by_destination.items():
            outcome: dict[int, tuple[bool, str]] = {}
            recorded: set[int] = set()  # rows already marked sent, awaiting commitment
            peer = peers.get(name)
            report: SendReport | None = None
            if peer is None:
                outcome = {i.outbox_id: (False, f"destination {name!r} is not configured")
                           for i in items}
            else:
                outcome, report = self._send(peer, items, commit=name in committing,
                                             recorded=recorded)
            with self.db.write_session() as session:
                for item in items:
                    ok, detail = outcome[item.outbox_id]
                    if item.outbox_id in recorded:
                        delivered += 1
                    elif ok:
                        outbox_rows.mark_sent(session, item.outbox_id, now=datetime.now(UTC),
                                       detail=detail)
                        delivered += 1
                    else:
                        delay = retry_delay(item.attempts, policy.retry_initial_seconds,
                                            policy.retry_max_seconds)
                        outbox_rows.mark_retry(session, item.outbox_id, now=datetime.now(UTC),
                                        error=detail, delay_seconds=delay)
            failed = sum(1 for ok, _ in outcome.values() if not ok)
            if failed:
                first = next(d for ok, d in outcome.values() if not ok)
                LOGGER.warning("%d of %d result(s) not delivered to %s; retrying: %s", failed,
                               len(items), name, first)
            else:
                LOGGER.info("delivered %d result(s) to %s", len(items), name)
            self._audit(name, peer, items, outcome)
            if report is not None and peer is not None:
                self._commitment_outcomes(peer, items, report)
        return delivered

    def _commitment_outcomes(self, peer: Peer, items: list[outbox_rows.Delivery],
                             report: SendReport) -> None:
        """After the send: a failed N-ACTION retries its rows; a same-association report counts."""
        policy = self.settings.delivery
        attempts = max((item.attempts for item in items), default=1)
        for request in report.commitments:
            if request.error is not None:
                delay = retry_delay(attempts, policy.retry_initial_seconds,
                                    policy.retry_max_seconds)
                with self.db.write_session() as session:
                    outbox_rows.abandon_commitment(session, request.transaction_uid,
                                                   now=datetime.now(UTC), error=request.error,
                                                   delay_seconds=delay)
                LOGGER.warning("storage commitment of %d result(s) at %s not requested; "
                               "retrying: %s", len(request.files), peer.ae_title, request.error)
            elif request.report is not None:
                LOGGER.info("storage commitment report for transaction %s came on the same "
                            "association after %.3f s", request.transaction_uid,
                            request.seconds_to_report or 0.0)
                self.commitment_reports.apply(request.report, calling=peer.ae_title,
                                              peer=peer.host)
            else:
                LOGGER.info("storage commitment of %d result(s) requested from %s "
                            "(transaction %s)", len(request.files), peer.ae_title,
                            request.transaction_uid)

    def _audit(self, name: str, peer: Peer | None, items: list[outbox_rows.Delivery],
               outcome: dict[int, tuple[bool, str]]) -> None:
        """One ``results.sent`` row per study whose results reached this destination."""
        sent: dict[str, list[str]] = defaultdict(list)
        failed: dict[str, int] = defaultdict(int)
        for item in items:
            if outcome[item.outbox_id][0]:
                sent[item.study_instance_uid].append(item.sop_instance_uid)
            else:
                failed[item.study_instance_uid] += 1
        self.auditor.write([
            entry("system", "outbox", "results.sent", peer=peer.host if peer else None,
                  study_instance_uid=study or None, uids=sop_uids,
                  detail={"destination": name, "ae_title": peer.ae_title if peer else None,
                          "sop_instances": len(sop_uids), "failed": failed[study]})
            for study, sop_uids in sent.items()])

    def _send(self, peer: Peer, items: list[outbox_rows.Delivery], *, commit: bool = False,
              recorded: set[int] | None = None,
              ) -> tuple[dict[int, tuple[bool, str]], SendReport | None]:
        """C-STORE the rows' files; with `commit`, request Storage Commitment of what each
        association stored (those rows are marked sent, awaiting it, and added to
        `recorded`, before the request goes out)."""
        files: list[FileToSend] = []
        outcome: dict[int, tuple[bool, str]] = {}
        by_path: dict[str, int] = {}
        for item in items:
            path = self.store.absolute(item.path)
            if not path.is_file():  # deleted by hand: nothing to retry
                outcome[item.outbox_id] = (False, f"result file {item.path} is missing")
                continue
            found = inspect(path)
            if found is None:
                outcome[item.outbox_id] = (False, f"result file {item.path} is not DICOM")
                continue
            files.append(found)
            by_path[str(path)] = item.outbox_id
        report: SendReport | None = None
        if files:
            commitment: Commitment | None = None
            if commit:
                def begin(transaction_uid: str, stored: list[FileToSend]) -> None:
                    ids = [by_path[str(f.path)] for f in stored]
                    with self.db.write_session() as session:
                        outbox_rows.await_commitment(session, ids,
                                                     transaction_uid=transaction_uid,
                                                     now=datetime.now(UTC))
                    if recorded is not None:
                        recorded.update(ids)

                commitment = Commitment(begin)
            report = send_files(files, peer, self.settings.dicom, commitment=commitment)
            failures = dict(report.failures)
            for path_text, outbox_id in by_path.items():
                if path_text in failures:
                    outcome[outbox_id] = (False, failures[path_text])
                else:
                    outcome[outbox_id] = (True, "")
        return outcome, report
