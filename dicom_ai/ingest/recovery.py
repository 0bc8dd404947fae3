"""Start-up recovery: make the index agree with the store after any stop, clean or not.

The files are the truth. After a crash:

* ``incoming/<node>/`` may hold partial receptions that were never acknowledged: they are
  deleted (other nodes' partial files only once they are stale: those hosts may be receiving);
* ``instances/`` may hold files renamed into place whose index row was not yet committed
  (never acknowledged, but complete and fsynced): they are indexed;
* rows whose file was removed by hand are deleted.

A clean shutdown leaves a marker file for its node (``CLEAN_SHUTDOWN.<node>``); its presence
at start lets that node's recovery skip the full walk. Several hosts may share one store root
and one database: each clears only its own partial files and trusts only its own marker, and
the reconciliation is safe while other hosts receive (indexing is idempotent, and a row is
deleted only after re-checking that its file is gone).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicom_ai.exceptions import IngestError
from dicom_ai.ingest.deflate import DEFAULT_MAX_INFLATED_BYTES
from dicom_ai.ingest.index import read_stored_record
from dicom_ai.ingest.spool import RECONCILE_MARKER, quarantine_file
from storage import repository
from storage.db import Database
from storage.filestore import FileStore, fsync_dir

LOGGER = logging.getLogger(__name__)
CLEAN_MARKER = "CLEAN_SHUTDOWN"
#: Other nodes' partial files untouched this long are swept at start (an association that
#: sends nothing for ``dicom.network_timeout`` is aborted long before).
STALE_PARTIAL_SECONDS = 3600.0


def clean_marker(store: FileStore) -> Path:
    """This node's clean-shutdown marker, ``<root>/CLEAN_SHUTDOWN.<node>``."""
    return store.root / f"{CLEAN_MARKER}.{store.node}"


@dataclass(frozen=True)
class RecoveryReport:
    """What recovery found and did."""

    clean_shutdown: bool
    partial_files_removed: int
    files_indexed: int
    rows_removed: int
    files_quarantined: int


def mark_clean_shutdown(store: FileStore) -> None:
    """Leave the marker that lets this node's next start skip the full reconciliation."""
    clean_marker(store).write_text(datetime.now(UTC).isoformat())
    fsync_dir(store.root)


def take_clean_marker(store: FileStore) -> bool:
    """Remove this node's clean-shutdown marker; True if it was there.

    The single ``CLEAN_SHUTDOWN`` of versions before per-node markers is removed and not
    trusted (it may be another host's): that start reconciles once.
    """
    legacy = store.root / CLEAN_MARKER
    if legacy.exists():
        legacy.unlink()
    marker = clean_marker(store)
    if not marker.exists():
        return False
    marker.unlink()
    fsync_dir(store.root)
    return True


def clear_incoming(store: FileStore, *, stale_after: float = STALE_PARTIAL_SECONDS) -> int:
    """Delete this node's partial receptions and other nodes' stale ones.

    Call before this node's receivers start.
    """
    removed = store.clear_incoming()
    if removed:
        LOGGER.info("removed %d partial reception(s) from %s", removed, store.incoming)
    swept = store.sweep_stale_incoming(stale_after)
    if swept:
        LOGGER.info("removed %d stale partial reception(s) of other nodes under %s", swept,
                    store.incoming_root)
    return removed + swept


def reconcile(store: FileStore, db: Database, *,
              max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> tuple[int, int, int]:
    """Index stored files without rows, and delete rows without files.

    Safe while receivers run: indexing is idempotent and rows are only written after their file
    is in place. A deflated orphan is inflated as a bounded stream, never whole in memory, and
    quarantined if it inflates beyond `max_inflated_bytes` (``[limits]``) or is corrupt.

    Returns
    -------
    tuple of int
        Files indexed, rows removed, files quarantined (unreadable files found in the store).
    """
    with db.sessions() as session:
        known = repository.indexed_paths(session)
    on_disk = set(store.iter_relative_paths())
    orphans = sorted(on_disk - known)
    indexed = quarantined = 0
    for relative in orphans:
        path = store.absolute(relative)
        try:
            # A deflated file's temporary inflated copy goes to incoming/, never among the
            # instances this walk (or another host's) lists.
            record = read_stored_record(path, max_inflated_bytes=max_inflated_bytes,
                                        workdir=store.incoming)
            expected = store.relative_path(
                record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid
            )
            if expected != relative:
                raise IngestError(0xA900, f"file at {relative} holds {record.sop_instance_uid}")
            with db.write_session() as session:
                result = repository.index_instance(
                    session,
                    record,
                    path=relative,
                    size_bytes=os.path.getsize(path),
                    calling_ae_title="",
                    now=datetime.now(UTC),
                    replace=False,
                )
            if result.outcome is repository.IndexOutcome.DUPLICATE_KEPT:
                if result.kept_path == relative:
                    # A receiver (this host's or another's) indexed this very file after the
                    # snapshot of indexed paths: it is not an orphan, and it stays.
                    continue
                raise IngestError(0x0111, f"a second copy of {record.sop_instance_uid}, which "
                                  "is indexed at another path")
        except IngestError as exc:
            LOGGER.warning("quarantining %s found in the store: 0x%04X %s", relative,
                           exc.status, exc.reason)
            quarantine_file(store, db, path, status=exc.status,
                            reason=f"found in store during recovery: {exc.reason}",
                            details={"store_path": relative})
            quarantined += 1
            continue
        indexed += 1
    missing = known - on_disk
    # Re-check each file right before deleting its row: it may have been stored meanwhile.
    missing = {p for p in missing if not store.absolute(p).exists()}
    with db.write_session() as session:
        removed = repository.delete_instances_by_path(session, sorted(missing))
    return indexed, removed, quarantined


def _withdraw_request(marker: Path, seen: os.stat_result) -> None:
    """Remove the reconcile request this walk answered, unless it was renewed meanwhile.

    A receiver (of any node) touches the marker when it needs a walk; one that does so while
    this walk runs may have stored its file after the walk passed it, so its request stays.
    """
    try:
        now = marker.stat()
    except FileNotFoundError:
        return
    if (now.st_ino, now.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns):
        marker.unlink(missing_ok=True)


def recover(store: FileStore, db: Database, *, force: bool = False,
            max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> RecoveryReport:
    """Run start-up recovery (partial files, then reconciliation unless the last stop was clean).

    Parameters
    ----------
    store : FileStore
        The store.
    db : Database
        The index database.
    force : bool
        Reconcile even after a clean shutdown.
    max_inflated_bytes : int
        ``[limits] max_inflated_bytes``: a deflated file found in the store that inflates to
        more is quarantined (see :func:`reconcile`).

    Returns
    -------
    RecoveryReport
        Counts of what was repaired.
    """
    clean = take_clean_marker(store)
    requested = store.root / RECONCILE_MARKER
    try:  # an index write failed after its file was stored (on any node)
        request = requested.stat()
        force = True
    except FileNotFoundError:
        request = None
    partial = clear_incoming(store)
    indexed = removed = quarantined = 0
    if force or not clean:
        indexed, removed, quarantined = reconcile(store, db,
                                                  max_inflated_bytes=max_inflated_bytes)
    if request is not None:
        _withdraw_request(requested, request)
    report = RecoveryReport(clean, partial, indexed, removed, quarantined)
    if partial or indexed or removed or quarantined:
        LOGGER.warning("recovery: %s", report)
    else:
        LOGGER.info("recovery: store and index agree (clean shutdown: %s)", clean)
    return report
