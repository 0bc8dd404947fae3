"""Start-up recovery and the file store, on real files and real SQLite/PostgreSQL indexes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_ai.exceptions import InvalidUIDError
from dicom_ai.ingest.index import read_stored_record
from dicom_ai.ingest.recovery import (
    CLEAN_MARKER,
    STALE_PARTIAL_SECONDS,
    clean_marker,
    mark_clean_shutdown,
    recover,
)
from dicom_ai.ingest.spool import RECONCILE_MARKER
from storage import repository
from storage.db import Database
from storage.filestore import FileStore, validate_uid
from storage.studies import list_studies
from tests.peers import REPO, make_ct_series


# -- helpers ----------------------------------------------------------------------------------
@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    """Three small CT instances of one new study, outside the store."""
    return make_ct_series(tmp_path / "src", 3, size=16)


def place(store: FileStore, source: Path) -> str:
    """Copy an instance file to its right place in the store (no index row); its path."""
    record = read_stored_record(source)
    relative = store.relative_path(
        record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid
    )
    target = store.absolute(relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return relative


def index(store: FileStore, db: Database, relative: str) -> None:
    """Index a file already in the store, as the ingestor would."""
    path = store.absolute(relative)
    with db.write_session() as session:
        repository.index_instance(
            session,
            read_stored_record(path),
            path=relative,
            size_bytes=path.stat().st_size,
            calling_ae_title="TEST",
            now=datetime.now(UTC),
            replace=False,
        )


def indexed(db: Database) -> set[str]:
    """The store-relative paths the index knows."""
    with db.sessions() as session:
        return repository.indexed_paths(session)


def quarantined(store: FileStore) -> list[tuple[Path, dict[str, str]]]:
    """Every quarantined file with its JSON record."""
    return [
        (sidecar.with_suffix(".dcm"), json.loads(sidecar.read_text()))
        for sidecar in sorted(store.quarantine_dir.rglob("*.json"))
    ]


# -- recovery ---------------------------------------------------------------------------------
def test_partial_reception_is_removed(store: FileStore, db: Database) -> None:
    """recover() deletes files left in incoming/ by receptions that never completed."""
    partial = store.new_incoming_path()
    partial.write_bytes(b"\x00" * 100)
    report = recover(store, db)
    assert not partial.exists()
    assert report.partial_files_removed == 1
    assert list(store.incoming.iterdir()) == []


def test_unclean_stop_indexes_orphans_and_drops_rows_without_files(
    store: FileStore, db: Database, series: list[Path]
) -> None:
    """After an unclean stop, an unindexed stored file is indexed and a fileless row removed."""
    orphan = place(store, series[0])
    kept = place(store, series[1])
    gone = place(store, series[2])
    index(store, db, kept)
    index(store, db, gone)
    store.absolute(gone).unlink()
    assert not clean_marker(store).exists()

    report = recover(store, db)

    assert not report.clean_shutdown
    assert report.files_indexed == 1
    assert report.rows_removed == 1
    assert report.files_quarantined == 0
    assert indexed(db) == {orphan, kept}
    with db.sessions() as session:
        found = list_studies(session)
    assert [s.instances for s in found] == [2]


def test_misplaced_and_unparseable_files_are_quarantined(
    store: FileStore, db: Database, series: list[Path]
) -> None:
    """A file at the wrong path for its UIDs, or not DICOM at all, is moved to quarantine."""
    right = place(store, series[0])
    misplaced = store.absolute(right).with_name("1.2.3.999.dcm")
    store.absolute(right).rename(misplaced)
    garbage = store.instances / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"this is not a DICOM file")
    misplaced_bytes = misplaced.read_bytes()

    report = recover(store, db)

    assert report.files_quarantined == 2
    assert report.files_indexed == 0
    assert not misplaced.exists()
    assert not garbage.exists()
    assert indexed(db) == set()
    records = quarantined(store)
    assert len(records) == 2
    by_path = {r["store_path"]: (path, r) for path, r in records}
    assert set(by_path) == {
        str(misplaced.relative_to(store.root)),
        str(garbage.relative_to(store.root)),
    }
    moved, record = by_path[str(misplaced.relative_to(store.root))]
    assert moved.read_bytes() == misplaced_bytes
    assert "holds" in record["reason"]
    moved, record = by_path[str(garbage.relative_to(store.root))]
    assert moved.read_bytes() == b"this is not a DICOM file"
    assert "cannot be parsed" in record["reason"]


def test_clean_shutdown_skips_the_walk_unless_reconcile_is_requested(
    store: FileStore, db: Database, series: list[Path]
) -> None:
    """The clean marker skips reconciliation; RECONCILE_NEEDED forces it and is then removed."""
    orphan = place(store, series[0])
    mark_clean_shutdown(store)
    partial = store.new_incoming_path()
    partial.write_bytes(b"partial")

    report = recover(store, db)

    assert report.clean_shutdown
    assert report.partial_files_removed == 1  # incoming/ is always cleared
    assert report.files_indexed == 0
    assert indexed(db) == set()
    assert not clean_marker(store).exists()  # the marker is consumed

    mark_clean_shutdown(store)
    (store.root / RECONCILE_MARKER).touch()

    report = recover(store, db)

    assert report.clean_shutdown
    assert report.files_indexed == 1
    assert indexed(db) == {orphan}
    assert not (store.root / RECONCILE_MARKER).exists()
    assert not clean_marker(store).exists()


def test_hosts_sharing_a_root_clear_only_their_own_partial_files(
    store: FileStore, db: Database
) -> None:
    """A node that starts leaves another node's reception in progress alone; stale ones go."""
    other = FileStore(store.root, node="receiver-b")
    assert other.incoming == store.root / "incoming" / "receiver-b"
    assert store.incoming != other.incoming
    in_progress = other.new_incoming_path()
    in_progress.write_bytes(b"being received")
    dead = other.new_incoming_path()
    dead.write_bytes(b"its host died")
    legacy = store.incoming_root / "0123.part"  # left by a version without node folders
    legacy.write_bytes(b"old")
    old = datetime.now(UTC).timestamp() - STALE_PARTIAL_SECONDS - 60
    for path in (dead, legacy):
        os.utime(path, (old, old))
    mine = store.new_incoming_path()
    mine.write_bytes(b"mine, from before my crash")

    report = recover(store, db)

    assert not mine.exists()
    assert in_progress.read_bytes() == b"being received"
    assert not dead.exists()
    assert not legacy.exists()
    assert other.incoming.is_dir()  # an idle live node keeps its folder
    assert report.partial_files_removed == 3


