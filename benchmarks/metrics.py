"""``/metrics`` at 1M instance rows on PostgreSQL, before (COUNT/SUM of ``instances``) and after
(running totals, migration 0012); and what the totals' triggers cost ingest.

Seeds a throwaway PostgreSQL database with ``INSERT ... SELECT generate_series`` (10,000 studies
of one series and 100 instances each, a job per study), ``VACUUM ANALYZE`` (the COUNT gets its best
case: an index-only scan), then in one run, interleaved:

* the instance figures alone: ``COUNT(*)``/``SUM`` of ``instances`` vs
  :func:`storage.metrics.instance_totals`;
* :func:`storage.metrics.metrics_snapshot` and ``GET /metrics`` on a real uvicorn, with the
  instance figures read by COUNT (``before``: the function of the code before 0012) and by the
  totals (``after``);
* ``EXPLAIN ANALYZE`` of every query ``metrics_snapshot`` runs (what else grows with the store).

Then ingest: ``index_instance`` through the receiver's path (``Database.raw_write``), N fresh
instances per round, on SQLite and PostgreSQL, into a schema at 0011 (``before``: no totals)
and one at head (``after``: triggers), rounds interleaved; on PostgreSQL also 4 writer threads
at once (concurrent receivers: their totals rows must not serialise them), and both again with
``synchronous_commit = off`` (the statements' cost without the commit's WAL flush). The
databases are dropped afterwards.

    .venv/bin/python -m benchmarks.metrics [--server postgresql+psycopg://postgres@127.0.0.1:5432]
        [--instances 1000000] [--ingest 1000] [--out benchmarks/results/metrics.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session

from benchmarks.api import FIX_SEQUENCES, SEED
from dicom_ai.api.server import ApiServer
from dicom_ai.config import load_settings
from storage import apikeys, repository
from storage import metrics as storage_metrics
from storage.db import Database, alembic_config
from storage.models import Instance

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def count_instances(session: Session, *, fold: bool = True) -> tuple[int, int]:
    """The instance figures as the code before migration 0012 read them (a full scan)."""
    count, total = session.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))).one()
    return int(count), int(total)


@contextmanager
def counting(before: bool) -> Iterator[None]:
    """Make ``metrics_snapshot`` read the instance figures by COUNT (`before`) or totals."""
    original = storage_metrics.instance_totals
    if before:
        storage_metrics.instance_totals = count_instances
    try:
        yield
    finally:
        storage_metrics.instance_totals = original


def paired(call: Callable[[bool], object], runs: int) -> dict[str, float]:
    """Median ms of ``call(True)`` (before) and ``call(False)`` (after), calls alternated so
    that a change in the machine's load falls on both."""
    call(True)
    call(False)
    samples: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(runs):
        for before in (True, False):
            started = time.perf_counter()
            call(before)
            samples[before].append(time.perf_counter() - started)
    return {"before": round(statistics.median(samples[True]) * 1000, 2),
            "after": round(statistics.median(samples[False]) * 1000, 2)}


