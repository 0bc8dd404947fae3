"""A disk that fills while a C-STORE is being received (issue 19), on a real small filesystem.

The store lives on its own tmpfs (mounted here, as root; skipped where mounting is not
permitted), a ballast file leaves less room than one CT instance, and dcmtk ``storescu`` sends
that instance: pynetdicom's chunked receive runs out of space half way through writing it. The
SQLite index stays outside the small filesystem, so what is measured is the receive path
alone (an index on a full disk is answered 0xA700 by the ingest code already, see
``Ingestor._store``).
"""

from __future__ import annotations

import errno
import logging
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage

from dicom_ai.config import Settings, StorageSettings
from dicom_ai.dimse_status import Status
from dicom_ai.ingest.spool import Ingestor, Received, quarantine_file
from dicom_ai.network import scp
from dicom_ai.service import Service
from storage.db import Database
from storage.filestore import FileStore
from tests.conftest import need_binary
from tests.integration.test_receive import index_count, port_of, stored_path
from tests.peers import free_bytes, make_ct_series, small_filesystem, storescu

# small_fs comes first in each test's arguments: it is unmounted after the service stopped.
# storescu gives up after these (seconds): the old code hung until then.
SENDER_TIMEOUT = 15
STORE_TIMEOUTS = ["-to", str(SENDER_TIMEOUT), "-ta", str(SENDER_TIMEOUT), "-td",
                  str(SENDER_TIMEOUT)]
FS_BYTES = 8 << 20
FS_INODES = 256


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of FS_BYTES and FS_INODES under tmp_path, unmounted at teardown."""
    with small_filesystem(tmp_path / "small", FS_BYTES, FS_INODES) as mount_point:
        yield mount_point


def store_files(settings: Settings) -> list[Path]:
    """Every file under the store (index and markers aside)."""
    root = settings.storage.root
    return sorted(p for p in root.rglob("*") if p.is_file())


def send(port: int, path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = storescu(port, [path], extra=["-v", *STORE_TIMEOUTS])
    return result, time.monotonic() - started


def fill(small_fs: Path, exhaust: str, leave: int) -> list[Path]:
    """Ballast files that leave `leave` bytes free ("blocks") or no inode ("inodes")."""
    folder = small_fs / "ballast"
    folder.mkdir()
    if exhaust == "blocks":
        ballast = folder / "blocks"
        with ballast.open("wb") as f:
            f.write(b"\0" * (free_bytes(small_fs) - leave))
        return [ballast]
    files: list[Path] = []
    for i in range(FS_INODES + 1):
        try:
            (folder / str(i)).touch()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return files
        files.append(folder / str(i))
    raise AssertionError("inodes never ran out")


@pytest.mark.parametrize("exhaust", ["blocks", "inodes"])
def test_full_disk_during_receive_answers_a700_and_recovers(
    exhaust: str, small_fs: Path, make_settings: Callable[..., Settings],
    start_service: Callable[[Settings], Service], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ENOSPC receiving a dataset: 0xA700 at once, no partial file, then accepted.

    "blocks": the space runs out half way through writing the dataset; "inodes": the file
    cannot even be created (pynetdicom's NamedTemporaryFile fails).
    """
    need_binary("storescu")
    settings = make_settings(storage={"root": small_fs / "store", "min_free_bytes": 0})
    service = start_service(settings)
    port = port_of(service)
    earlier = make_ct_series(tmp_path / "earlier", 3, size=256)
    large = make_ct_series(tmp_path / "large", 1, size=512)[0]  # 512 KB of pixels
    result, _ = send(port, earlier[0])
    assert result.returncode == 0, result.stderr
    result = storescu(port, earlier[1:], extra=STORE_TIMEOUTS)
    assert result.returncode == 0, result.stderr
    assert index_count(settings) == 3
    before = {p: p.read_bytes() for p in store_files(settings)}
    assert len(before) == 3

    # Blocks: room for the request's first fragments, not for the whole instance.
    ballast = fill(small_fs, exhaust, leave=200_000)
    assert free_bytes(small_fs) < large.stat().st_size // 2 or exhaust == "inodes"

    result, seconds = send(port, large)
    output = result.stdout + result.stderr
    assert re.search(r"Refused: OutOfResources|0xa700", output, re.IGNORECASE), output
    assert seconds < 5, f"answered after {seconds:.1f} s"
    # No partial file in incoming/ or the store; what was acknowledged before is intact.
    assert {p: p.read_bytes() for p in store_files(settings)} == before
    assert index_count(settings) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ENOSPC while receiving" in m and "partial file removed" in m
               for m in warnings), warnings

    # The service keeps serving: once space is back, the same instance is accepted.
    for path in ballast:
        path.unlink()
    result, seconds = send(port, large)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Refused" not in result.stdout + result.stderr
    sent = pydicom.dcmread(large)
    assert pydicom.dcmread(stored_path(settings, sent)).PixelData == sent.PixelData
    assert index_count(settings) == 4
    assert not [p for p in (settings.storage.root / "incoming").rglob("*") if p.is_file()]


