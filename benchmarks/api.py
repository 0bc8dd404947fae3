"""HTTP API at scale: 1M instance rows (and 100k findings) on PostgreSQL, paginated endpoints.

Seeds a fresh PostgreSQL database with ``INSERT ... SELECT generate_series`` (10,000 studies of
one series and 100 instances each, 1,000 jobs with 100 findings each), starts the API on a real
uvicorn, times the first and a deep page of each list endpoint and ``/metrics``, and prints the
``EXPLAIN`` plan of the page queries (index scans, no sequential scan of a large table).

    .venv/bin/python -m benchmarks.api [--server postgresql+psycopg://postgres@127.0.0.1:5432]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from dicom_ai.api.server import ApiServer
from dicom_ai.config import load_settings
from storage import apikeys
from storage.db import Database

SEED = [
    "INSERT INTO patients (id, patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
    " patient_sex) VALUES (1, 'P1', '', 'BENCH^MARK', '19700101', 'O')",
    "INSERT INTO studies (id, study_instance_uid, patient_pk, accession_number, study_id,"
    " study_date, study_time, study_description, referring_physician_name, state,"
    " first_received_at, last_received_at, completion_count)"
    " SELECT g, '2.25.1.' || g, 1, 'A' || g, '', to_char(date '2025-01-01' + (g % 365),"
    " 'YYYYMMDD'), '', '', '', 'complete', now(), now(), 1 FROM generate_series(1, {studies}) g",
    "INSERT INTO series (id, series_instance_uid, study_pk, modality, body_part_examined,"
    " series_description, series_date, state, last_received_at)"
    " SELECT g, '2.25.2.' || g, g, 'CT', 'CHEST', '', '', 'complete', now()"
    " FROM generate_series(1, {studies}) g",
    "INSERT INTO instances (sop_instance_uid, series_pk, sop_class_uid, transfer_syntax_uid,"
    " instance_number, path, size_bytes, calling_ae_title, received_at)"
    " SELECT '2.25.3.' || g, 1 + (g - 1) / {per_series}, '1.2.840.10008.5.1.4.1.1.2',"
    " '1.2.840.10008.1.2.1', g % {per_series}, 'instances/' || g || '.dcm', 524288, 'CT1', now()"
    " FROM generate_series(1, {instances}) g",
    "INSERT INTO jobs (id, study_instance_uid, series_instance_uids, route, model_name,"
    " model_version, state, attempts, max_attempts, not_before, timings, created_at,"
    " finished_at) SELECT g, '2.25.1.' || g, '[]', 'chest',"
    " CASE WHEN g % 10 = 0 THEN 'rare-model' ELSE 'chest-nodule' END, '1.0.0', 'done', 1, 3,"
    " now(), '{{\"inference\": 0.05}}', now(), now() FROM generate_series(1, {jobs}) g",
    "INSERT INTO findings (job_id, ordinal, study_instance_uid, series_instance_uid,"
    " sop_instance_uid, model_name, model_version, label, code_value, code_scheme,"
    " code_meaning, probability, threshold, present, tracking_uid, created_at)"
    " SELECT 1 + (g - 1) / 100, (g - 1) % 100, '2.25.1.1', '2.25.2.1', '2.25.3.' || g,"
    " CASE WHEN ((g - 1) / 100 + 1) % 10 = 0 THEN 'rare-model' ELSE 'chest-nodule' END,"
    " '1.0.0', 'nodule', '27925004', 'SCT', 'Nodule', random(), 0.5, g % 7 = 0, '2.25.4.' || g,"
    " timestamptz '2025-01-01' + (g || ' minutes')::interval FROM generate_series(1, {findings}) g",
]
FIX_SEQUENCES = ["SELECT setval(pg_get_serial_sequence('{t}', 'id'), (SELECT max(id) FROM {t}))"]

EXPLAINED = {
    "studies page": "SELECT * FROM studies WHERE id < 5000 ORDER BY id DESC LIMIT 50",
    "studies by date": "SELECT * FROM studies WHERE study_date >= '20250601' AND study_date <="
                       " '20250601' ORDER BY id DESC LIMIT 50",
    "instance counts of a page": "SELECT series_pk, count(id) FROM instances WHERE series_pk IN"
                                 " (1,2,3,4,5,6,7,8,9,10) GROUP BY series_pk",
    "findings of a rare model": "SELECT * FROM findings WHERE model_name = 'rare-model' AND"
                                " id < 90000 ORDER BY id DESC LIMIT 50",
    "findings by date": "SELECT * FROM findings WHERE created_at >= '2025-02-01' AND created_at"
                        " < '2025-02-02' ORDER BY id DESC LIMIT 50",
}


def _time(client: httpx.Client, path: str, params: dict[str, Any], runs: int = 5) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        answer = client.get(path, params=params)
        samples.append(time.perf_counter() - started)
        assert answer.status_code == 200, answer.text
    return statistics.median(samples)


def main() -> None:
    """Seed, serve, time, explain; print JSON then a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--instances", type=int, default=1_000_000)
    args = parser.parse_args()
    per_series = 100
    studies = args.instances // per_series
    name = f"dicom_ai_bench_{uuid.uuid4().hex[:8]}"
    admin = args.server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{args.server}/{name}"
    report: dict[str, Any] = {"instances": args.instances, "studies": studies}
    try:
        db = Database(url)
        db.upgrade()
        started = time.perf_counter()
        with psycopg.connect(f"{admin}/{name}", autocommit=True) as conn:
            for statement in SEED:
                conn.execute(statement.format(studies=studies, per_series=per_series,
                                              instances=args.instances, jobs=1000,
                                              findings=100_000))
            for table in ("patients", "studies", "series", "instances", "jobs", "findings"):
                conn.execute(FIX_SEQUENCES[0].format(t=table))
            conn.execute("ANALYZE")
            plans = {label: "\n".join(row[0] for row in conn.execute(
                "EXPLAIN " + sql).fetchall()) for label, sql in EXPLAINED.items()}
        report["seed_seconds"] = round(time.perf_counter() - started, 1)
        with db.write_session() as session:
            token = apikeys.create_key(session, name="bench", role="read",
                                       now=datetime.now(UTC)).token
        with tempfile.TemporaryDirectory() as root:
            settings = load_settings(None, api={"port": 0},
                                     storage={"root": Path(root), "database_url": url})
            server = ApiServer(settings, db)
            host, port = server.start()
            timings: dict[str, float] = {}
            with httpx.Client(base_url=f"http://{host}:{port}", timeout=120,
                              headers={"Authorization": f"Bearer {token}"}) as client:
                for label, path, params in (
                    ("studies page 1", "/api/studies", {"limit": 50}),
                    ("studies deep page", "/api/studies", {"limit": 50, "after": 200}),
                    ("studies by date", "/api/studies", {"study_date": "20250601"}),
                    ("series of a study", "/api/series", {"study_instance_uid": "2.25.1.77"}),
                    ("study detail", "/api/studies/2.25.1.4242", {}),
                    ("findings page 1 (limit 500)", "/api/findings", {"limit": 500}),
                    ("findings rare model", "/api/findings", {"model": "rare-model"}),
                    ("findings present, deep", "/api/findings",
                     {"decision": "present", "after": 5000}),
                    ("findings one day", "/api/findings",
                     {"since": "2025-02-01", "until": "2025-02-02"}),
                    ("jobs done", "/api/jobs", {"state": "done"}),
                    ("metrics", "/metrics", {}),
                ):
                    timings[label] = round(_time(client, path, params) * 1000, 1)
            server.stop()
        report["median_ms"] = timings
        report["plans"] = plans
        db.dispose()
    finally:
        with psycopg.connect(admin + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(json.dumps(report, indent=2))
    print(f"\n{'endpoint':<32} {'median ms':>10}")
    for label, ms in report["median_ms"].items():
        print(f"{label:<32} {ms:>10}")
    seq = [label for label, plan in report["plans"].items() if "Seq Scan" in plan]
    print(f"\nsequential scans in page plans: {seq or 'none'}")


if __name__ == "__main__":
    main()
