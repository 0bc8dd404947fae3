"""Sending results back: the outbox, drained by C-STORE with durable retries and backoff.

Every result object has one outbox row per destination, written in the same transaction that
completed its job. :class:`OutboxSender` claims due rows (a short lease, so several serve
processes never send the same row at once), sends each destination's files on one
association, and marks each row sent or schedules the next attempt
(``retry_initial_seconds`` doubling up to ``retry_max_seconds``). A row is never given up: a
destination down for hours receives everything once it is back, and a restart in between loses
nothing because the rows, not memory, hold the work.

The claim lasts ``delivery.claim_seconds`` for other serve processes; the sender records what
it holds in ``state/<node>.outbox-claims.json`` under the store root, so the next start of the
same node releases a killed predecessor's claims at once (:func:`release_previous_claims`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dicom_ai.audit import Auditor, entry
from dicom_ai.config import Settings
from dicom_ai.network.scu import FileToSend, Peer, inspect, send_files
from storage import jobs
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
        released = jobs.release_outbox_claims(session, ids, lease=lease)
    path.unlink(missing_ok=True)
    return released


def retry_delay(attempts: int, initial: float, maximum: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones (exponential, capped)."""
    return float(min(maximum, initial * 2 ** max(0, attempts - 1)))


class OutboxSender:
    """Drains the outbox on a polling thread.

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
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._claims = claims_file(settings)

    def _record_claims(self, claimed: list[jobs.Delivery], lease: datetime) -> None:
        """Write what we hold (after the claim committed) for the next start of this node."""
        try:
            self._claims.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._claims.with_suffix(".tmp")
            temporary.write_text(json.dumps(
                {"ids": [item.outbox_id for item in claimed], "lease": lease.isoformat()}))
            os.replace(temporary, self._claims)  # never a torn file; no fsync: a hint only
        except OSError:  # e.g. a full disk: the claims then expire after claim_seconds
            LOGGER.warning("cannot record outbox claims in %s", self._claims, exc_info=True)

    def wake(self, *_: object) -> None:
        """Send now rather than at the next poll."""
        self._wake.set()

    def send_due(self, now: datetime | None = None) -> int:
        """Send every due row once; returns how many were delivered."""
        now = now or datetime.now(UTC)
        claim_seconds = self.settings.delivery.claim_seconds
        with self.db.write_session() as session:
            claimed = jobs.claim_outbox(session, now=now, lease_seconds=claim_seconds)
        if not claimed:
            return 0
        # The expiry claim_outbox wrote: it identifies this claim for release_previous_claims.
        self._record_claims(claimed, now + timedelta(seconds=claim_seconds))
        try:
            return self._deliver(claimed)
        finally:
            self._claims.unlink(missing_ok=True)

    def _deliver(self, claimed: list[jobs.Delivery]) -> int:
        """Send claimed rows per destination and record each outcome."""
        by_destination: dict[str, list[jobs.Delivery]] = defaultdict(list)
        for item in claimed:
            by_destination[item.destination].append(item)
        delivered = 0
        peers = {d.name: Peer(d.ae_title, d.host, d.port, d.tls)
                 for d in self.settings.destinations}
        policy = self.settings.delivery
        for name, items in by_destination.items():
            outcome: dict[int, tuple[bool, str]] = {}
            peer = peers.get(name)
            if peer is None:
                outcome = {i.outbox_id: (False, f"destination {name!r} is not configured")
                           for i in items}
            else:
                outcome = self._send(peer, items)
            with self.db.write_session() as session:
                for item in items:
                    ok, detail = outcome[item.outbox_id]
                    if ok:
                        jobs.mark_sent(session, item.outbox_id, now=datetime.now(UTC),
                                       detail=detail)
                        delivered += 1
                    else:
                        delay = retry_delay(item.attempts, policy.retry_initial_seconds,
                                            policy.retry_max_seconds)
                        jobs.mark_retry(session, item.outbox_id, now=datetime.now(UTC),
                                        error=detail, delay_seconds=delay)
            failed = sum(1 for ok, _ in outcome.values() if not ok)
            if failed:
                first = next(d for ok, d in outcome.values() if not ok)
                LOGGER.warning("%d of %d result(s) not delivered to %s; retrying: %s", failed,
                               len(items), name, first)
            else:
                LOGGER.info("delivered %d result(s) to %s", len(items), name)
            self._audit(name, peer, items, outcome)
        return delivered

    def _audit(self, name: str, peer: Peer | None, items: list[jobs.Delivery],
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

    def _send(self, peer: Peer, items: list[jobs.Delivery]) -> dict[int, tuple[bool, str]]:
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
        if files:
            report = send_files(files, peer, self.settings.dicom)
            failures = dict(report.failures)
            for path_text, outbox_id in by_path.items():
                if path_text in failures:
                    outcome[outbox_id] = (False, failures[path_text])
                else:
                    outcome[outbox_id] = (True, "")
        return outcome

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.delivery.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.send_due()
            except Exception:  # the database may be briefly unavailable: next poll retries
                LOGGER.exception("outbox run failed; retrying")

    def start(self) -> None:
        """Poll every ``delivery.poll_seconds`` in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (a send in progress finishes first)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

