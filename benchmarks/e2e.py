"""End to end: from the last C-STORE of a study to its SR arriving at the destination.

Latency (``latency`` mode): 1-image CR studies are pushed one at a time (each SR is awaited
before the next study goes out) to a service with one local worker on SQLite, after one warm-up
study. Each study's time from the end of the client's C-STORE (``time.time()`` after the
association was released) to the SR written by the stand-in PACS (``time.time()`` in its store
handler) is split with the database timestamps of the study, its ``study.complete`` event and
its job, the job's own stage timings and the start of the outbox's C-STORE:

* ``quiet_completion``: last C-STORE -> ``study.complete`` event (the quiet period plus the
  completion monitor's poll);
* ``routing``: event -> job dispatched (scheduler wake, routing, job row);
* ``queue``: dispatched -> claimed by a worker;
* ``load``, ``preprocess``, ``inference`` (the forward pass), ``explain`` (Grad-CAM),
  ``findings``, ``report`` (SR and heat-map SC built and written): the job's ``timings``;
* ``job_other``: claimed -> finished minus those stages (claim commit, model lookup, queries);
* ``commit_pickup``: job finished -> outbox starts its C-STORE (result commit, wake, claim);
* ``transfer``: outbox C-STORE start -> SR stored at the destination (the heat-map SC goes
  first on the same association).

The key figure is total minus the configured quiet period minus the forward pass (target
< 0.3 s). Throughput (``local-1``, ``local-2``, ``celery-2``): ``--studies`` studies pushed on
one association, studies/minute from the end of that push to the last SR received, with the
local pool at 1 and 2 processes (SQLite), and with 2 ``dicom-ai worker --concurrency 1``
processes on Redis with PostgreSQL (skipped, with the reason in the JSON, when either is down).

Run: ``.venv/bin/python -m benchmarks.e2e [--studies 30] [--latency-studies 10]
[--modes latency,local-1,local-2,celery-2] [--out FILE]``. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from pynetdicom.events import Event as NetEvent
from sqlalchemy import select

from dicom_ai.config import Settings, load_settings
from dicom_ai.dispatch import delivery
from dicom_ai.network.scu import FileToSend, Peer, SendReport, echo, inspect, send_files
from dicom_ai.network.standin import StandInPacs
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage.db import Database
from storage.models import Event, Job, Study
from storage.repository import STUDY_COMPLETE
from tests.peers import port_open, settings_toml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # inherited by the worker processes

TARGET_SECONDS = 0.3
MODES = ("latency", "local-1", "local-2", "celery-2")
QUIET_SECONDS = 0.5
REDIS_URL = "redis://127.0.0.1:6379/15"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
REPO = Path(__file__).resolve().parent.parent
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}
JOB_STAGES = ("load", "preprocess", "inference", "explain", "findings", "report")
STAGES = ("quiet_completion", "routing", "queue", *JOB_STAGES, "job_other", "commit_pickup",
          "transfer")


# -- the destination, timed ----------------------------------------------------------------------
@dataclass
class Arrival:
    """One object stored by the timed stand-in PACS."""

    study_instance_uid: str
    sop_instance_uid: str
    kind: str  # "sr" or "other"
    started: float  # time.time() when the store handler began
    stored: float  # time.time() once the file is written (just before the success status)


class TimedPacs(StandInPacs):
    """The stand-in PACS, recording when each object arrived; waits for SRs of studies."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.arrivals: list[Arrival] = []
        self._arrived = threading.Condition()

    def _on_store(self, event: NetEvent) -> int:
        started = time.time()
        status = super()._on_store(event)
        stored = time.time()
        ds = event.dataset
        kind = "sr" if str(ds.SOPClassUID) in SR_CLASSES else "other"
        with self._arrived:
            self.arrivals.append(Arrival(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), kind,
                                         started, stored))
            self._arrived.notify_all()
        return status

    def first(self, kind: str) -> dict[str, Arrival]:
        """The first object of `kind` (``"sr"`` or ``"other"``) received per study."""
        with self._arrived:
            found: dict[str, Arrival] = {}
            for a in self.arrivals:
                if a.kind == kind:
                    found.setdefault(a.study_instance_uid, a)
            return found

    def wait_for(self, studies: set[str], timeout: float) -> dict[str, Arrival]:
        """Block until an SR of every study in `studies` arrived (or raise after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                found = {a.study_instance_uid: a for a in reversed(self.arrivals)
                         if a.kind == "sr" and a.study_instance_uid in studies}
                if len(found) == len(studies):
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(studies) - len(found)} of {len(studies)} SRs "
                                       f"not received in {timeout:.0f} s")
                self._arrived.wait(left)


# -- when the outbox starts each C-STORE (instrumentation only; behaviour unchanged) -------------
@dataclass
class SendCall:
    """One association the outbox opened: when, and the result files it carried."""

    started: float
    sop_instance_uids: list[str]


@contextmanager
def timed_outbox() -> Iterator[list[SendCall]]:
    """Record the start of every outbox send (``delivery.send_files``) in this process."""
    calls: list[SendCall] = []
    original = send_files  # what the outbox module calls

    def wrapper(files: list[FileToSend], peer: Peer, settings: Any,
                progress: Callable[[FileToSend, str], None] | None = None,
                **options: Any) -> SendReport:
        # ``options``: whatever else the outbox passes (``commitment`` since issue 19).
        calls.append(SendCall(time.time(), [f.path.stem for f in files]))
        return original(files, peer, settings, progress, **options)

    with mock.patch.object(delivery, "send_files", wrapper):
        yield calls


# -- data ---------------------------------------------------------------------------------------
@dataclass
class StudyFiles:
    """One synthetic study: its UID and files."""

    study_instance_uid: str
    files: list[FileToSend]


def make_studies(folder: Path, count: int, seed: int) -> list[StudyFiles]:
    """`count` 1-image CR studies (uncompressed), in labels.csv order."""
    synthesize(folder, studies=count, seed=seed, modality="CR", positive_fraction=0.5,
               difficulty=0.3, compress=False)
    with (folder / "labels.csv").open() as fh:
        uids = list(dict.fromkeys(row["StudyInstanceUID"] for row in csv.DictReader(fh)))
    studies = []
    for uid in uids:
        files = [f for f in (inspect(p) for p in sorted((folder / uid).rglob("*.dcm")))
                 if f is not None]
        studies.append(StudyFiles(uid, files))
    return studies


# -- one running service -------------------------------------------------------------------------
def settings_for(work: Path, pacs: TimedPacs, *, database_url: str | None = None,
                 workers: dict[str, Any]) -> Settings:
    """Loopback service settings with short quiet periods and polls (as the benchmark runs)."""
    assert pacs.address is not None
    return load_settings(
        None,
        dicom={"host": "127.0.0.1", "port": 0, "receivers": 1},
        storage={"root": work / "store", "database_url": database_url, "min_free_bytes": 0},
        completion={"series_quiet_seconds": QUIET_SECONDS, "study_quiet_seconds": QUIET_SECONDS,
                    "poll_seconds": 0.05},
        workers={"poll_seconds": 0.1, "lease_seconds": 120, **workers},
        delivery={"poll_seconds": 0.1, "retry_initial_seconds": 0.5},
        logging={"level": "INFO"},  # worker processes log to the mode's log file
        api={"enabled": False},
        destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": pacs.address[0],
                       "port": pacs.address[1]}],
        routes=[{"name": "chest-xray", "match": {"Modality": ["CR", "DX"]},
                 "model": "chest-nodule", "destinations": ["pacs"], "send_heatmap": True}],
    )


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Point file descriptor 2 at `path` (processes spawned meanwhile keep writing there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as fh:
        os.dup2(fh.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def pids_logging(logs: list[Path], pattern: str) -> set[str]:
    """Process ids whose log lines (``[pid]``) match `pattern`."""
    found: set[str] = set()
    regex = re.compile(r"\[(\d+)\] \S+: " + pattern)
    for log in logs:
        if log.exists():
            found |= {m.group(1) for m in regex.finditer(log.read_text(errors="replace"))}
    return found


def wait_loaded(logs: list[Path], workers: int, timeout: float,
                alive: Callable[[], None] = lambda: None) -> float:
    """Wait until `workers` processes logged that they loaded the model; returns seconds."""
    started = time.monotonic()
    while len(pids_logging(logs, r"loaded ")) < workers:
        alive()
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"workers did not load the model in {timeout:.0f} s; see {logs}")
        time.sleep(0.2)
    return time.monotonic() - started


def push(service: Service, settings: Settings, files: list[FileToSend]) -> float:
    """C-STORE `files` on one association; returns time.time() once it was released."""
    assert service.address is not None
    report = send_files(files, Peer(settings.dicom.ae_title, *service.address), settings.dicom)
    ended = time.time()
    if not report.ok:
        raise RuntimeError(f"pushing failed: {report.failures[:3]}")
    return ended


def warm_up(service: Service, settings: Settings, pacs: TimedPacs, warm: list[StudyFiles],
            logs: list[Path], workers: int, pushed: list[float] | None = None) -> int:
    """Push warm-up studies, `workers` at a time, until every worker has run a job."""
    used = 0
    while used < len(warm):
        batch = warm[used:used + workers]
        used += len(batch)
        ended = push(service, settings, [f for s in batch for f in s.files])
        if pushed is not None:
            pushed.append(ended)
        pacs.wait_for({s.study_instance_uid for s in batch}, timeout=180)
        if len(pids_logging(logs, r"job \d+ done")) >= workers:
            break
    return used


# -- numbers from the database ------------------------------------------------------------------
def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def breakdown(db_url: str, uids: list[str], pushed: dict[str, float], pacs: TimedPacs,
              calls: list[SendCall]) -> list[dict[str, Any]]:
    """Per study: raw timestamps and the stage split (seconds)."""
    srs = pacs.first("sr")
    scs = pacs.first("other")
    db = Database(db_url)
    rows: list[dict[str, Any]] = []
    try:
        with db.sessions() as session:
            for uid in uids:
                study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
                event = session.scalars(select(Event).where(
                    Event.study_instance_uid == uid, Event.kind == STUDY_COMPLETE)
                    .order_by(Event.id)).first()
                job = session.scalars(select(Job).where(Job.study_instance_uid == uid)
                                      .order_by(Job.id)).first()
                sr = srs[uid]
                sc = scs.get(uid)
                send = next((c for c in calls if sr.sop_instance_uid in c.sop_instance_uids),
                            None)
                raw = {
                    "push_ended": pushed[uid],
                    "last_received_at": _ts(study.last_received_at),
                    "event_created_at": _ts(event.created_at) if event else None,
                    "job_created_at": _ts(job.created_at) if job else None,
                    "job_dispatched_at": _ts(job.dispatched_at) if job else None,
                    "job_started_at": _ts(job.started_at) if job else None,
                    "job_finished_at": _ts(job.finished_at) if job else None,
                    "job_attempts": job.attempts if job else None,
                    "outbox_send_started": send.started if send else None,
                    "outbox_send_files": len(send.sop_instance_uids) if send else None,
                    "sc_stored": sc.stored if sc else None,
                    "sr_handler_started": sr.started,
                    "sr_stored": sr.stored,
                }
                timings = dict(job.timings) if job else {}
                rows.append({"study_instance_uid": uid, "raw": raw, "job_timings": timings,
                             **split(raw, timings)})
    finally:
        db.dispose()
    return rows


def split(raw: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The stage split of one study; None where a timestamp is missing."""
    def gap(a: str, b: str) -> float | None:
        return None if raw[a] is None or raw[b] is None else float(raw[b] - raw[a])

    stages: dict[str, float | None] = {
        "quiet_completion": gap("push_ended", "event_created_at"),
        "routing": gap("event_created_at", "job_dispatched_at"),
        "queue": gap("job_dispatched_at", "job_started_at"),
        **{name: timings.get(name) for name in JOB_STAGES},
    }
    run = gap("job_started_at", "job_finished_at")
    stages["job_other"] = (None if run is None
                           else run - sum(timings.get(n, 0.0) for n in JOB_STAGES))
    stages["commit_pickup"] = gap("job_finished_at", "outbox_send_started")
    stages["transfer"] = gap("outbox_send_started", "sr_stored")
    # The outbox sends the heat-map SC first, then the SR, on one association.
    transfer_detail = {"start_to_sc_stored": gap("outbox_send_started", "sc_stored"),
                       "sc_stored_to_sr_stored": gap("sc_stored", "sr_stored")}
    total = float(raw["sr_stored"] - raw["push_ended"])
    inference = timings.get("inference", 0.0)
    overshoot = gap("last_received_at", "event_created_at")
    return {
        "stages": stages,
        "transfer_detail": transfer_detail,
        "total": total,
        # The target's figure: everything but the configured quiet period and the forward pass.
        "overhead": total - QUIET_SECONDS - inference,
        # The same without the completion stage at all (its poll granularity forgiven too).
        "overhead_after_completion": (None if stages["quiet_completion"] is None
                                      else total - stages["quiet_completion"] - inference),
        "completion_overshoot": None if overshoot is None else overshoot - QUIET_SECONDS,
    }