def test_store_folder_not_creatable_answers_a700_and_leaves_nothing(
    small_fs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """ENOSPC after the file arrived (no inode for its study folder): 0xA700, nothing kept."""
    store = FileStore(small_fs / "store")
    db = Database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    db.upgrade()
    ingestor = Ingestor(store, db, StorageSettings(root=store.root, min_free_bytes=0))
    source = make_ct_series(tmp_path / "ct", 1, size=64)[0]

    def receive() -> Received:
        path = store.new_incoming_path()
        path.write_bytes(source.read_bytes())
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return Received(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), "STORESCU")

    try:
        received = receive()
        ballast = fill(small_fs, "inodes", leave=0)
        assert ingestor.ingest(received) == Status.OUT_OF_RESOURCES
        assert any(r.levelno == logging.WARNING and f"[Errno {errno.ENOSPC}]" in r.getMessage()
                   for r in caplog.records)
        assert not received.path.exists()
        assert not [p for p in store.root.rglob("*") if p.is_file()]
        assert not list(store.instances.iterdir())
        for path in ballast:
            path.unlink()
        assert ingestor.ingest(receive()) == 0
        assert len([p for p in store.instances.rglob("*") if p.is_file()]) == 1
    finally:
        db.dispose()


def test_quarantine_on_a_full_disk_neither_raises_nor_leaves_a_partial_record(
    small_fs: Path, tmp_path: Path,
) -> None:
    """A refused file that cannot be quarantined (ENOSPC): logged, nothing half-written."""
    store = FileStore(small_fs / "store")
    source = store.new_incoming_path()
    source.write_bytes(b"refused" * 1000)
    with (small_fs / "ballast").open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    db = Database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    try:
        quarantine_file(store, db, source, status=0xC000, reason="cannot be parsed",
                        sop_instance_uid="1.2.3")
    finally:
        db.dispose()
    assert source.exists()  # left for the receiver, which deletes it after answering
    assert not [p for p in store.quarantine_dir.rglob("*") if p.is_file()]


def test_spool_file_failure_removes_it_and_drops_the_rest(tmp_path: Path) -> None:
    """EDQUOT as well as ENOSPC: the partial file goes, later fragments are swallowed."""
    path = tmp_path / "partial.dcm"

    class Full:
        def __init__(self) -> None:
            self.handle = path.open("wb")

        def write(self, data: bytes) -> int:
            self.handle.write(data)
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

        def flush(self) -> None:
            self.handle.flush()

        def close(self) -> None:
            self.handle.close()

    spool = scp._SpoolFile(Full(), str(path))
    assert spool.write(b"x" * 10) == 10
    assert spool.error is not None
    assert spool.error.errno == errno.EDQUOT
    assert not path.exists()
    assert spool.write(b"y" * 5) == 5  # the rest of the message is read and dropped
    spool.file.flush()
    spool.close()


def test_spool_guard_matches_upstream() -> None:
    """The pynetdicom functions the guard relies on are the ones it was written for.

    A new pynetdicom that changes how chunked receive writes its file fails here: re-check
    ``scp._SpoolGuardDIMSE`` against it, then update ``scp.SPOOL_GUARD_UPSTREAM``.
    """
    assert scp.upstream_digest(DIMSEMessage.decode_msg) == scp.SPOOL_GUARD_UPSTREAM[
        "decode_msg"]
    assert scp.upstream_digest(DIMSEServiceProvider.receive_primitive) == (
        scp.SPOOL_GUARD_UPSTREAM["receive_primitive"])
