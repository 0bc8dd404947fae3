"""What every fault test shares: short timings, peers it can stop and start, and the checker.

A fault test pushes studies with a sender that records which instances were acknowledged,
injects one real fault (a peer stopped, a process killed with SIGKILL, a server restarted),
waits for the results at a dcmtk ``storescp`` and hands everything to :func:`check`, which
asserts the two promises of issue 19 and returns the figures the suite reports:

- no acknowledged instance is lost: each SOP Instance UID the sender got success for is in
  the index and its file is in the store;
- every study gets its result at the destination: one SR per study (one SOP Instance UID),
  every object of the study's results there; a result received twice (same SOP Instance UID)
  counts as a duplicate;
- the seconds from the end of the fault (the restart) to the arrival of the last result.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_ai.config import Settings
from dicom_ai.reporting import summarize_sr
from storage import outbox
from storage.db import Database
from storage.models import OutboxItem
from storage.paging import MAX_LIMIT
from tests.conftest import missing
from tests.integration.test_durability import Pusher, indexed
from tests.integration.test_loop import SR_CLASSES, loop_settings
from tests.peers import (
    ENV,
    StoreSCP,
    binary,
    free_port,
    process_tree,
    stop,
    wait_for_port,
    wait_until,
)

# Short delivery and worker timings, so a recovery takes seconds and the suite stays small.
FAST: dict[str, dict[str, Any]] = {
    "workers": {"processes": 1, "poll_seconds": 0.2, "retry_backoff_seconds": 0.2,
                "lease_seconds": 10, "resource_wait_seconds": 1.0},
    "delivery": {"poll_seconds": 0.2, "retry_initial_seconds": 0.3, "retry_max_seconds": 1.0},
}
# After the last expected result, how long a duplicate may still take to arrive.
SETTLE_SECONDS = 1.5


def fault_settings(tmp_path: Path, db_url: str, destination_port: int,
                   **sections: dict[str, Any]) -> Settings:
    """Loop settings (one destination, "pacs") with the :data:`FAST` timings under `sections`."""
    merged = {key: {**FAST.get(key, {}), **sections.get(key, {})}
              for key in FAST.keys() | sections.keys()}
    return loop_settings(tmp_path, db_url, [{"name": "pacs", "ae_title": "STORESCP",
                                             "host": "127.0.0.1", "port": destination_port}],
                         None, **merged)


# -- peers that can go down and come back ---------------------------------------------------
class ResultSCP(StoreSCP):
    """dcmtk ``storescp`` that keeps every copy it receives and restarts on the same port.

    ``+uf`` (unique file names): an object received twice gets a second file instead of
    overwriting the first, so duplicates can be counted.
    """

    def start(self, *options: str) -> None:
        """Listen on :attr:`port` (the same port on every start), with storescp `options`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [binary("storescp") or "storescp", "-aet", "STORESCP", "-od", str(self.folder),
                   "+uf", *options, str(self.port)]
        self.process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_port(self.port, process=self.process)

    def stop(self) -> None:
        """Stop it (SIGTERM): the destination is down."""
        if self.process is not None:
            stop(self.process)

    def __enter__(self) -> ResultSCP:
        self.start()
        return self


class ThrowawayPostgres:
    """A PostgreSQL cluster of the test's own (never the machine's server), run as postgres.

    The cluster lives in a folder under the system temp dir that the postgres user owns
    (pytest's tmp_path is private to root); it listens on a free loopback port and keeps its
    socket in that folder.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.folder: Path | None = None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the cluster's ``postgres`` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        assert self.folder is not None
        result = subprocess.run(["runuser", "-u", "postgres", "--", f"{self.bindir}/{program}",
                                 *args], capture_output=True, text=True, check=False,
                                timeout=60, cwd=self.folder)
        assert result.returncode == 0, f"{program} {args}: {result.stderr[-2000:]}"

    def __enter__(self) -> ThrowawayPostgres:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            missing("PostgreSQL server binaries not found (apt-get install postgresql)")
        if os.geteuid() != 0 or shutil.which("runuser") is None:
            missing("a throwaway PostgreSQL cluster needs root and runuser (to run as postgres)")
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing("no postgres user to run a throwaway cluster")
        self.bindir = str(Path(found[-1]).parent)
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-ai-pg-"))
        try:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._run("initdb", "-D", "data", "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--no-sync")
            self.start()
        except BaseException:  # no cluster or folder left behind
            self.__exit__()
            raise
        return self

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        self._run("pg_ctl", "-D", "data", "-l", "server.log", "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster (``fast``: roll back open transactions, close every session)."""
        self._run("pg_ctl", "-D", "data", "-m", mode, "-w", "-t", "60", "stop")

    def __exit__(self, *exc: object) -> None:
        if self.folder is not None:
            subprocess.run(["runuser", "-u", "postgres", "--", f"{self.bindir}/pg_ctl", "-D",
                            str(self.folder / "data"), "-m", "immediate", "stop"],
                           capture_output=True, check=False, timeout=60)
            shutil.rmtree(self.folder, ignore_errors=True)


