"""The CLI's ``--json`` and the HTTP API print the same JSON for the same objects.

Both build their output from the views of :mod:`dicom_ai.views` over the same readers of
:mod:`storage`; this test holds them equal on real rows (a received study, a routing decision,
jobs, findings, a result with its delivery, a batch, an audit event), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_ai.api.app import create_app
from dicom_ai.audit import Auditor
from dicom_ai.cli import app as cli_app
from dicom_ai.config import Settings, load_settings
from storage import apikeys, batches, jobs
from storage.db import Database
from storage.repository import InstanceRecord, index_instance

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
EVLE = "1.2.840.10008.1.2.1"

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def _finding(study: str, series: str, model: str, i: int) -> dict[str, Any]:
    return {"study_instance_uid": study, "series_instance_uid": series,
            "sop_instance_uid": generate_uid(), "frame_number": None, "model_name": model,
            "model_version": "1.0.0", "label": "nodule", "code_value": "27925004",
            "code_scheme": "SCT", "code_meaning": "Nodule", "probability": 0.25 + i / 2,
            "threshold": 0.5, "present": i == 1, "location_kind": "point" if i else None,
            "location": {"x": 3, "y": 4} if i else None,
            "segment_number": None, "heatmap_path": None, "tracking_uid": generate_uid()}


def _seed(db: Database) -> dict[str, Any]:
    """Two received studies, a routing decision per series, a done job (findings, an SR to a
    destination) and a pending job, a batch and an audit event."""
    now = datetime.now(UTC)
    studies = [generate_uid() for _ in range(2)]
    series = [generate_uid() for _ in range(2)]
    with db.write_session() as session:
        for n, (study, one) in enumerate(zip(studies, series, strict=True)):
            for i in range(2 + n):
                index_instance(session, InstanceRecord(
                    study_instance_uid=study, series_instance_uid=one,
                    sop_instance_uid=generate_uid(), sop_class_uid=CT, transfer_syntax_uid=EVLE,
                    patient_id="PID-1", patient_name="DOE^JANE", patient_birth_date="19700101",
                    accession_number=f"ACC{n}", study_date="20260101", modality="CT",
                    instance_number=i + 1), path=f"instances/{n}/{i}.dcm", size_bytes=100,
                    calling_ae_title="CT1", now=now, replace=False)
    with db.write_session() as session:
        done = jobs.create_job(session, study_instance_uid=studies[0],
                               series_instance_uids=[series[0]], route="chest",
                               model_name="chest-nodule", max_attempts=3, event_id=None, now=now)
        done_id = done.id
        jobs.record_decision(session, event_id=None, study_instance_uid=studies[0],
                             series_instance_uid=series[0], route="chest", job_id=done_id,
                             reason="matched Modality=CT", now=now)
        jobs.record_decision(session, event_id=None, study_instance_uid=studies[0],
                             series_instance_uid=generate_uid(), route=None, job_id=None,
                             reason="no route matched", now=now)
        pending = jobs.create_job(session, study_instance_uid=studies[1],
                                  series_instance_uids=[series[1]], route="chest",
                                  model_name="chest-nodule", max_attempts=3, event_id=None,
                                  now=now)
        pending_id = pending.id
    with db.write_session() as session:
        assert jobs.claim_job(session, done_id, owner="test", lease_seconds=60, now=now)
        result = jobs.ResultToStore(
            kind="sr", sr_kind="comprehensive", study_instance_uid=studies[0],
            series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
            sop_class_uid=SR, path=f"results/{done_id}.dcm", destinations=["pacs"])
        assert jobs.complete_job(
            session, done_id, owner="test", model_version="1.0.0",
            findings=[_finding(studies[0], series[0], "chest-nodule", i) for i in range(2)],
            results=[result], timings={"inference": 0.25}, now=now)
    with db.write_session() as session:
        batch_id = batches.create_batch(session, kind="run", source="archive", route="chest",
                                        query={"accessions": ["ACC0"]}, now=now).id
        batches.add_found(session, batch_id, [batches.FoundStudy(studies[0], "ACC0")])
    Auditor(db).record("dimse", "CT1", "instances.stored", peer="127.0.0.1",
                       study_instance_uid=studies[0], uids=[studies[0]],
                       detail={"instances": 2})
    return {"studies": studies, "jobs": [done_id, pending_id], "batch": batch_id}


def test_cli_json_equals_api_json(make_settings: Callable[..., Settings],
                                  tmp_path: Path) -> None:
    """Studies, jobs, findings, routing decisions, batches and audit entries: same JSON."""
    base = make_settings(workers={"processes": 0}).model_dump()
    settings = load_settings(None, **{
        **base,
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        "routes": [{"name": "chest", "match": {"Modality": "CT"}, "model": "chest-nodule",
                    "destinations": ["pacs"]}],
    })
    db = Database(settings.storage.url)
    db.upgrade()
    try:
        seeded = _seed(db)
        with db.write_session() as session:
            token = apikeys.create_key(session, name="viewer", role="read",
                                       now=datetime.now(UTC)).token
        api = TestClient(create_app(settings, db))
        headers = {"Authorization": f"Bearer {token}"}
        config = tmp_path / "config.toml"
        config.write_text(f'[storage]\nroot = "{settings.storage.root}"\n'
                          f'database_url = "{settings.storage.url}"\n')
        runner = CliRunner()

        def cli(*args: str) -> Any:
            shown = runner.invoke(cli_app, [*args, "--json", "-c", str(config)])
            assert shown.exit_code == 0, shown.output
            return json.loads(shown.stdout)

        def get(path: str, **params: Any) -> Any:
            answer = api.get(path, params=params, headers=headers)
            assert answer.status_code == 200, answer.text
            return answer.json()

        study_uid = seeded["studies"][0]
        # Lists: the CLI prints the items of the API's page, with the same paging.
        assert cli("studies") == get("/api/studies")["items"]
        assert len(cli("studies")) == 2
        assert cli("jobs") == get("/api/jobs")["items"]
        first = cli("jobs", "--limit", "1")
        assert first == get("/api/jobs", limit=1)["items"]
        assert cli("jobs", "--limit", "1", "--after", str(first[0]["id"])) == get(
            "/api/jobs", limit=1, after=first[0]["id"])["items"]
        assert cli("jobs", "--state", "pending") == get("/api/jobs", state="pending")["items"]
        assert cli("batch", "list") == get("/api/batches")["items"]
        assert cli("batch", "list")[0]["id"] == seeded["batch"]
        # A batch's status: the API's batch detail, with its report's totals.
        status = cli("batch", "status", str(seeded["batch"]))
        assert {k: v for k, v in status.items() if k != "totals"} == get(
            f"/api/batches/{seeded['batch']}")
        assert status["studies"] == {"found": 1}
        assert status["totals"] == {"studies": 1, "retrieved": 0, "processed": 0, "failed": 0,
                                    "sr_delivered": 0}
        # The CLI prints the audit trail oldest first; the API pages newest first.
        assert cli("audit") == list(reversed(get("/api/audit")["items"]))

        # Details: a study (its counts, routing decisions and jobs) and its findings.
        detail = get(f"/api/studies/{study_uid}")
        shown = cli("findings", study_uid)
        listed = {s["study_instance_uid"]: s for s in cli("studies")}
        assert listed[study_uid] == {k: v for k, v in detail.items()
                                     if k not in ("series_list", "jobs", "routing")}
        assert shown["routing"] == detail["routing"]
        assert len(shown["routing"]) == 2
        assert shown["jobs"] == get("/api/jobs", study_instance_uid=study_uid,
                                    order="asc")["items"]
        assert sorted(j["id"] for j in shown["jobs"]) == sorted(j["id"] for j in detail["jobs"])
        assert shown["findings"] == get("/api/findings", study_instance_uid=study_uid,
                                        order="asc", current=True)["items"]
        assert [f["decision"] for f in shown["findings"]] == ["absent", "present"]
        assert shown["findings"][1]["finding"] == {
            "code_value": "27925004", "code_scheme": "SCT", "code_meaning": "Nodule"}
        assert shown["findings"][1]["location"] == {"x": 3, "y": 4}
        # One naming convention: snake_case DICOM keywords, no patient data.
        for item in (*listed.values(), *shown["jobs"], *shown["findings"]):
            assert "study_instance_uid" in item
            assert not any(k[0].isupper() for k in item)
        assert "DOE^JANE" not in json.dumps([listed, shown])

        # The job detail: its result and the result's delivery (pending: nothing sent yet).
        job = get(f"/api/jobs/{seeded['jobs'][0]}")
        assert {k: v for k, v in job.items() if k != "results"} == next(
            j for j in shown["jobs"] if j["id"] == seeded["jobs"][0])
        (result,) = job["results"]
        (delivery,) = result["deliveries"]
        assert (delivery["destination"], delivery["delivery"]) == ("pacs", "pending")
        outbox = get("/api/outbox")["items"]
        assert {k: v for k, v in outbox[0].items()
                if k not in ("kind", "sop_instance_uid")} == delivery

        # Models: the registry's entries (the bundled ones here); `show` adds to the same.
        models = cli("models", "list")
        assert models == get("/api/models")["items"]
        assert models
        model = cli("models", "show", f"{models[0]['name']}@{models[0]['version']}")
        assert {k: v for k, v in model.items()
                if k not in ("network_sha256", "versions", "spec")} == models[0]
        assert model["spec"]["name"] == models[0]["name"]

        # API keys (the CLI only): the same naming, never a hash.
        keys = cli("apikeys", "list")
        assert [k["name"] for k in keys] == ["viewer"]
        assert set(keys[0]) == {"id", "name", "role", "prefix", "created_at", "revoked_at",
                                "last_used_at"}
        assert api.get("/openapi.json").status_code == 200
    finally:
        db.dispose()
