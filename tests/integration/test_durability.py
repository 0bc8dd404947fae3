"""Durability with a real `dicom-ai serve` process: kill -9 mid-push, restarts, receiver pool."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE, _config, build_context
from sqlalchemy import text

from storage import audit
from storage.db import Database
from tests.conftest import need_binary
from tests.peers import DicomAIServe, free_port, make_ct_series, storescu

SUCCESS = 0x0000


def write_config(tmp_path: Path, db_url: str, port: int, receivers: int = 1, *,
                 root: Path | None = None, node: str | None = None) -> Path:
    """A config file for a serve process on loopback (tests.peers.ENV: the API on a free port)."""
    config = tmp_path / "config.toml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'[dicom]\nhost = "127.0.0.1"\nport = {port}\nreceivers = {receivers}\n'
        f'[storage]\nroot = "{root or tmp_path / "store"}"\ndatabase_url = "{db_url}"\n'
        "min_free_bytes = 0\n" + (f'node = "{node}"\n' if node else "") +
        "[completion]\nseries_quiet_seconds = 600\nstudy_quiet_seconds = 600\n"
        '[logging]\nlevel = "INFO"\n'
    )
    return config


def _stored_count(server: DicomAIServe) -> float:
    """``dicom_ai_store_responses_total{status="0x0000"}`` from the serve process's /metrics."""
    api = re.search(r"HTTP API on (http://\S+) ", server.log_path.read_text())
    assert api is not None, "the serve process logged no API address"
    text = httpx.get(f"{api.group(1)}/metrics", timeout=10).text
    match = re.search(r'^dicom_ai_store_responses_total\{status="0x0000"\} (\S+)$', text,
                      re.MULTILINE)
    assert match is not None, text[-2000:]
    return float(match.group(1))


def indexed(db_url: str) -> dict[str, str]:
    """SOP Instance UID -> stored path, from the index."""
    db = Database(db_url)
    try:
        with db.engine.connect() as conn:
            rows = conn.execute(text("SELECT sop_instance_uid, path FROM instances")).all()
        return {uid: path for uid, path in rows}
    finally:
        db.dispose()


class Pusher(threading.Thread):
    """Sends files over one association and records which ones were acknowledged."""

    def __init__(self, port: int, paths: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.paths = paths
        self.acked: list[Path] = []
        self.error: str | None = None

    def run(self) -> None:
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title="PUSHER")
        ae.requested_contexts = [build_context(pydicom.dcmread(self.paths[0]).SOPClassUID)]
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOM_AI")
        if not assoc.is_established:
            self.error = "no association"
            return
        for path in self.paths:
            try:
                rsp = assoc.send_c_store(path)
            except Exception as exc:  # the peer vanished mid-message
                self.error = repr(exc)
                break
            if "Status" not in rsp:
                break
            if int(rsp.Status) == SUCCESS:
                self.acked.append(path)
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("kill_after", [1, 23, 71])
def test_kill_9_loses_nothing_acknowledged(
    kill_after: int, tmp_path: Path, db_url: str
) -> None:
    """SIGKILL during a push: every acknowledged instance survives, a re-send adds no row."""
    port = free_port()
    server = DicomAIServe(write_config(tmp_path, db_url, port), port)
    files = make_ct_series(tmp_path / "ct", 120, size=96, seed=kill_after)
    server.start()
    pusher = Pusher(port, files)
    try:
        pusher.start()
        deadline = time.monotonic() + 60
        while len(pusher.acked) < kill_after and pusher.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        server.kill()
        pusher.join(30)
        acked = list(pusher.acked)
        assert len(acked) >= kill_after
        assert len(acked) < len(files), "the push finished before the kill"

        server.start()  # recovery runs before the first C-ECHO is answered
        store = tmp_path / "store"
        rows = indexed(db_url)
        # The trail marks the unclean stop (the open association's rows died with the process).
        starts = _audited(db_url, "service.started")
        assert [r.detail["clean_shutdown"] for r in starts] == [False, False]  # first start too
        assert starts[-1].actor == "serve"
        for path in acked:
            original = pydicom.dcmread(path)
            assert original.SOPInstanceUID in rows
            stored = pydicom.dcmread(store / rows[original.SOPInstanceUID])
            assert stored.PixelData == original.PixelData
        assert [p for p in (store / "incoming").rglob("*") if p.is_file()] == []
        on_disk = list((store / "instances").rglob("*"))
        assert all(p.is_dir() or p.suffix == ".dcm" for p in on_disk)
        assert len([p for p in on_disk if p.is_file()]) == len(rows)

        again = Pusher(port, files)
        again.run()
        assert len(again.acked) == len(files)
        rows = indexed(db_url)
        assert len(rows) == len(files)
        assert len(list((store / "instances").rglob("*.dcm"))) == len(files)
    finally:
        server.stop()


