"""Decompression bombs in Deflated Explicit VR Little Endian, against a real ``serve`` process.

A 256 KB deflated Secondary Capture inflates to 256 MiB of zero pixels (``tests.deflated``).
The service runs with ``[limits] max_inflated_bytes`` = 64 MiB. Before the fix, pydicom inflated
the whole dataset in memory wherever the file was read: the C-STORE was acknowledged, and the
C-STORE, every C-GET of it and the start-up recovery each cost the serve process over 256 MiB.

Memory is the peak RSS of the serve process tree read from ``/proc`` (each process's peak is
reset through ``clear_refs`` before the operation, so start-up peaks do not hide anything).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore

from storage import repository
from storage.db import Database
from storage.filestore import FileStore
from tests.conftest import need_binary
from tests.deflated import MIB, SECONDARY_CAPTURE, write_bomb
from tests.integration.test_receive import dataset_bytes, echo_status, send_paths
from tests.peers import (
    ENV,
    REPO,
    DicomAIServe,
    PeakGrowth,
    free_port,
    sample_file,
    status_kib,
    storescu,
)

SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
LIMIT = 64 * MIB
BOMB_SIDE = 16384  # 16384^2 zero bytes: 256 MiB inflated, about 256 KB deflated
INFLATED = BOMB_SIDE * BOMB_SIDE
# Runs `dicom-ai ARGS...` and prints this process's peak resident size when it exits.
_REPORT_PEAK = """
import atexit, re, runpy, sys
def _peak():
    status = open("/proc/self/status").read()
    print("PEAK " + re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1) + " kB", flush=True)
atexit.register(_peak)
sys.argv = ["dicom-ai", *sys.argv[1:]]
runpy.run_module("dicom_ai.cli", run_name="__main__")
"""
GROWTH = LIMIT  # the receiver never holds even the limit: a quarter of what the bomb inflates to
NORMAL = "image_dfl.dcm"  # pydicom's deflated example
NORMAL_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.977067309.6001.0"
NORMAL_STUDY = "1.3.6.1.4.1.5962.1.2.0.977067310.6001.0"
BOMB_PATIENT = ("Bomb^Deflate", "BOMB-1")


# -- helpers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """The 256 MiB bomb, in a study of its own (written once for the module)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    return path, write_bomb(path, BOMB_SIDE)


def _config(tmp_path: Path, db_url: str, port: int, *, qr_callers: Sequence[str] = ()
            ) -> Path:
    """A serve config: loopback, the store under tmp_path, the 64 MiB inflate limit."""
    config = tmp_path / "config.toml"
    callers = ", ".join(f'"{c}"' for c in qr_callers)
    config.write_text(
        f'[dicom]\nhost = "127.0.0.1"\nport = {port}\nreceivers = 1\n'
        f'[storage]\nroot = "{tmp_path / "store"}"\ndatabase_url = "{db_url}"\n'
        "min_free_bytes = 0\n"
        "[completion]\nseries_quiet_seconds = 600\nstudy_quiet_seconds = 600\n"
        f"[limits]\nmax_inflated_bytes = {LIMIT}\n"
        f"[query_retrieve]\nallowed_calling_aets = [{callers}]\n"
        '[logging]\nlevel = "INFO"\n'
    )
    return config