class ThrowawayRedis:
    """A ``redis-server`` of the test's own on a free port, without persistence.

    Restarting it empties it: every message it held is gone.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (empty) on :attr:`port`."""
        program = binary("redis-server")
        if program is None:
            missing("redis-server not found (apt-get install redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [program or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, process=self.process)

    def kill(self) -> None:
        """SIGKILL: every queued message is lost."""
        if self.process is not None:
            stop(self.process, signal.SIGKILL)

    def __enter__(self) -> ThrowawayRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and all its descendants at once (a process group's kill -9); their pids.

    Each is stopped first, so none can react (respawn a worker, finish a send) to another's
    death before it dies itself.
    """
    pids = process_tree(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for target in pids:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                continue
    return pids


def stop_group(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM a process started in a session of its own and its group; SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


# -- sending and checking ---------------------------------------------------------------------
def push_acknowledged(port: int, paths: Sequence[Path], *, timeout: float = 60.0,
                      acked: list[Path] | None = None) -> list[Path]:
    """Send `paths` (pynetdicom), re-sending what was not acknowledged, as a modality would.

    Returns the acknowledged files (also appended to `acked` as they are acknowledged, so
    another thread may watch the push). Stops re-sending after `timeout` seconds.
    """
    done: list[Path] = [] if acked is None else acked
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        todo = [p for p in paths if p not in done]
        if not todo:
            break
        pusher = Pusher(port, todo)
        pusher.acked = done  # the pusher appends to the caller's list as it goes
        pusher.run()
        if any(p not in done for p in paths):
            time.sleep(0.5)
    return list(done)


@dataclass(frozen=True)
class Received:
    """One file at the destination; an SR's findings (one per image) are counted."""

    sop_instance_uid: str
    study_instance_uid: str
    is_sr: bool
    findings: int
    mtime: float


def received_at(folder: Path) -> list[Received]:
    """Every complete DICOM file in a storescp folder (one entry per copy)."""
    found = []
    for path in folder.glob("*"):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            is_sr = str(ds.SOPClassUID) in SR_CLASSES
            found.append(Received(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), is_sr,
                                  len(summarize_sr(ds)) if is_sr else 0, path.stat().st_mtime))
        except Exception:  # a file storescp is still writing: read it next time
            continue
    return found


def images_per_study(acked: Sequence[Path]) -> dict[str, int]:
    """StudyInstanceUID -> how many of its images were acknowledged."""
    return dict(Counter(str(dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                        for p in acked))


def _missing(found: Sequence[Received], images: dict[str, int]) -> list[str]:
    """Studies without an SR covering all their images or without an SC per image."""
    scs: Counter[str] = Counter()
    covered: set[str] = set()
    for item in {i.sop_instance_uid: i for i in found}.values():
        if not item.is_sr:
            scs[item.study_instance_uid] += 1
        elif item.findings >= images.get(item.study_instance_uid, 0):
            covered.add(item.study_instance_uid)
    return [s for s, n in images.items() if s not in covered or scs[s] < n]


def all_delivered(folder: Path, images: dict[str, int]) -> list[Received] | None:
    """A ``wait_until`` predicate: each study has an SR over all its images, and its SCs."""
    found = received_at(folder)
    return None if _missing(found, images) else found


def wait_delivered(folder: Path, acked: Sequence[Path], timeout: float, what: str) -> None:
    """Block until every study of the `acked` files has all its results in `folder`."""
    images = images_per_study(acked)
    wait_until(lambda: all_delivered(folder, images), timeout, what)


@dataclass
class FaultFigures:
    """What one fault run measured (a row of the suite's report)."""

    fault: str
    studies: int
    acknowledged: int
    lost: int
    results: int
    duplicates: int
    reruns: int
    recovery_seconds: float
    in_flight: int | None = None
    notes: list[str] = field(default_factory=list)


def outbox_rows(db_url: str) -> list[OutboxItem]:
    """Every outbox row (a result object for a destination), oldest first."""
    db = Database(db_url)
    try:
        with db.sessions() as session:
            rows = [item for item, _ in outbox.list_outbox(session, order="asc",
                                                            limit=MAX_LIMIT)]
            session.expunge_all()
            return rows
    finally:
        db.dispose()


def lost_instances(db_url: str, store_root: Path, acked: Sequence[Path]) -> list[str]:
    """SOP Instance UIDs acknowledged to the sender but missing from the index or the store."""
    rows = indexed(db_url)
    lost = []
    for path in acked:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if uid not in rows or not (store_root / rows[uid]).is_file():
            lost.append(uid)
    return lost


def check(fault: str, *, db_url: str, store_root: Path, acked: Sequence[Path],
          destination: Path, fault_ended: float, report: list[FaultFigures],
          in_flight: int | None = None, reruns_allowed: bool = False) -> FaultFigures:
    """Assert nothing acknowledged was lost and every study got its results; the figures.

    Parameters
    ----------
    fault : str
        The fault's name in the report.
    db_url : str
        The index.
    store_root : Path
        ``storage.root``.
    acked : Sequence[Path]
        The files whose C-STORE was answered with success.
    destination : Path
        The storescp folder (:class:`ResultSCP`) after every result arrived.
    fault_ended : float
        ``time.time()`` when the fault ended (the peer or process was back).
    report : list of FaultFigures
        The session's report (``fault_report``): the figures are added before any assertion.
    in_flight : int, optional
        Result objects that were on their way when the fault hit: the most duplicates allowed
        (None: no duplicate allowed).
    reruns_allowed : bool
        A study may get a second, superseding SR (new UIDs; not a duplicate): its images
        arrived in two parts, around the fault (a late image re-runs the job).

    Returns
    -------
    FaultFigures
    """
    time.sleep(SETTLE_SECONDS)  # anything sent twice arrives now
    lost = lost_instances(db_url, store_root, acked)
    images = images_per_study(acked)
    found = received_at(destination)
    copies = Counter(item.sop_instance_uid for item in found)
    first_arrival: dict[str, float] = {}
    srs: dict[str, set[str]] = {}
    for item in found:
        first_arrival[item.sop_instance_uid] = min(item.mtime, first_arrival.get(
            item.sop_instance_uid, item.mtime))
        if item.is_sr:
            srs.setdefault(item.study_instance_uid, set()).add(item.sop_instance_uid)
    figures = FaultFigures(
        fault=fault, studies=len(images), acknowledged=len(acked), lost=len(lost),
        results=len(copies), duplicates=sum(n - 1 for n in copies.values()),
        reruns=sum(len(u) - 1 for u in srs.values()),
        recovery_seconds=round(max(max(first_arrival.values()) - fault_ended, 0.0), 1),
        in_flight=in_flight)
    report.append(figures)
    assert not lost, f"{len(lost)} acknowledged instance(s) lost: {lost[:5]}"
    assert not _missing(found, images), "a study without its SR over all images, or its SCs"
    assert set(srs) == set(images), "an SR for each study, and only for those"
    if not reruns_allowed:
        assert figures.reruns == 0, "each study gets exactly one SR (one SOP Instance UID)"
        assert len(copies) == sum(n + 1 for n in images.values()), "an SR and an SC per image"
    assert figures.duplicates <= (in_flight or 0), (
        f"{figures.duplicates} duplicate(s), {in_flight or 0} object(s) were in flight")
    return figures