@contextmanager
def pg_database(server: str, prefix: str, *, synchronous_commit: bool = True) -> Iterator[str]:
    """A throwaway PostgreSQL database (its SQLAlchemy URL), dropped on exit."""
    admin = server.replace("postgresql+psycopg://", "postgresql://")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        if not synchronous_commit:
            conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(admin + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(url: str, revision: str) -> Database:
    """A database at `revision` ("head" or e.g. "0011")."""
    from alembic import command

    db = Database(url)
    cfg = alembic_config(url)
    with db.engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
    return db


def scrape(server: str, instances: int, runs: int) -> dict[str, Any]:
    """Time ``/metrics`` on an empty index, then seed `instances` rows and time the instance
    figures, the snapshot and ``/metrics``, each before (COUNT) and after (totals)."""
    studies = max(1, instances // 100)
    # One job per study (a study routed to one model); findings are not read by the scrape.
    report: dict[str, Any] = {"instances": instances, "studies": studies, "jobs": studies}
    with pg_database(server, "bench_metrics") as url, tempfile.TemporaryDirectory() as root:
        db = Database(url)
        db.upgrade()
        with db.write_session() as session:
            token = apikeys.create_key(session, name="bench", role="read",
                                       now=datetime.now(UTC)).token
        settings = load_settings(None, api={"port": 0},
                                 storage={"root": Path(root), "database_url": url})

        def get_timings() -> dict[str, float]:
            # A server started now: the seeded jobs finished before it, so its latency
            # histogram does not read them (only jobs finished while it runs).
            api = ApiServer(settings, db)
            host, port = api.start()
            try:
                with httpx.Client(base_url=f"http://{host}:{port}", timeout=120,
                                  headers={"Authorization": f"Bearer {token}"}) as client:
                    def get(before: bool) -> None:
                        with counting(before):
                            answer = client.get("/metrics")
                        assert answer.status_code == 200
                        assert "\ndicom_ai_instances " in answer.text

                    return paired(get, runs)
            finally:
                api.stop()

        def figures(before: bool) -> None:
            with db.sessions() as session:
                (count_instances if before else storage_metrics.instance_totals)(session)

        def snapshot(before: bool) -> None:
            with counting(before), db.sessions() as session:
                storage_metrics.metrics_snapshot(session, now=datetime.now(UTC))

        timings: dict[str, dict[str, float]] = {"GET /metrics, empty index": get_timings()}
        admin = url.replace("postgresql+psycopg://", "postgresql://")
        started = time.perf_counter()
        with psycopg.connect(admin, autocommit=True) as conn:
            for statement in SEED[:5]:  # patients, studies, series, instances, jobs
                conn.execute(statement.format(studies=studies, per_series=100,
                                              instances=instances, jobs=studies,
                                              findings=0))
            for table in ("patients", "studies", "series", "instances", "jobs"):
                conn.execute(FIX_SEQUENCES[0].format(t=table))
            report["seed_seconds"] = round(time.perf_counter() - started, 1)
            conn.execute("VACUUM ANALYZE")
        with db.sessions() as session:
            counted = count_instances(session)
            totals = storage_metrics.instance_totals(session)
        assert counted == totals, (counted, totals)
        report["totals_equal_count"] = True
        timings["instance figures"] = paired(figures, runs)
        timings["metrics_snapshot"] = paired(snapshot, runs)
        timings["GET /metrics"] = get_timings()
        report["median_ms"] = timings
        report["explain"] = explain_snapshot(db)
        db.dispose()
    return report


def explain_snapshot(db: Database) -> dict[str, dict[str, Any]]:
    """``EXPLAIN ANALYZE`` of every statement ``metrics_snapshot`` runs: time and scans."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        with db.sessions() as session:
            storage_metrics.metrics_snapshot(session, now=datetime.now(UTC))
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)
    plans: dict[str, dict[str, Any]] = {}
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for statement, parameters in statements:
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
            row = cursor.fetchone()
            assert row is not None
            plan = row[0][0]
            scans: list[str] = []

            def walk(node: dict[str, Any], found: list[str] = scans) -> None:
                if "Scan" in node["Node Type"]:
                    found.append(f"{node['Node Type']} on {node.get('Relation Name', '?')} "
                                 f"({node.get('Actual Rows', 0)} rows)")
                for child in node.get("Plans", []):
                    walk(child)

            walk(plan["Plan"])
            key = " ".join(statement.split())[:90]
            plans[key] = {"ms": round(plan["Execution Time"], 2), "scans": scans}
        raw.rollback()
    finally:
        raw.close()
    return plans


def _record(tag: str, n: int) -> repository.InstanceRecord:
    study = f"2.25.{tag}.{n // 100}"
    return repository.InstanceRecord(
        study_instance_uid=study, series_instance_uid=study + ".1",
        sop_instance_uid=f"{study}.1.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id=f"P{tag}.{n // 100}",
        modality="CT")


def ingest_round(db: Database, tag: str, n: int, threads: int = 1) -> float:
    """Microseconds per instance to index `n` fresh instances the receiver's way."""
    def work(part: int) -> None:
        for i in range(part, n, threads):
            with db.raw_write() as transaction:
                repository.index_instance(
                    transaction, _record(f"{tag}.{part}", i), path=f"instances/{tag}/{i}.dcm",
                    size_bytes=500_000 + i, calling_ae_title="BENCH", now=datetime.now(UTC),
                    replace=False)

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - started) / n * 1e6


def ingest(server: str, n: int, rounds: int) -> dict[str, Any]:
    """index_instance per instance, before (schema 0011) and after (head), interleaved.

    ``postgresql nosync`` runs with ``synchronous_commit = off``: without the WAL flush of each
    commit (most of a durable commit's time, and its noise on a shared disk) what is left is
    the statements' own cost, the triggers' included.
    """
    report: dict[str, Any] = {"instances_per_round": n, "rounds": rounds}
    with tempfile.TemporaryDirectory() as folder, \
            pg_database(server, "bench_ingest_before") as pg_before, \
            pg_database(server, "bench_ingest_after") as pg_after, \
            pg_database(server, "bench_nosync_before", synchronous_commit=False) as ns_before, \
            pg_database(server, "bench_nosync_after", synchronous_commit=False) as ns_after:
        setups = {
            "sqlite": {"before": migrate(f"sqlite:///{folder}/before.sqlite3", "0011"),
                       "after": migrate(f"sqlite:///{folder}/after.sqlite3", "head")},
            "postgresql": {"before": migrate(pg_before, "0011"),
                           "after": migrate(pg_after, "head")},
            "postgresql nosync": {"before": migrate(ns_before, "0011"),
                                  "after": migrate(ns_after, "head")},
        }
        modes = [("sqlite", 1), ("postgresql", 1), ("postgresql", 4),
                 ("postgresql nosync", 1), ("postgresql nosync", 4)]
        samples: dict[str, dict[str, list[float]]] = {
            f"{backend} x{threads}": {"before": [], "after": []} for backend, threads in modes}
        for r in range(rounds):
            for backend, threads in modes:
                for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    us = ingest_round(setups[backend][side], f"{r}.{threads}", n, threads)
                    samples[f"{backend} x{threads}"][side].append(us)
        with setups["postgresql"]["after"].sessions() as session:
            shards = session.scalar(text("SELECT count(*) FROM instance_totals"))
            assert storage_metrics.instance_totals(session) == count_instances(session)
        report["postgresql_totals_rows"] = int(shards or 0)
        report["us_per_instance_median"] = {
            mode: {side: round(statistics.median(v), 1) for side, v in sides.items()}
            for mode, sides in samples.items()}
        report["us_per_instance_best"] = {
            mode: {side: round(min(v), 1) for side, v in sides.items()}
            for mode, sides in samples.items()}
        for sides in setups.values():
            for db in sides.values():
                db.dispose()
    return report


_ONE_INSERT = (
    "INSERT INTO instances (sop_instance_uid, series_pk, sop_class_uid, transfer_syntax_uid,"
    " instance_number, path, size_bytes, calling_ae_title, received_at)"
    " VALUES ({uid}, {series}, '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', 1,"
    " 'instances/x.dcm', 524288, 'BENCH', {now})"
    " ON CONFLICT (sop_instance_uid) DO NOTHING"
)
# Each iteration its own transaction (COMMIT in a DO block), timed by the server: the insert's
# cost with and without the totals triggers, with nothing of the client or the network in it.
_PG_LOOP = (
    "DO $$ BEGIN FOR i IN 1..{n} LOOP "
    + _ONE_INSERT.format(uid="'2.25.{tag}.' || (i % {distinct})", series="{series}",
                         now="now()")
    + "; COMMIT; END LOOP; END $$"
)


def statement_cost(server: str, n: int, rounds: int) -> dict[str, Any]:
    """Microseconds per single-row instance insert, each committed, before/after, best round.

    PostgreSQL: a server-side loop (``synchronous_commit = off``: no WAL flush in it); SQLite:
    the sqlite3 module in WAL mode, ``synchronous=NORMAL`` as the service runs it. New rows,
    then the same rows again (duplicates: ``ON CONFLICT DO NOTHING`` inserts nothing).
    """
    import sqlite3

    report: dict[str, Any] = {"inserts_per_round": n, "rounds": rounds}
    best: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder, \
            pg_database(server, "bench_stmt_before", synchronous_commit=False) as pg_before, \
            pg_database(server, "bench_stmt_after", synchronous_commit=False) as pg_after:
        targets: dict[str, dict[str, Any]] = {"postgresql": {}, "sqlite": {}}
        for side, url in (("before", pg_before), ("after", pg_after)):
            db = migrate(url, "0011" if side == "before" else "head")
            ingest_round(db, "seed", 1)  # a patient, study and series (id 1)
            db.dispose()
            conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                                   autocommit=True)
            targets["postgresql"][side] = conn
            path = f"{folder}/{side}.sqlite3"
            db = migrate(f"sqlite:///{path}", "0011" if side == "before" else "head")
            ingest_round(db, "seed", 1)
            db.dispose()
            lite = sqlite3.connect(path, isolation_level=None)
            lite.execute("PRAGMA synchronous=NORMAL")
            targets["sqlite"][side] = lite
        for r in range(rounds):
            for backend in ("postgresql", "sqlite"):
                for kind, tag in (("new", f"{r}"), ("duplicate", f"{r}")):
                    for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                        conn = targets[backend][side]
                        started = time.perf_counter()
                        if backend == "postgresql":
                            conn.execute(_PG_LOOP.format(n=n, tag=tag, distinct=n, series=1))
                        else:
                            sql = _ONE_INSERT.format(uid="?", series=1, now="'2026-01-01'")
                            for i in range(n):
                                conn.execute("BEGIN")
                                conn.execute(sql, (f"2.25.{tag}.{i}",))
                                conn.execute("COMMIT")
                        us = (time.perf_counter() - started) / n * 1e6
                        key = f"{backend} {kind}"
                        slot = best.setdefault(key, {})
                        slot[side] = round(min(slot.get(side, us), us), 2)
        for conns in targets.values():
            for conn in conns.values():
                conn.close()
    report["us_per_insert_best"] = best
    return report