@contextlib.contextmanager
def _serve(tmp_path: Path, db_url: str, *, qr_callers: Sequence[str] = ()
           ) -> Iterator[DicomAIServe]:
    port = free_port()
    server = DicomAIServe(_config(tmp_path, db_url, port, qr_callers=qr_callers), port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _pid(server: DicomAIServe) -> int:
    assert server.process is not None
    return server.process.pid


def _count(db_url: str, table: str) -> int:
    from sqlalchemy import text

    db = Database(db_url)
    try:
        with db.engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        db.dispose()


def _quarantine_records(root: Path) -> list[dict[str, str]]:
    return [json.loads(p.read_text()) for p in sorted((root / "quarantine").rglob("*.json"))]


def _assert_no_patient_data(log: Path) -> None:
    text = log.read_text(errors="replace")
    for value in BOMB_PATIENT:
        assert value not in text, f"{value} in the serve log"


# -- C-STORE ---------------------------------------------------------------------------------------
def test_a_deflate_bomb_is_refused_and_quarantined_in_bounded_memory(
        tmp_path: Path, db_url: str, bomb: tuple[Path, Dataset]) -> None:
    """0xC000, quarantined with its reason, never indexed; the receiver grows by far less than
    the 256 MiB the dataset inflates to; a normal deflated file (dcmtk) still goes in."""
    path, ds = bomb
    root = tmp_path / "store"
    with _serve(tmp_path, db_url) as server:
        with PeakGrowth(_pid(server)) as peak:
            statuses = send_paths(server.port, [path])
        figures = f"status {statuses}, serve tree peak growth {peak.growth / MIB:.0f} MiB"
        assert statuses == [CANNOT_UNDERSTAND], figures
        assert peak.growth < GROWTH, figures
        assert echo_status(server.port) == SUCCESS

        records = _quarantine_records(root)
        assert len(records) == 1
        assert records[0]["status"] == "0xC000"
        assert records[0]["affected_sop_instance_uid"] == ds.SOPInstanceUID
        assert "max_inflated_bytes" in records[0]["reason"]
        kept = sorted((root / "quarantine").rglob("*.dcm"))
        assert len(kept) == 1
        assert dataset_bytes(kept[0]) == dataset_bytes(path)
        assert _count(db_url, "quarantine") == 1
        assert _count(db_url, "instances") == 0

        # pydicom's deflated example, sent by dcmtk storescu proposing deflate first (dcmsend
        # lists the uncompressed syntaxes first, and the acceptor takes the requestor's order).
        need_binary("storescu")
        sent = storescu(server.port, [Path(sample_file(NORMAL))], extra=["-xd"])
        assert sent.returncode == 0, sent.stderr
        assert _count(db_url, "instances") == 1
        stored = pydicom.dcmread(next((root / "instances").rglob("*.dcm")))
        assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert stored.SOPInstanceUID == NORMAL_UID
        assert stored.PixelData == pydicom.dcmread(sample_file(NORMAL)).PixelData
    log = server.log_path.read_text(errors="replace")
    assert "max_inflated_bytes" in log
    _assert_no_patient_data(server.log_path)


def test_a_truncated_deflate_stream_is_refused(tmp_path: Path, db_url: str) -> None:
    """A deflate stream cut short (dcmsend would not send it: pynetdicom sends it as is)."""
    from tests.deflated import bomb_dataset, write_deflated

    ds = bomb_dataset(256)
    path = write_deflated(tmp_path / "cut.dcm", ds, zeros=256 * 256, truncate=3)
    with _serve(tmp_path, db_url) as server:
        assert send_paths(server.port, [path]) == [CANNOT_UNDERSTAND]
        assert echo_status(server.port) == SUCCESS
    records = _quarantine_records(tmp_path / "store")
    assert [r["status"] for r in records] == ["0xC000"]
    assert "ends early" in records[0]["reason"]
    assert _count(db_url, "instances") == 0


# -- C-GET -----------------------------------------------------------------------------------------
def _plant_indexed(root: Path, db_url: str, source: Path, ds: Dataset) -> None:
    """Put `source` in the store with its index row, as if received when the limit was higher."""
    store = FileStore(root)
    relative = store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    target = store.absolute(relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    record = repository.InstanceRecord(
        study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=DeflatedExplicitVRLittleEndian, modality="OT")
    db = Database(db_url)
    try:
        with db.write_session() as session:
            repository.index_instance(session, record, path=relative,
                                      size_bytes=target.stat().st_size, calling_ae_title="TEST",
                                      now=datetime.now(UTC), replace=False)
    finally:
        db.dispose()


def _c_get(port: int, study_uid: str) -> tuple[Dataset, list[str]]:
    """C-GET a study (Study Root, STUDY level) as GETSCU; the final response and what came."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(cast(C_STORE, event.request).AffectedSOPInstanceUID))
        return SUCCESS

    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(SECONDARY_CAPTURE,
                             [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_AI",
                         ext_neg=[build_role(SECONDARY_CAPTURE, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    try:
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final is not None
    assert "Status" in final
    return final, received


def test_c_get_never_inflates_a_stored_bomb(tmp_path: Path, db_url: str) -> None:
    """A stored deflated file above the limit is a failed sub-operation, read in bounded memory;
    the study's normal deflated file is still sent."""
    root = tmp_path / "store"
    bomb_path = tmp_path / "bomb.dcm"
    ds = write_bomb(bomb_path, BOMB_SIDE, study_uid=NORMAL_STUDY)
    with _serve(tmp_path, db_url, qr_callers=["GETSCU"]) as server:
        assert send_paths(server.port, [Path(sample_file(NORMAL))]) == [SUCCESS]
        _plant_indexed(root, db_url, bomb_path, ds)
        with PeakGrowth(_pid(server)) as peak:
            final, received = _c_get(server.port, NORMAL_STUDY)
        figures = (f"completed {final.get('NumberOfCompletedSuboperations')}, failed "
                   f"{final.get('NumberOfFailedSuboperations')}, serve tree peak growth "
                   f"{peak.growth / MIB:.0f} MiB")
        assert received == [NORMAL_UID], figures
        assert final.NumberOfCompletedSuboperations == 1, figures
        assert final.NumberOfFailedSuboperations == 1, figures
        assert peak.growth < GROWTH, figures
    log = server.log_path.read_text(errors="replace")
    assert "max_inflated_bytes" in log
    _assert_no_patient_data(server.log_path)


# -- recovery and reconcile ----------------------------------------------------------------------
def test_start_up_recovery_quarantines_a_planted_bomb(tmp_path: Path, db_url: str,
                                                      bomb: tuple[Path, Dataset]) -> None:
    """A bomb found among the instances (no row, unclean stop) is quarantined at start by the
    serve process, whose peak stays below what the bomb inflates to."""
    path, ds = bomb
    root = tmp_path / "store"
    store = FileStore(root)
    relative = store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    store.absolute(relative).parent.mkdir(parents=True)
    store.absolute(relative).write_bytes(path.read_bytes())
    with _serve(tmp_path, db_url) as server:
        peak = status_kib(_pid(server), "VmHWM") * 1024
        assert echo_status(server.port) == SUCCESS
    records = _quarantine_records(root)
    assert [r["status"] for r in records] == ["0xC000"]
    assert "max_inflated_bytes" in records[0]["reason"]
    assert records[0]["store_path"] == relative
    assert _count(db_url, "instances") == 0
    assert peak < INFLATED, f"serve peak RSS {peak / MIB:.0f} MiB"
    _assert_no_patient_data(server.log_path)


def test_db_reconcile_quarantines_a_planted_bomb(tmp_path: Path, db_url: str,
                                                 bomb: tuple[Path, Dataset]) -> None:
    """``dicom-ai db reconcile`` applies the configured limit, in bounded memory."""
    path, ds = bomb
    root = tmp_path / "store"
    store = FileStore(root)
    relative = store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    store.absolute(relative).parent.mkdir(parents=True)
    store.absolute(relative).write_bytes(path.read_bytes())
    config = _config(tmp_path, db_url, free_port())
    db = Database(db_url)
    db.upgrade()
    db.dispose()
    # The child reports its own peak (VmHWM) at exit: the kernel's ru_maxrss of a child also
    # counts the memory it had before exec, i.e. this (large) pytest process's.
    process = subprocess.run(
        [sys.executable, "-c", _REPORT_PEAK, "db", "reconcile", "--config", str(config)],
        env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
        timeout=300)
    output = process.stdout.decode(errors="replace")
    assert process.returncode == 0, output
    assert "quarantined 1 file(s)" in output, output
    [hwm] = re.findall(r"^PEAK (\d+) kB$", output, flags=re.M)
    peak = int(hwm) * 1024
    assert peak < INFLATED, f"reconcile peak RSS {peak / MIB:.0f} MiB"
    assert _count(db_url, "instances") == 0
