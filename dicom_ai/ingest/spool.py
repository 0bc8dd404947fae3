"""Durable acceptance of one received instance: check, move into place, index, then answer.

The order is what makes an acknowledgement safe: the C-STORE success status is returned only
after (1) the file is fsynced and atomically renamed into ``instances/`` with its directory
fsynced, and (2) its index row is committed. A crash between (1) and (2) leaves a complete file
without a row, which :mod:`dicom_ai.ingest.recovery` indexes on the next start; the sender saw no
success, re-sends, and the duplicate policy makes that harmless.

Our own results coming back (a PACS auto-forwarding a study with our SR and heat-map SC, a
batch retrieving a study we processed) are recognised here (design convention 14): by their
SOP Instance UID among the result objects we created, and for objects of an earlier database by
our Manufacturer (0008,0070). Only instances of the storage classes we write (SR, SEG,
Secondary Capture) are looked at, so images cost nothing extra. Such an instance is indexed
without re-opening its study (``[storage] own_results = "store"``) or answered success and not
kept (``"drop"``); either way nothing routes it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicom_ai.config import LimitsSettings, StorageSettings
from dicom_ai.dimse_status import Status
from dicom_ai.exceptions import IngestError, OutOfSpaceError, safe_message
from dicom_ai.ingest.index import parse_received
from dicom_ai.ingest.scan import NeedsFullParse, Truncated, scan
from storage import repository
from storage.db import Database
from storage.filestore import FileStore, fsync_dir, fsync_file

LOGGER = logging.getLogger(__name__)
RECONCILE_MARKER = "RECONCILE_NEEDED"
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

#: Manufacturer (0008,0070) of every object dicom-ai writes (``dicom_ai.reporting.sr``'s
#: MANUFACTURER; a unit test holds them equal: the receiver does not import highdicom).
OWN_MANUFACTURER = "dicom-ai"
_MANUFACTURER_TAG = frozenset({0x00080070})
_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."


def _is_result_class(sop_class_uid: str) -> bool:
    """A storage class dicom-ai writes results in (PS3.4 B.5): an SR (``...1.1.88.x``), a
    Segmentation (``...1.1.66.4``) or a Secondary Capture (``...1.1.7``, ``...1.1.7.x``)."""
    if not sop_class_uid.startswith(_STORAGE_ROOT):
        return False
    rest = sop_class_uid[len(_STORAGE_ROOT):]
    return rest.startswith(("88.", "7.")) or rest in ("7", "66.4")


def manufacturer(path: Path) -> str:
    """Manufacturer (0008,0070) of a received file ("" when absent or unreadable).

    The structural scan reads it for little-endian files; other files (already checked and, if
    deflated, bounded by :func:`~dicom_ai.ingest.index.parse_received`) go through pydicom.
    """
    try:
        return _clean(scan(path, _MANUFACTURER_TAG).text(0x00080070))
    except (NeedsFullParse, Truncated, OSError):
        pass
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer"])
        return _clean(str(ds.get("Manufacturer", "") or ""))
    except Exception:  # unreadable here: not recognisable by its marks
        return ""


def _clean(value: str) -> str:
    return value.strip(" \x00")


@dataclass(frozen=True)
class Received:
    """A file a receiver wrote, and what the C-STORE request said about it."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    calling_ae_title: str


def _settle(flushed: Future[None]) -> None:
    """Wait for a background fsync whose outcome no longer matters (the file is dropped)."""
    with contextlib.suppress(OSError):
        flushed.result()


def _log_duplicate(received: Received) -> None:
    LOGGER.info("duplicate %s from %s: kept the first copy", received.sop_instance_uid,
                received.calling_ae_title)


def request_reconcile(store: FileStore) -> None:
    """Ask the next start to reconcile store and index (an unindexed file may exist)."""
    try:
        (store.root / RECONCILE_MARKER).touch()
    except OSError:
        LOGGER.exception("cannot write %s", RECONCILE_MARKER)


def quarantine_file(
    store: FileStore,
    db: Database,
    path: Path,
    *,
    status: int,
    reason: str,
    calling_ae_title: str = "",
    sop_instance_uid: str = "",
    details: dict[str, str] | None = None,
) -> None:
    """Move a refused file to the quarantine folder and record it in the index.

    The JSON sidecar is written with the file, so the reason survives even when the index
    cannot be written. Never raises: refusing must not fail.
    """
    record = {"status": f"0x{status:04X}", "calling_ae_title": calling_ae_title,
              "affected_sop_instance_uid": sop_instance_uid, **(details or {})}
    try:
        target = store.quarantine(path, reason, record)
        with db.write_session() as session:
            repository.add_quarantine(
                session,
                path=str(target.relative_to(store.root)),
                reason=reason,
                status=status,
                calling_ae_title=calling_ae_title,
                sop_instance_uid=sop_instance_uid,
                now=datetime.now(UTC),
            )
    except Exception:
        LOGGER.exception("cannot record quarantine of %s", sop_instance_uid or path.name)