def main() -> None:
    """Measure, print JSON then a table; write the JSON to --out if given."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default=PG)
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=9, help="timed calls per figure")
    parser.add_argument("--ingest", type=int, default=1000, help="instances per ingest round")
    parser.add_argument("--rounds", type=int, default=6, help="ingest rounds per side")
    parser.add_argument("--statements", type=int, default=5000,
                        help="single-row inserts per statement-cost round")
    parser.add_argument("--skip-scrape", action="store_true", help="ingest figures only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    if not args.skip_scrape:
        report["scrape"] = scrape(args.server, args.instances, args.runs)
    report["statement"] = statement_cost(args.server, args.statements, args.rounds)
    report["ingest"] = ingest(args.server, args.ingest, args.rounds)
    text_ = json.dumps(report, indent=2)
    print(text_)
    if args.out is not None:
        args.out.write_text(text_ + "\n")
    if "scrape" in report:
        print(f"\n{args.instances} instance rows, PostgreSQL   {'before ms':>10}"
              f" {'after ms':>10}")
        for label, sides in report["scrape"]["median_ms"].items():
            print(f"{label:<34} {sides['before']:>10} {sides['after']:>10}")
    print(f"\n{'one insert + commit, us (best)':<34} {'before':>10} {'after':>10}")
    for mode, sides in report["statement"]["us_per_insert_best"].items():
        print(f"{mode:<34} {sides['before']:>10} {sides['after']:>10}")
    print(f"\n{'ingest (index_instance), us/inst':<34} {'before':>10} {'after':>10}"
          f" {'best before':>12} {'best after':>11}")
    best = report["ingest"]["us_per_instance_best"]
    for mode, sides in report["ingest"]["us_per_instance_median"].items():
        print(f"{mode:<34} {sides['before']:>10} {sides['after']:>10}"
              f" {best[mode]['before']:>12} {best[mode]['after']:>11}")
    if "scrape" in report:
        print("\nmetrics_snapshot queries at scale (EXPLAIN ANALYZE):")
        for statement, plan in report["scrape"]["explain"].items():
            print(f"{plan['ms']:>8} ms  {statement}\n           {'; '.join(plan['scans'])}")

if __name__ == "__main__":
    main()