def test_receiver_pool_shares_the_port_and_survives_a_dead_receiver(
    tmp_path: Path, db_url: str
) -> None:
    """A pool of 3 receivers spreads 4 parallel senders over processes; a killed one is replaced.

    The serve process's /metrics counts the stores of every receiver process, the killed one's
    included.
    """
    need_binary("storescu")
    port = free_port()
    server = DicomAIServe(write_config(tmp_path, db_url, port, receivers=3), port)
    batches = [make_ct_series(tmp_path / f"ct{i}", 15, size=64, seed=i) for i in range(4)]
    server.start()
    try:
        server.wait_for_log("all 3 receivers ready")
        assert server.process is not None
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda b=b: results.append(storescu(port, b).returncode))
            for b in batches
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert results == [0, 0, 0, 0]
        assert len(indexed(db_url)) == 60
        log = server.log_path.read_text()
        serving = {line.split("[")[1].split("]")[0] for line in log.splitlines()
                   if "association from STORESCU" in line and "accepted" in line}
        assert len(serving) >= 2, "the 4 associations were not spread over processes"
        assert _stored_count(server) == 60

        children = subprocess.run(["pgrep", "-P", str(server.process.pid)],
                                  capture_output=True, text=True, check=False).stdout.split()
        # Receivers are spawned interpreters; multiprocessing's resource tracker is not one.
        receivers = [int(pid) for pid in children
                     if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(receivers) == 2  # receiver 0 is the serve process itself
        os.kill(receivers[0], signal.SIGKILL)
        time.sleep(2.5)  # the supervisor notices within a second and spawns a replacement
        assert (tmp_path / "store" / "RECONCILE_NEEDED").exists()
        [died] = _audited(db_url, "receiver.died")
        assert died.detail["exit_code"] == -signal.SIGKILL
        assert died.detail["receiver"] in (1, 2)
        more = make_ct_series(tmp_path / "more", 10, size=64, seed=9)
        for _ in range(4):  # several associations, so both receivers are exercised
            assert storescu(port, more).returncode == 0
        assert len(indexed(db_url)) == 70
        # 60 + 4 x 10 answered 0x0000 (a re-sent instance is a kept duplicate: success), the
        # killed receiver's stores included.
        assert _stored_count(server) == 100
    finally:
        server.stop()


def test_two_hosts_share_one_store_and_restart_independently(
    tmp_path: Path, db_url: str
) -> None:
    """Two serve processes (nodes a and b) on one store root and one index.

    A node that starts clears only its own partial receptions (another node's reception in
    progress survives; stale ones of dead nodes are swept) and trusts only its own clean-shutdown
    marker, while the other node keeps receiving.
    """
    need_binary("storescu")
    store = tmp_path / "store"
    port_a, port_b = free_port(), free_port()
    a = DicomAIServe(write_config(tmp_path / "a", db_url, port_a, root=store, node="a"), port_a)
    b = DicomAIServe(write_config(tmp_path / "b", db_url, port_b, root=store, node="b"), port_b)
    to_a = make_ct_series(tmp_path / "to-a", 30, size=64, seed=1)
    to_b = make_ct_series(tmp_path / "to-b", 5, size=64, seed=2)
    orphans = make_ct_series(tmp_path / "orphans", 2, size=64, seed=3)
    a.start()
    b.start()
    try:
        assert storescu(port_b, to_b).returncode == 0
        # A reception in progress on node a (its file is written to with every PDU), and
        # leftovers of a replaced pod and of a version without node folders.
        in_progress = store / "incoming" / "a" / "receiving.part"
        in_progress.write_bytes(b"being received")
        stale = [store / "incoming" / "old-pod" / "x.part", store / "incoming" / "y.part"]
        stale[0].parent.mkdir()
        old = time.time() - 2 * 3600
        for path in stale:
            path.write_bytes(b"never acknowledged")
            os.utime(path, (old, old))

        # Node b dies and restarts while node a receives.
        b.kill()
        orphan = _place(store, orphans[0])  # renamed into place by b just before it died
        pusher = Pusher(port_a, to_a)
        pusher.start()
        b.start()
        pusher.join(120)
        assert pusher.error is None
        assert len(pusher.acked) == len(to_a)
        assert in_progress.read_bytes() == b"being received"
        assert not any(path.exists() for path in stale)
        assert orphan in indexed(db_url).values()

        # a stops cleanly; b dies again: b's start walks the store although a's marker is there.
        a.stop()
        assert (store / "CLEAN_SHUTDOWN.a").exists()
        b.kill()
        second = _place(store, orphans[1])
        b.start()
        assert second in indexed(db_url).values()
        assert (store / "CLEAN_SHUTDOWN.a").exists()
        a.start()  # its own marker: no walk, and its folder is cleared
        assert not (store / "CLEAN_SHUTDOWN.a").exists()
        assert not in_progress.exists()
        assert ("RecoveryReport(clean_shutdown=True, partial_files_removed=1, files_indexed=0"
                in a.log_path.read_text())
        assert len(indexed(db_url)) == len(to_a) + len(to_b) + len(orphans)
    finally:
        a.stop()
        b.stop()


def _audited(db_url: str, action: str) -> list[audit.AuditRecord]:
    db = Database(db_url)
    try:
        with db.sessions() as session:
            return audit.list_events(session, action=action, order="asc")
    finally:
        db.dispose()


def _place(store: Path, source: Path) -> str:
    """Copy an instance to its place in the store without an index row; its relative path."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    relative = (f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/"
                f"{ds.SOPInstanceUID}.dcm")
    target = store / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return relative
