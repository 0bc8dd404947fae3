"""The file store: UID-validated paths, durable atomic moves, quarantine.

Layout under the store root::

    incoming/<node>/  temporary files being received by one host (same filesystem, so the final
                  move is a rename); each host that shares the root has its own folder
    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    quarantine/<YYYYMMDD>/<uuid>.dcm + <uuid>.json (the reason; never patient data)

Nothing appears under ``instances/`` before it is complete and fsynced: files are written in
``incoming/``, fsynced, renamed into place, and the directory entry is fsynced too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_ai.exceptions import InvalidUIDError, OutOfSpaceError

LOGGER = logging.getLogger(__name__)

# PS3.5 section 9.1: digits and dots, no empty component, at most 64 characters. Components with
# a leading zero break the rule but are common in the field; they cannot escape a path, so they
# are accepted (tolerant when reading) and only logged.
_UID_CHARS = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_STRICT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def validate_uid(uid: object, keyword: str = "UID") -> str:
    """Return `uid` if it is usable as a DICOM UID and a path component.

    Parameters
    ----------
    uid : object
        The value read from a dataset (``None`` or non-str values are refused).
    keyword : str
        The attribute keyword, for the error message.

    Returns
    -------
    str
        The UID.

    Raises
    ------
    InvalidUIDError
        If it is missing, longer than 64 characters, or not dotted decimal digits.
    """
    if not isinstance(uid, str) or not uid:
        raise InvalidUIDError(f"{keyword} is missing")
    if len(uid) > 64:
        raise InvalidUIDError(f"{keyword} is longer than 64 characters ({len(uid)})")
    if not _UID_CHARS.fullmatch(uid):
        raise InvalidUIDError(f"{keyword} {uid[:64]!r} is not valid DICOM UID syntax")
    if not _UID_STRICT.fullmatch(uid):
        LOGGER.warning("%s %s has a component with a leading zero; accepted", keyword, uid)
    return uid


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data and size to stable storage (``fdatasync``).

    Linux flushes the inode from any descriptor; timestamps are not worth a journal write.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


#: A node id names a folder: letters, digits, ``.``, ``_`` and ``-``, 1-100 characters (a host
#: name of up to 64 and a role suffix such as ``.batch``).
_NODE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")


def default_node() -> str:
    """This host's name as a node id (characters a folder name may not hold become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64].lstrip(".")
    return name or "node"


def check_node(node: str) -> str:
    """Return ``node`` if it is a valid node id, else raise ValueError."""
    if not _NODE.match(node):
        raise ValueError(f"node id {node!r}: use 1-100 letters, digits, '.', '_' or '-' "
                         "(not starting with '.')")
    return node


def _remove_files(folder: Path, chosen: Callable[[os.DirEntry[str]], bool]) -> int:
    """Delete the plain files of ``folder`` that ``chosen`` picks; how many went.

    A file that vanished meanwhile (its reception finished) is skipped; one that cannot be
    deleted (e.g. NFS's ``.nfs*`` placeholder of a file still open) is logged and skipped, so a
    start never fails on it.
    """
    removed = 0
    for entry in os.scandir(folder):
        try:
            if entry.is_file(follow_symlinks=False) and chosen(entry):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            LOGGER.warning("cannot remove %s: %s", entry.path, exc.strerror or exc)
    if removed:
        fsync_dir(folder)
    return removed