class Ingestor:
    """Accepts received files into the store and the index.

    Parameters
    ----------
    store : FileStore
        The file store.
    db : Database
        The index database.
    settings : StorageSettings
        ``min_free_bytes`` and the duplicate policy.
    limits : LimitsSettings, optional
        ``max_inflated_bytes``: a deflated dataset inflating to more is refused (0xC000) and
        quarantined; default: the ``[limits]`` defaults.
    """

    def __init__(
        self, store: FileStore, db: Database, settings: StorageSettings,
        limits: LimitsSettings | None = None,
    ) -> None:
        self.store = store
        self.db = db
        self.min_free_bytes = settings.min_free_bytes
        self.replace_duplicates = settings.duplicates == "replace"
        self.drop_own_results = settings.own_results == "drop"
        self.max_inflated_bytes = (limits or LimitsSettings()).max_inflated_bytes
        self._io = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fsync")

    def ingest(self, received: Received) -> int:
        """Accept one received file, or refuse it with a DIMSE status.

        Parameters
        ----------
        received : Received
            The file (on the store's filesystem) and its request.

        Returns
        -------
        int
            ``0x0000`` once the instance is durable and indexed (or a kept duplicate, or
            one of our own results dropped by ``own_results = "drop"``);
            ``0xA700`` when out of space or the index is unavailable (retryable);
            ``0xA900``/``0xC000`` when the instance is refused and quarantined (``0xC000``
            also for a deflated dataset that is corrupt or inflates beyond
            ``max_inflated_bytes``).
        """
        try:
            self.store.check_space(self.min_free_bytes)
        except OutOfSpaceError as exc:
            LOGGER.error("refusing %s from %s: %s", received.sop_instance_uid,
                         received.calling_ae_title, exc)
            received.path.unlink(missing_ok=True)
            return Status.OUT_OF_RESOURCES
        # The file's fsync (I/O, GIL released) overlaps the header parse (CPU).
        flushed = self._io.submit(fsync_file, received.path)
        try:
            record = parse_received(
                received.path,
                sop_class_uid=received.sop_class_uid,
                sop_instance_uid=received.sop_instance_uid,
                max_inflated_bytes=self.max_inflated_bytes,
            )
            relative = self.store.relative_path(
                record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid
            )
        except IngestError as exc:
            _settle(flushed)
            self._quarantine(received, exc.status, exc.reason)
            return exc.status
        except Exception as exc:  # anything unforeseen in parsing: refuse and keep the file
            LOGGER.exception("unexpected error reading %s", received.sop_instance_uid)
            _settle(flushed)
            self._quarantine(received, Status.CANNOT_UNDERSTAND,
                             f"unexpected error: {safe_message(exc)}")
            return Status.CANNOT_UNDERSTAND
        try:
            own = self.is_own_result(received.path, record)
        except Exception:
            LOGGER.exception("index unavailable while checking %s", record.sop_instance_uid)
            _settle(flushed)
            received.path.unlink(missing_ok=True)
            return Status.OUT_OF_RESOURCES
        if own and self.drop_own_results:
            _settle(flushed)
            received.path.unlink(missing_ok=True)
            LOGGER.info("own result %s from %s dropped (own_results = drop)",
                        record.sop_instance_uid, received.calling_ae_title)
            return Status.SUCCESS
        if own:
            LOGGER.info("own result %s from %s: stored, not routed", record.sop_instance_uid,
                        received.calling_ae_title)
        return self._store(received, record, relative, flushed, own=own)

    def is_own_result(self, path: Path, record: repository.InstanceRecord) -> bool:
        """Whether a received instance is one of our own results (design convention 14).

        Parameters
        ----------
        path : Path
            The received file (read only for its Manufacturer, and only when its SOP Instance
            UID is not among our result objects).
        record : InstanceRecord
            Its parsed index fields.

        Returns
        -------
        bool
            True for an SR, SEG or Secondary Capture (PS3.4 B.5) whose SOP Instance UID is one
            of our result objects, or whose Manufacturer (0008,0070) is ours (an object of an
            earlier database); False for everything else, without a lookup.
        """
        if not _is_result_class(record.sop_class_uid):
            return False
        with self.db.sessions() as session:
            if repository.is_result_object(session, record.sop_instance_uid):
                return True
        return manufacturer(path) == OWN_MANUFACTURER

    def _store(
        self,
        received: Received,
        record: repository.InstanceRecord,
        relative: str,
        flushed: Future[None],
        *,
        own: bool = False,
    ) -> int:
        sop_uid = record.sop_instance_uid
        try:
            flushed.result()
            size = os.path.getsize(received.path)
            try:
                final = self.store.commit(received.path, relative, synced=True,
                                          replace=self.replace_duplicates, sync_dir=False)
            except FileExistsError:
                # Keep-first and a file already at this path: the indexed first copy, a
                # concurrent receiver's copy (its row follows), or a crash left it unindexed.
                if self._known_path(sop_uid) is not None:
                    received.path.unlink(missing_ok=True)
                    _log_duplicate(received)
                    return Status.SUCCESS
                final = self.store.commit(received.path, relative, synced=True, replace=True,
                                          sync_dir=False)
        except OSError as exc:
            # A full disk or quota (ENOSPC, EDQUOT: the fsync, a new folder, the rename) is an
            # operating condition, answered "retry later"; other errors are faults.
            LOGGER.log(logging.WARNING if exc.errno in _NO_SPACE else logging.ERROR,
                       "cannot store %s: %s; received file removed, answered 0x%04X",
                       sop_uid, exc, Status.OUT_OF_RESOURCES)
            received.path.unlink(missing_ok=True)
            return Status.OUT_OF_RESOURCES
        except Exception:
            LOGGER.exception("index unavailable while storing %s", sop_uid)
            received.path.unlink(missing_ok=True)
            return Status.OUT_OF_RESOURCES
        # The file is in place (and its data durable); its directory entry is flushed while the
        # index row is written, and the answer waits for both.
        dir_synced = self._io.submit(fsync_dir, final.parent)
        try:
            result = self._index(received, record, relative, size, self.replace_duplicates,
                                 own)
            if (result.outcome is repository.IndexOutcome.DUPLICATE_KEPT
                    and result.kept_path is not None
                    and not self.store.absolute(result.kept_path).exists()):
                # The first copy's file vanished (removed by hand): this copy takes its place,
                # so a re-send always leaves the instance stored.
                result = self._index(received, record, relative, size, True, own)
        except Exception:
            # The file is durable but unindexed: ask the next start to reconcile. The sender
            # sees a retryable failure and re-sends, which the duplicate policy absorbs.
            LOGGER.exception("cannot index %s (file kept at %s)", sop_uid, final)
            _settle(dir_synced)
            request_reconcile(self.store)
            return Status.OUT_OF_RESOURCES
        try:
            dir_synced.result()
        except OSError as exc:
            LOGGER.error("cannot flush the directory of %s: %s", sop_uid, exc)
            request_reconcile(self.store)
            return Status.OUT_OF_RESOURCES
        if result.obsolete_path:
            self.store.remove(result.obsolete_path)
        if result.outcome is repository.IndexOutcome.DUPLICATE_KEPT:
            _log_duplicate(received)
        else:
            LOGGER.debug("stored %s (%s) from %s", sop_uid, result.outcome.value,
                         received.calling_ae_title)
        return Status.SUCCESS

    def _index(
        self,
        received: Received,
        record: repository.InstanceRecord,
        relative: str,
        size: int,
        replace: bool,
        own: bool = False,
    ) -> repository.IndexResult:
        # The bare DBAPI path: the session machinery cost more than the statements themselves.
        with self.db.raw_write() as transaction:
            return repository.index_instance(
                transaction,
                record,
                path=relative,
                size_bytes=size,
                calling_ae_title=received.calling_ae_title,
                now=datetime.now(UTC),
                replace=replace,
                own=own,
            )

    def _known_path(self, sop_instance_uid: str) -> str | None:
        with self.db.sessions() as session:
            return repository.find_instance_path(session, sop_instance_uid)

    def _quarantine(self, received: Received, status: int, reason: str) -> None:
        LOGGER.warning("refused %s from %s with 0x%04X: %s", received.sop_instance_uid,
                       received.calling_ae_title, status, reason)
        quarantine_file(
            self.store, self.db, received.path, status=status, reason=reason,
            calling_ae_title=received.calling_ae_title,
            sop_instance_uid=received.sop_instance_uid,
            details={"affected_sop_class_uid": received.sop_class_uid},
        )