def stats(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median and p90 (seconds, rounded to 0.1 ms) of the values that are present."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "p90": None, "n": 0}
    return {"median": round(statistics.median(present), 4),
            "p90": round(float(np.percentile(present, 90)), 4), "n": len(present)}


# -- modes --------------------------------------------------------------------------------------
def run_latency(work: Path, warm: list[StudyFiles], studies: list[StudyFiles]) -> dict[str, Any]:
    """One worker, SQLite, studies one at a time."""
    pacs = TimedPacs(work / "pacs")
    pacs.start()
    settings = settings_for(work, pacs, workers={"backend": "local", "processes": 1})
    log = work / "service.log"
    service = Service(settings)
    pushed: dict[str, float] = {}
    try:
        with timed_outbox() as calls:
            with stderr_to(log):
                service.start()
            load_s = wait_loaded([log], 1, timeout=180)
            warm_pushed: list[float] = []
            warm_up(service, settings, pacs, warm[:1], [log], 1, warm_pushed)
            time.sleep(0.3)
            for study in studies:
                pushed[study.study_instance_uid] = push(service, settings, study.files)
                pacs.wait_for({study.study_instance_uid}, timeout=120)
                time.sleep(0.3)  # let the outbox mark it sent before the next study
            association_s = association_seconds(settings, pacs)
            first = warm[0].study_instance_uid
            warm_rows = breakdown(settings.storage.url, [first], {first: warm_pushed[0]}, pacs,
                                  list(calls))
            rows = breakdown(settings.storage.url, [s.study_instance_uid for s in studies],
                             pushed, pacs, list(calls))
    finally:
        service.stop()
        pacs.stop()
    summary: dict[str, Any] = {
        "stages": {name: stats([r["stages"][name] for r in rows]) for name in STAGES},
        "total": stats([r["total"] for r in rows]),
        "overhead": stats([r["overhead"] for r in rows]),
        "overhead_after_completion": stats([r["overhead_after_completion"] for r in rows]),
        "completion_overshoot": stats([r["completion_overshoot"] for r in rows]),
        "transfer_detail": {name: stats([r["transfer_detail"][name] for r in rows])
                            for name in rows[0]["transfer_detail"]},
        "reference_association_echo_release": stats(association_s),
    }
    median_overhead = summary["overhead"]["median"]
    return {
        "database": "sqlite",
        "workers": "local pool, 1 process",
        "quiet_seconds": QUIET_SECONDS,
        "worker_start_seconds": round(load_s, 2),
        "first_study_after_start": warm_rows[0],
        "studies": rows,
        "summary": summary,
        "key_figure": {
            "definition": "total - configured quiet period - forward pass (inference)",
            "median": median_overhead,
            "p90": summary["overhead"]["p90"],
            "target": TARGET_SECONDS,
            "meets_target": median_overhead is not None and median_overhead < TARGET_SECONDS,
        },
    }


def measure_throughput(service: Service, settings: Settings, pacs: TimedPacs,
                       studies: list[StudyFiles], calls: list[SendCall]) -> dict[str, Any]:
    """Push every study on one association; studies/minute until the last SR."""
    uids = {s.study_instance_uid for s in studies}
    ended = push(service, settings, [f for s in studies for f in s.files])
    srs = pacs.wait_for(uids, timeout=600)
    last = max(a.stored for a in srs.values())
    elapsed = last - ended
    rows = breakdown(settings.storage.url, sorted(uids), dict.fromkeys(uids, ended), pacs,
                     calls)
    return {
        "studies": len(studies),
        "seconds": round(elapsed, 3),
        "studies_per_minute": round(60 * len(studies) / elapsed, 1),
        "first_sr_seconds": round(min(a.stored for a in srs.values()) - ended, 3),
        "job_stages": {name: stats([r["stages"][name] for r in rows])
                       for name in (*JOB_STAGES, "queue", "commit_pickup")},
        "outbox_associations": len(calls),
        "per_study": rows,
    }


def run_local(work: Path, processes: int, warm: list[StudyFiles],
              studies: list[StudyFiles]) -> dict[str, Any]:
    """The local pool with `processes` workers, SQLite."""
    pacs = TimedPacs(work / "pacs")
    pacs.start()
    settings = settings_for(work, pacs, workers={"backend": "local", "processes": processes})
    log = work / "service.log"
    service = Service(settings)
    try:
        with timed_outbox() as calls:
            with stderr_to(log):
                service.start()
            load_s = wait_loaded([log], processes, timeout=240)
            warmed = warm_up(service, settings, pacs, warm, [log], processes)
            calls.clear()
            result = measure_throughput(service, settings, pacs, studies, calls)
    finally:
        service.stop()
        pacs.stop()
    return {"database": "sqlite", "workers": f"local pool, {processes} process(es)",
            "worker_start_seconds": round(load_s, 2), "warm_up_studies": warmed, **result}


def association_seconds(settings: Settings, pacs: TimedPacs, rounds: int = 5) -> list[float]:
    """Reference: seconds for our SCU to associate, C-ECHO and release with the stand-in PACS."""
    assert pacs.address is not None
    peer = Peer(pacs.ae_title, *pacs.address)
    found: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        echo(peer, settings.dicom)
        found.append(time.perf_counter() - started)
    return found


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); its SQLAlchemy URL."""
    import psycopg

    name = f"dicom_ai_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def celery_unavailable() -> str | None:
    """Why the Celery mode cannot run here, or None."""
    if not port_open(6379):
        return f"Redis broker {REDIS_URL} not reachable"
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            pass
    except Exception as exc:  # any failure to connect means: skip this mode
        return f"PostgreSQL not reachable at {PG_ADMIN}: {exc}"
    return None


def run_celery(work: Path, workers: int, warm: list[StudyFiles],
               studies: list[StudyFiles]) -> dict[str, Any]:
    """Serve publishes to Redis; `workers` ``dicom-ai worker --concurrency 1`` run the jobs."""
    reason = celery_unavailable()
    if reason is not None:
        return {"skipped": reason}
    pacs = TimedPacs(work / "pacs")
    pacs.start()
    with postgres_database() as url:
        settings = settings_for(work, pacs, database_url=url, workers={
            "backend": "celery", "broker_url": REDIS_URL,
            "queue": f"dicom-ai-e2e-{uuid.uuid4().hex[:8]}"})
        config = work / "worker.toml"
        config.write_text(settings_toml(settings))
        service = Service(settings)
        procs: list[subprocess.Popen[bytes]] = []
        logs = [work / f"worker-{i}.log" for i in range(workers)]
        try:
            with timed_outbox() as calls:
                service.start()  # migrates the database before the workers start
                env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
                for log in logs:
                    with log.open("wb") as fh:
                        procs.append(subprocess.Popen(
                            [sys.executable, "-m", "dicom_ai.cli", "worker", "--config",
                             str(config), "--concurrency", "1"],
                            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT))

                def alive() -> None:
                    for proc, log in zip(procs, logs, strict=True):
                        if proc.poll() is not None:
                            raise RuntimeError(f"worker exited: {log.read_text()[-2000:]}")

                load_s = wait_loaded(logs, workers, timeout=240, alive=alive)
                warmed = warm_up(service, settings, pacs, warm, logs, workers)
                calls.clear()
                result = measure_throughput(service, settings, pacs, studies, calls)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            service.stop()
            pacs.stop()
    return {"database": "postgresql", "broker": REDIS_URL,
            "workers": f"{workers} x dicom-ai worker --concurrency 1",
            "worker_start_seconds": round(load_s, 2), "warm_up_studies": warmed, **result}


# -- main -----------------------------------------------------------------------------------------
def print_table(report: dict[str, Any]) -> None:
    """The short human summary."""
    latency = report.get("latency")
    if latency:
        print("| stage | median ms | p90 ms |")
        print("|---|---|---|")
        for name in STAGES:
            s = latency["summary"]["stages"][name]
            if s["median"] is not None:
                print(f"| {name} | {1000 * s['median']:.1f} | {1000 * s['p90']:.1f} |")
        for name in ("total", "overhead"):
            s = latency["summary"][name]
            print(f"| **{name}** | {1000 * s['median']:.1f} | {1000 * s['p90']:.1f} |")
        key = latency["key_figure"]
        verdict = "met" if key["meets_target"] else "missed"
        print(f"\nkey figure (total - {QUIET_SECONDS} s quiet - forward pass): median "
              f"{1000 * key['median']:.0f} ms, p90 {1000 * key['p90']:.0f} ms "
              f"(target < {1000 * TARGET_SECONDS:.0f} ms: {verdict})")
        detail = latency["summary"]["transfer_detail"]
        ref = latency["summary"]["reference_association_echo_release"]
        to_sc = 1000 * detail["start_to_sc_stored"]["median"]
        sc_to_sr = 1000 * detail["sc_stored_to_sr_stored"]["median"]
        print(f"transfer: outbox start -> SC stored {to_sc:.0f} ms, SC stored -> SR stored "
              f"{sc_to_sr:.0f} ms; reference associate + C-ECHO + release "
              f"{1000 * ref['median']:.0f} ms")
        first = latency["first_study_after_start"]
        print(f"first study after the worker started: total {first['total']:.2f} s "
              f"(explain {first['job_timings'].get('explain', 0.0):.2f} s, "
              f"report {first['job_timings'].get('report', 0.0):.2f} s)")
    throughput = report.get("throughput", {})
    if throughput:
        print("\n| mode | workers | database | studies | seconds | studies/min | first SR s |")
        print("|---|---|---|---|---|---|---|")
        for mode, r in throughput.items():
            if "skipped" in r:
                print(f"| {mode} | skipped: {r['skipped']} | | | | | |")
                continue
            print(f"| {mode} | {r['workers']} | {r['database']} | {r['studies']} | "
                  f"{r['seconds']:.1f} | {r['studies_per_minute']:.1f} | "
                  f"{r['first_sr_seconds']:.2f} |")


def main() -> None:
    """Run the selected modes; write JSON and print a table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--studies", type=int, default=30, help="studies per throughput mode")
    parser.add_argument("--latency-studies", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/e2e.json")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {','.join(MODES)}")

    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "e2e",
        "image": "CR, 1 image per study, synthetic (dicom_ai.training.synth), uncompressed",
        "model": "chest-nodule (bundled), Grad-CAM on, SR + heat-map SC to one destination",
        "settings": {"series_and_study_quiet_seconds": QUIET_SECONDS,
                     "completion_poll_seconds": 0.05, "workers_poll_seconds": 0.1,
                     "delivery_poll_seconds": 0.1},
        "target_seconds": TARGET_SECONDS,
        "machine": {"cpus": os.cpu_count() or 0, "python": platform.python_version(),
                    # Other load on a shared machine skews everything: record it.
                    "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "modes": modes,
    }
    with tempfile.TemporaryDirectory(prefix="dicom-ai-e2e-") as tmp:
        work = Path(tmp)
        warm = make_studies(work / "warm", 4, args.seed + 1000)
        if "latency" in modes:
            studies = make_studies(work / "latency-studies", args.latency_studies, args.seed)
            report["latency"] = run_latency(work / "latency", warm, studies)
        throughput: dict[str, Any] = {}
        if any(m != "latency" for m in modes):
            studies = make_studies(work / "throughput-studies", args.studies, args.seed + 1)
            for mode in modes:
                if mode in ("local-1", "local-2"):
                    throughput[mode] = run_local(work / mode, int(mode[-1]), warm, studies)
                elif mode == "celery-2":
                    throughput[mode] = run_celery(work / mode, 2, warm, studies)
            report["throughput"] = throughput
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)\n")
    print_table(report)


if __name__ == "__main__":
    main()