class FileStore:
    """The instance store under one root folder.

    Parameters
    ----------
    root : Path
        The store root; created with its sub-folders if absent.
    node : str, optional
        This host's id among the hosts sharing the root (``storage.node``; default: the host
        name). Partial receptions go to ``incoming/<node>/``, so a host that starts clears only
        its own.
    """

    def __init__(self, root: Path, *, node: str | None = None) -> None:
        self.root = root.resolve()
        self.node = check_node(node) if node is not None else default_node()
        self.incoming_root = self.root / "incoming"
        self.incoming = self.incoming_root / self.node
        self.instances = self.root / "instances"
        self.quarantine_dir = self.root / "quarantine"
        for folder in (self.root, self.incoming, self.instances, self.quarantine_dir):
            self._ensure_dir(folder)

    # -- paths -------------------------------------------------------------------------------
    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The store-relative path of an instance; every UID is validated first.

        Raises
        ------
        InvalidUIDError
            If any UID is invalid.
        """
        validate_uid(study_uid, "StudyInstanceUID")
        validate_uid(series_uid, "SeriesInstanceUID")
        validate_uid(sop_uid, "SOPInstanceUID")
        return f"instances/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        """The absolute path of a store-relative path."""
        return self.root / relative

    def new_incoming_path(self) -> Path:
        """A fresh temporary path under ``incoming/`` (same filesystem as the store)."""
        return self.incoming / f"{uuid.uuid4().hex}.part"

    # -- durable moves -----------------------------------------------------------------------
    def _ensure_dir(self, folder: Path) -> None:
        """Create `folder` and its parents, fsyncing each parent whose entries changed."""
        if folder.is_dir():
            return
        self._ensure_dir(folder.parent)
        try:
            folder.mkdir()
        except FileExistsError:
            return  # a concurrent receiver made it (and fsyncs the parent itself)
        fsync_dir(folder.parent)

    def commit(
        self,
        source: Path,
        relative: str,
        *,
        synced: bool = False,
        replace: bool = True,
        sync_dir: bool = True,
    ) -> Path:
        """Durably move a received file to its final place.

        The file is fsynced, renamed atomically over any previous file, and the directory entry
        is fsynced, so after this returns the instance survives a crash or power loss.

        Parameters
        ----------
        source : Path
            A complete file on the store's filesystem (normally under ``incoming/``).
        relative : str
            Its store-relative destination from :meth:`relative_path`.
        synced : bool
            The caller already fsynced `source`.
        replace : bool
            Replace an existing file atomically; if False, an existing file is kept and
            :class:`FileExistsError` raised (a no-clobber move: hard link, then unlink).
        sync_dir : bool
            Fsync the directory entry before returning; False leaves that to the caller
            (:func:`fsync_dir` on the returned path's parent), which must do it before relying
            on the move surviving a power loss.

        Returns
        -------
        Path
            The final absolute path.
        """
        final = self.root / relative
        if not synced:
            fsync_file(source)
        self._ensure_dir(final.parent)
        if replace:
            os.replace(source, final)
        else:
            os.link(source, final)  # atomic, and fails if the name exists
            os.unlink(source)
        if sync_dir:
            fsync_dir(final.parent)
        return final

    def remove(self, relative: str) -> None:
        """Delete a stored file (used when a replaced instance moved elsewhere)."""
        path = self.root / relative
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def quarantine(self, source: Path, reason: str, details: dict[str, Any]) -> Path:
        """Move a refused file to ``quarantine/`` with a JSON record of why.

        Parameters
        ----------
        source : Path
            The refused file; it is moved, not copied.
        reason : str
            Why it was refused.
        details : dict
            Extra non-patient context (status, calling AE, request UIDs).

        Returns
        -------
        Path
            The quarantined file.
        """
        now = datetime.now(UTC)
        folder = self.quarantine_dir / now.strftime("%Y%m%d")
        self._ensure_dir(folder)
        name = uuid.uuid4().hex
        target = folder / f"{name}.dcm"
        record = {"reason": reason, "quarantined_at": now.isoformat(), **details}
        sidecar = folder / f"{name}.json"
        tmp = folder / f".{name}.json.tmp"
        try:
            tmp.write_text(json.dumps(record, indent=2, default=str))
            fsync_file(tmp)
            if source.exists():
                fsync_file(source)
                try:
                    os.replace(source, target)
                except OSError:  # another filesystem: copy then delete
                    shutil.copyfile(source, target)
                    source.unlink()
            else:
                target.touch()
            os.replace(tmp, sidecar)
        except OSError:
            # A full disk (ENOSPC) must not leave a partial record or copy behind; the source
            # stays where it was (the receiver's incoming file is deleted after the answer).
            tmp.unlink(missing_ok=True)
            if source.exists():
                target.unlink(missing_ok=True)
            raise
        fsync_dir(folder)
        return target

    # -- space and housekeeping --------------------------------------------------------------
    def free_bytes(self) -> int:
        """Bytes available to this process on the store's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self, min_free_bytes: int) -> None:
        """Raise :class:`OutOfSpaceError` if free space is below `min_free_bytes`."""
        free = self.free_bytes()
        if free < min_free_bytes:
            raise OutOfSpaceError(
                f"store {self.root} has {free} bytes free, below min_free_bytes={min_free_bytes}"
            )

    def clear_incoming(self) -> int:
        """Delete this node's leftovers of receptions that never completed (never acknowledged).

        Only ``incoming/<node>/``: other hosts sharing the root may be receiving right now.

        Returns
        -------
        int
            How many files were removed.
        """
        return _remove_files(self.incoming, lambda entry: True)

    def sweep_stale_incoming(self, max_age: float) -> int:
        """Delete other nodes' partial files untouched for ``max_age`` seconds.

        A reception in progress writes to its file with every PDU, so a file this old belongs to
        a host that died or was replaced (a new pod name) and was never acknowledged. Files left
        directly in ``incoming/`` by versions before per-node folders are swept the same way.
        The folders themselves stay: a live but idle host needs its own.

        Parameters
        ----------
        max_age : float
            Seconds since the last modification.

        Returns
        -------
        int
            How many files were removed.
        """
        cutoff = time.time() - max_age
        folders = [self.incoming_root] + [
            Path(e.path) for e in os.scandir(self.incoming_root)
            if e.is_dir(follow_symlinks=False) and e.name != self.node]
        return sum(_remove_files(folder, lambda entry: entry.stat().st_mtime < cutoff)
                   for folder in folders)

    def iter_relative_paths(self) -> Iterator[str]:
        """Yield the store-relative path of every stored instance file."""
        for study in os.scandir(self.instances):
            if not study.is_dir():
                continue
            for series in os.scandir(study.path):
                if not series.is_dir():
                    continue
                for item in os.scandir(series.path):
                    if item.name.endswith(".dcm") and item.is_file():
                        yield f"instances/{study.name}/{series.name}/{item.name}"