def test_a_stale_file_that_cannot_be_removed_does_not_stop_the_start(
    store: FileStore, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial file the sweep cannot delete (NFS keeps ``.nfs*`` files busy) is skipped."""
    other = FileStore(store.root, node="receiver-b")
    busy, stale = other.incoming / ".nfs000000001", other.incoming / "dead.part"
    old = datetime.now(UTC).timestamp() - STALE_PARTIAL_SECONDS - 60
    for path in (busy, stale):
        path.write_bytes(b"x")
        os.utime(path, (old, old))
    unlink = os.unlink

    def nfs_unlink(path: str | os.PathLike[str]) -> None:
        if str(path) == str(busy):
            raise OSError(16, "Device or resource busy")
        unlink(path)

    monkeypatch.setattr(os, "unlink", nfs_unlink)
    report = recover(store, db)
    assert report.partial_files_removed == 1
    assert busy.exists()
    assert not stale.exists()


def test_a_file_indexed_by_a_receiver_during_the_walk_is_left_in_place(
    store: FileStore, db: Database, series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk's snapshot of indexed paths predates a receiver's commit of the same file."""
    from dicom_ai.ingest.recovery import reconcile

    stored = place(store, series[0])  # renamed into place by a receiver...
    index(store, db, stored)  # ...which commits its row after the walk's snapshot
    monkeypatch.setattr(repository, "indexed_paths", lambda session: set())

    indexed_now, removed, quarantined_now = reconcile(store, db)

    monkeypatch.undo()
    assert (indexed_now, removed, quarantined_now) == (0, 0, 0)
    assert store.absolute(stored).is_file()  # an acknowledged instance is never quarantined
    assert quarantined(store) == []
    assert indexed(db) == {stored}


def test_a_clean_stop_of_one_node_does_not_skip_another_nodes_walk(
    store: FileStore, db: Database, series: list[Path]
) -> None:
    """Clean-shutdown markers are per node: only the node that stopped cleanly skips its walk."""
    other = FileStore(store.root, node="receiver-b")
    orphan = place(store, series[0])  # e.g. renamed into place by this node just before a crash
    mark_clean_shutdown(other)
    (store.root / CLEAN_MARKER).write_text("left by an older version")

    report = recover(store, db)

    assert not report.clean_shutdown
    assert report.files_indexed == 1
    assert indexed(db) == {orphan}
    assert not (store.root / CLEAN_MARKER).exists()  # not trusted, and removed
    assert clean_marker(other).exists()
    assert recover(other, db).clean_shutdown


def test_a_reconcile_request_renewed_during_the_walk_survives_it(
    store: FileStore, db: Database, series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request made while the walk runs (another node's failed index write) is kept."""
    import dicom_ai.ingest.recovery as recovery

    marker = store.root / RECONCILE_MARKER
    marker.touch()
    old = datetime.now(UTC).timestamp() - 10
    os.utime(marker, (old, old))
    walk = recovery.reconcile

    def walk_while_another_node_asks(*args: object, **kwargs: object) -> tuple[int, int, int]:
        result = walk(*args, **kwargs)  # type: ignore[arg-type]
        marker.touch()  # e.g. request_reconcile() on another node, during this walk
        return result

    monkeypatch.setattr(recovery, "reconcile", walk_while_another_node_asks)
    recover(store, db)
    assert marker.exists()
    monkeypatch.setattr(recovery, "reconcile", walk)
    recover(store, db)
    assert not marker.exists()


def test_a_serve_start_leaves_a_batch_retrieval_on_the_same_host_alone(
    tmp_path: Path, db: Database
) -> None:
    """``dicom-ai batch`` receives C-GET sub-operations into ``incoming/<node>.batch/``."""
    from dicom_ai.config import load_settings

    settings = load_settings(None, storage={"root": tmp_path / "store", "node": "host1"})
    serve, batch = settings.storage.file_store(), settings.storage.file_store(role="batch")
    assert batch.incoming == serve.incoming.with_name("host1.batch")
    retrieving = batch.new_incoming_path()
    retrieving.write_bytes(b"C-GET sub-operation in progress")
    recover(serve, db)
    assert retrieving.exists()


def test_node_ids_must_be_folder_names(tmp_path: Path) -> None:
    for bad in ("", ".hidden", "a/b", "x" * 101, "host name"):
        with pytest.raises(ValueError, match="node id"):
            FileStore(tmp_path / "s", node=bad)
    assert FileStore(tmp_path / "s", node="dicom-ai-receiver-0").node == "dicom-ai-receiver-0"


def test_orphan_duplicate_of_an_indexed_instance_is_not_counted_as_indexed(
    store: FileStore, db: Database, series: list[Path], tmp_path: Path
) -> None:
    """A stored second copy of an indexed SOP instance (another series) is quarantined."""
    index(store, db, place(store, series[0]))
    moved = pydicom.dcmread(series[0])
    moved.SeriesInstanceUID = generate_uid()  # e.g. re-sent with a corrected series
    copy = tmp_path / "moved.dcm"
    moved.save_as(copy)
    orphan = place(store, copy)

    report = recover(store, db)

    assert report.files_indexed == 0
    assert report.files_quarantined == 1
    assert orphan not in indexed(db)
    assert not store.absolute(orphan).exists()
    records = quarantined(store)
    assert len(records) == 1
    assert "second copy" in records[0][1]["reason"]
    assert recover(store, db, force=True).files_quarantined == 0  # nothing left to repeat


def test_db_reconcile_command(tmp_path: Path, db_url: str, series: list[Path]) -> None:
    """`dicom-ai db reconcile` indexes an orphan file of the configured store."""
    root = tmp_path / "store"
    place(FileStore(root), series[0])
    config = tmp_path / "config.toml"
    config.write_text(
        f"[storage]\nroot = {json.dumps(str(root))}\ndatabase_url = {json.dumps(db_url)}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_AI_")}
    result = subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "db", "reconcile", "--config", str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "indexed 1 file(s)" in result.stdout
    database = Database(db_url)
    try:
        assert len(indexed(database)) == 1
    finally:
        database.dispose()


# -- file store -------------------------------------------------------------------------------
@pytest.mark.parametrize("uid", ["1.2.840.10008.1.1", "1.2.03.4", "0", "1." + "2" * 62])
def test_validate_uid_accepts(uid: str) -> None:
    """Dotted-decimal UIDs up to 64 characters pass, a leading zero only with a warning."""
    assert validate_uid(uid) == uid


@pytest.mark.parametrize(
    "uid", ["", None, "1..2", "1.2.", ".1.2", "../etc", "1.2.a", "1/2", "1." + "2" * 63, 1.2]
)
def test_validate_uid_rejects(uid: object) -> None:
    """Missing, malformed, path-like and 65-character UIDs raise InvalidUIDError."""
    with pytest.raises(InvalidUIDError):
        validate_uid(uid, "StudyInstanceUID")


def test_validate_uid_rejects_trailing_newline() -> None:
    """A UID ending in a newline is not dotted-decimal and must not become a path component."""
    with pytest.raises(InvalidUIDError):
        validate_uid("1.2.3\n")


def test_commit_without_replace_keeps_the_first_file(store: FileStore) -> None:
    """commit(replace=False) raises FileExistsError and leaves both files untouched."""
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")
    first = store.new_incoming_path()
    first.write_bytes(b"first")
    assert store.commit(first, relative, replace=False) == store.absolute(relative)
    assert not first.exists()
    second = store.new_incoming_path()
    second.write_bytes(b"second")
    with pytest.raises(FileExistsError):
        store.commit(second, relative, replace=False)
    assert store.absolute(relative).read_bytes() == b"first"
    assert second.read_bytes() == b"second"  # the caller still owns it


def test_commit_with_replace_replaces(store: FileStore) -> None:
    """commit(replace=True) atomically moves the new file over the existing one."""
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")
    for content in (b"first", b"second"):
        source = store.new_incoming_path()
        source.write_bytes(content)
        store.commit(source, relative, replace=True)
        assert not source.exists()
    assert store.absolute(relative).read_bytes() == b"second"
    assert list(store.iter_relative_paths()) == [relative]


def test_quarantine_writes_file_and_reason(store: FileStore) -> None:
    """quarantine() moves the file to quarantine/ with a JSON record of the reason."""
    source = store.new_incoming_path()
    source.write_bytes(b"refused")
    target = store.quarantine(source, "dataset cannot be parsed", {"status": "0xC000"})
    assert not source.exists()
    assert target.suffix == ".dcm"
    assert target.parent.parent == store.quarantine_dir
    assert target.read_bytes() == b"refused"
    record = json.loads(target.with_suffix(".json").read_text())
    assert record["reason"] == "dataset cannot be parsed"
    assert record["status"] == "0xC000"
    assert "quarantined_at" in record
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(
        [target.name, target.with_suffix(".json").name]
    )
