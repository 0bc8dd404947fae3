"""The HTTP API on a real uvicorn, against a real service and SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_ai.api.metrics import METRIC_NAMES
from dicom_ai.api.server import ApiServer
from dicom_ai.cli import app as cli_app
from dicom_ai.config import Settings, load_settings
from dicom_ai.network.scu import Peer, inspect, send_files
from dicom_ai.service import Service
from storage import apikeys, batches, jobs
from storage.db import Database
from storage.repository import InstanceRecord, index_instance
from tests.peers import make_ct_series, wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
EVLE = "1.2.840.10008.1.2.1"
PATIENT_NAME, PATIENT_ID, BIRTH_DATE = "DOE^JANE", "PID-4711", "19700101"
JANUARY = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
FEBRUARY = datetime(2026, 2, 10, 12, 0, tzinfo=UTC)


def _settings(make_settings: Callable[..., Settings], **extra: Any) -> Settings:
    # No local workers: jobs stay pending (nothing loads TensorFlow); the destination is a
    # closed port, so deliveries fail and stay pending.
    base = make_settings(workers={"processes": 0}, **extra).model_dump()
    return load_settings(None, **{
        **base,
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        "routes": [{"name": "chest", "match": {"Modality": "CT"}, "model": "chest-nodule",
                    "destinations": ["pacs"]}],
    })


def _seed(db: Database) -> dict[str, Any]:
    """Two studies, three done jobs (100 findings each, two models, two months), one batch."""
    now = datetime.now(UTC)
    study_uids = [generate_uid() for _ in range(2)]
    series_uids = [generate_uid() for _ in range(2)]
    with db.write_session() as session:
        for n, (study, series) in enumerate(zip(study_uids, series_uids, strict=True)):
            for i in range(3):
                record = InstanceRecord(
                    study_instance_uid=study, series_instance_uid=series,
                    sop_instance_uid=generate_uid(), sop_class_uid=CT, transfer_syntax_uid=EVLE,
                    patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                    patient_birth_date=BIRTH_DATE, accession_number=f"ACC{n}",
                    study_date=f"2026010{n + 1}", modality="CT", instance_number=i + 1)
                index_instance(session, record, path=f"instances/x/{n}/{i}.dcm", size_bytes=1000,
                               calling_ae_title="CT1", now=now, replace=False)
    job_ids: list[int] = []
    plan = [(study_uids[0], "chest-nodule", JANUARY), (study_uids[1], "other-model", FEBRUARY),
            (study_uids[0], "chest-nodule", now)]
    for study, model, when in plan:
        with db.write_session() as session:
            job = jobs.create_job(session, study_instance_uid=study,
                                  series_instance_uids=[series_uids[0]], route="chest",
                                  model_name=model, max_attempts=3, event_id=None, now=when)
            job_id = job.id
        with db.write_session() as session:
            assert jobs.claim_job(session, job_id, owner="test", lease_seconds=60, now=when)
            findings = [{
                "study_instance_uid": study, "series_instance_uid": series_uids[0],
                "sop_instance_uid": generate_uid(), "frame_number": None, "model_name": model,
                "model_version": "1.0.0", "label": "nodule", "code_value": "27925004",
                "code_scheme": "SCT", "code_meaning": "Nodule", "probability": i / 100,
                "threshold": 0.5, "present": i % 4 == 0, "location_kind": None,
                "location": None, "segment_number": None, "heatmap_path": None,
                "tracking_uid": generate_uid()} for i in range(100)]
            result = jobs.ResultToStore("sr", "comprehensive", study, generate_uid(),
                                        generate_uid(), SR, f"results/{job_id}.dcm", ["pacs"])
            assert jobs.complete_job(session, job_id, owner="test", model_version="1.0.0",
                                     findings=findings, results=[result],
                                     timings={"inference": 0.2}, now=when)
        job_ids.append(job_id)
    with db.write_session() as session:
        batch = batches.create_batch(session, kind="run", source="archive", route=None,
                                     query={"accessions": ["ACC0"]}, now=now)
        batch_id = batch.id
    return {"studies": study_uids, "jobs": job_ids, "batch": batch_id}


def _all_pages(client: httpx.Client, path: str, headers: dict[str, str],
               **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = None
    while True:
        query = {**params, **({"after": after} if after is not None else {})}
        page = client.get(path, params=query, headers=headers)
        assert page.status_code == 200, page.text
        body = page.json()
        items.extend(body["items"])
        after = body["next_after"]
        if after is None:
            return items


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in metrics"
    return float(match.group(1))


def test_api(make_settings: Callable[..., Settings],
             start_service: Callable[[Settings], Service], tmp_path: Path) -> None:
    """Health, keys and roles, pagination, filters, actions, privacy and metrics."""
    settings = _settings(make_settings)
    service = start_service(settings)
    assert service.api_address is not None
    base = f"http://127.0.0.1:{service.api_address[1]}"
    db = Database(settings.storage.url)
    seeded = _seed(db)
    now = datetime.now(UTC)
    with db.write_session() as session:
        read = apikeys.create_key(session, name="viewer", role="read", now=now).token
        operator = apikeys.create_key(session, name="ops", role="operator", now=now).token
        gone = apikeys.create_key(session, name="old", role="read", now=now)
        assert apikeys.revoke_key(session, gone.info.id, now=now)

    # A key made with the CLI against a TOML configuration works too; listings show no hash.
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nroot = "{settings.storage.root}"\n'
                      f'database_url = "{settings.storage.url}"\n')
    runner = CliRunner()
    made = runner.invoke(cli_app, ["apikeys", "create", "cli", "--role", "operator",
                                   "-c", str(config)])
    assert made.exit_code == 0, made.output
    cli_token = made.stdout.strip().splitlines()[-1]
    assert cli_token.startswith("dak_")
    listed = runner.invoke(cli_app, ["apikeys", "list", "-c", str(config)])
    assert listed.exit_code == 0
    assert "cli" in listed.stdout
    assert "key_hash" not in listed.stdout
    assert cli_token not in listed.stdout
    assert cli_token[12:] not in listed.stdout

    as_read = {"Authorization": f"Bearer {read}"}
    as_operator = {"X-API-Key": operator}
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["database"]["ok"]
        assert ready.json()["checks"]["store"]["ok"]
        paths = client.get("/openapi.json").json()["paths"]
        for path in ("/api/studies", "/api/series", "/api/jobs", "/api/findings",
                     "/api/models", "/api/routes", "/api/destinations", "/api/batches",
                     "/api/outbox", "/api/jobs/{job_id}/rerun", "/api/results/{result_id}/resend",
                     "/api/outbox/{outbox_id}/retry", "/api/batches/{batch_id}/cancel",
                     "/health", "/ready", "/metrics"):
            assert path in paths, path
        assert client.get("/docs").status_code == 200

        # -- authentication and roles --------------------------------------------------------
        for headers in ({}, {"Authorization": "Bearer dak_nonsense"},
                        {"Authorization": f"Bearer {gone.token}"}):
            answer = client.get("/api/studies", headers=headers)
            assert answer.status_code == 401, headers
            assert answer.headers["www-authenticate"] == "Bearer"
        for path in ("/api/studies", "/api/series", "/api/jobs", "/api/findings",
                     "/api/models", "/api/routes", "/api/destinations", "/api/batches",
                     "/api/outbox"):
            assert client.get(path, headers=as_read).status_code == 200, path
        assert client.get("/api/studies",
                          headers={"Authorization": f"Bearer {cli_token}"}).status_code == 200
        first_job = seeded["jobs"][0]
        assert client.post(f"/api/jobs/{first_job}/rerun", headers=as_read).status_code == 403
        assert client.post(f"/api/jobs/{first_job}/rerun").status_code == 401

        # -- data ----------------------------------------------------------------------------
        models = client.get("/api/models", headers=as_read).json()["items"]
        assert "chest-nodule" in {m["name"] for m in models}
        assert client.get("/api/routes", headers=as_read).json()["items"][0]["name"] == "chest"
        studies = client.get("/api/studies", headers=as_read)
        assert [s["instances"] for s in studies.json()["items"]] == [3, 3]
        assert studies.json()["items"][0]["modalities"] == ["CT"]
        one = client.get(f"/api/studies/{seeded['studies'][0]}", headers=as_read)
        assert one.status_code == 200
        assert len(one.json()["jobs"]) == 2
        assert one.json()["series_list"][0]["instances"] == 3
        for text in (studies.text, one.text):
            assert PATIENT_NAME not in text
            assert PATIENT_ID not in text
            assert BIRTH_DATE not in text
            assert "patient" not in text.lower()
        dated = client.get("/api/studies", params={"study_date": "20260102-"}, headers=as_read)
        assert [s["study_instance_uid"] for s in dated.json()["items"]] == [seeded["studies"][1]]
        assert client.get("/api/studies", params={"study_date": "2026"},
                          headers=as_read).status_code == 422

        # -- pagination and filters over 300 findings ----------------------------------------
        everything = _all_pages(client, "/api/findings", as_read, limit=70)
        ids = [f["id"] for f in everything]
        assert len(ids) == 300
        assert ids == sorted(ids, reverse=True)
        ascending = _all_pages(client, "/api/findings", as_read, limit=500, order="asc")
        assert [f["id"] for f in ascending] == sorted(ids)
        assert client.get("/api/findings", params={"limit": 501},
                          headers=as_read).status_code == 422
        other = _all_pages(client, "/api/findings", as_read, model="other-model")
        assert len(other) == 100
        assert {f["model"] for f in other} == {"other-model"}
        present = _all_pages(client, "/api/findings", as_read, decision="present",
                             model="chest-nodule")
        assert len(present) == 50
        assert all(f["decision"] == "present" for f in present)
        january = _all_pages(client, "/api/findings", as_read, since="2026-01-01",
                             until="2026-02-01")
        assert len(january) == 100
        assert {f["job_id"] for f in january} == {first_job}
        current = _all_pages(client, "/api/findings", as_read, current="true",
                             model="chest-nodule")
        assert {f["job_id"] for f in current} == {seeded["jobs"][2]}
        done = _all_pages(client, "/api/jobs", as_read, state="done", limit=2)
        assert [j["id"] for j in done] == sorted(seeded["jobs"], reverse=True)

        # -- operator actions ----------------------------------------------------------------
        rerun = client.post(f"/api/jobs/{first_job}/rerun", headers=as_operator)
        assert rerun.status_code == 201, rerun.text
        new_job = rerun.json()["job"]["id"]
        pending = client.get("/api/jobs", params={"state": "pending"}, headers=as_read).json()
        assert new_job in [j["id"] for j in pending["items"]]
        detail = client.get(f"/api/jobs/{seeded['jobs'][2]}", headers=as_read).json()
        result = detail["results"][0]
        delivery = result["deliveries"][0]
        assert delivery["destination"] == "pacs"
        retried = client.post(f"/api/outbox/{delivery['id']}/retry", headers=as_operator)
        assert retried.status_code == 200
        assert retried.json()["state"] == "pending"
        resent = client.post(f"/api/results/{result['id']}/resend", headers=as_operator)
        assert resent.status_code == 200
        assert resent.json()["deliveries_queued"] == 1
        assert client.post("/api/outbox/999999/retry", headers=as_operator).status_code == 404
        batch = seeded["batch"]
        cancelled = client.post(f"/api/batches/{batch}/cancel", headers=as_operator)
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "cancelled"
        assert client.post(f"/api/batches/{batch}/cancel",
                           headers=as_operator).status_code == 409
        assert client.get(f"/api/batches/{batch}",
                          headers=as_read).json()["state"] == "cancelled"

        # -- metrics move after a push -------------------------------------------------------
        before = client.get("/metrics").text
        for name in METRIC_NAMES:
            assert name in before, name
        assert _metric(before, "dicom_ai_instances") == 6
        assert _metric(before, 'dicom_ai_jobs{state="done"}') == 3
        assert _metric(before, 'dicom_ai_inference_seconds_count{model="chest-nodule"}') == 1
        assert _metric(before, 'dicom_ai_results_pending{destination="pacs",kind="sr"}') == 3
        assert _metric(before, 'dicom_ai_batches{state="cancelled"}') == 1
        files = make_ct_series(tmp_path / "push", 2, size=32)
        found = [item for item in (inspect(p) for p in files) if item is not None]
        assert service.address is not None
        report = send_files(found, Peer("DICOM_AI", "127.0.0.1", service.address[1]),
                            settings.dicom)
        assert report.ok, report.failures
        assert report.sent == 2
        after = client.get("/metrics").text
        assert _metric(after, "dicom_ai_instances") == 8
        assert _metric(after, "dicom_ai_instance_bytes") > _metric(before,
                                                                   "dicom_ai_instance_bytes")
    db.dispose()


def test_patient_names_only_when_allowed(make_settings: Callable[..., Settings],
                                         start_service: Callable[[Settings], Service]) -> None:
    """``api.show_patient_names`` adds the patient block; the default leaves it out."""
    settings = _settings(make_settings, api={"show_patient_names": True})
    service = start_service(settings)
    assert service.api_address is not None
    db = Database(settings.storage.url)
    seeded = _seed(db)
    with db.write_session() as session:
        token = apikeys.create_key(session, name="v", role="read", now=datetime.now(UTC)).token
    db.dispose()
    with httpx.Client(base_url=f"http://127.0.0.1:{service.api_address[1]}", timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        one = client.get(f"/api/studies/{seeded['studies'][0]}").json()
        assert one["patient"]["PatientName"] == PATIENT_NAME
        assert one["patient"]["PatientID"] == PATIENT_ID


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ready_without_database(tmp_path: Path, db_url: str) -> None:
    """An unreachable database makes /ready and the data endpoints answer 503, /health 200."""
    settings = load_settings(None, api={"host": "127.0.0.1", "port": 0},
                             storage={"root": tmp_path / "store", "min_free_bytes": 0,
                                      "database_url": "postgresql+psycopg://nobody@127.0.0.1:1/x"})
    (tmp_path / "store").mkdir()
    server = ApiServer(settings, Database(settings.storage.url))
    host, port = server.start()
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as client:
            assert client.get("/health").status_code == 200
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert not ready.json()["checks"]["database"]["ok"]
            assert ready.json()["checks"]["store"]["ok"]
            answer = client.get("/api/jobs", headers={"Authorization": "Bearer dak_" + "x" * 43})
            assert answer.status_code == 503
            assert "dicom_ai_database_up 0.0" in client.get("/metrics").text
    finally:
        server.stop()


def test_operator_on_missing_rows(make_settings: Callable[..., Settings],
                                  start_service: Callable[[Settings], Service]) -> None:
    """Unknown ids answer 404; a job whose route is gone answers 409."""
    settings = _settings(make_settings)
    service = start_service(settings)
    assert service.api_address is not None
    db = Database(settings.storage.url)
    now = datetime.now(UTC) - timedelta(seconds=1)
    with db.write_session() as session:
        token = apikeys.create_key(session, name="o", role="operator", now=now).token
        orphan = jobs.create_job(session, study_instance_uid=generate_uid(),
                                 series_instance_uids=[], route="removed", model_name="m",
                                 max_attempts=1, event_id=None, now=now).id
    db.dispose()
    with httpx.Client(base_url=f"http://127.0.0.1:{service.api_address[1]}", timeout=30,
                      headers={"X-API-Key": token}) as client:
        assert client.post("/api/jobs/999999/rerun").status_code == 404
        assert client.post(f"/api/jobs/{orphan}/rerun").status_code == 409
        assert client.post("/api/results/999999/resend").status_code == 404
        assert client.post("/api/batches/999999/cancel").status_code == 404
        assert client.get("/api/jobs/999999").status_code == 404


def _labelled(text: str, name: str, **labels: str) -> float:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return _metric(text, f"{name}{{{inner}}}")


def test_traffic_metrics(make_settings: Callable[..., Settings],
                         start_service: Callable[[Settings], Service], tmp_path: Path) -> None:
    """Associations, C-STORE answers by status, bytes and requests reach ``/metrics``."""
    from pydicom import dcmread
    from pydicom.uid import CTImageStorage
    from pynetdicom import AE

    settings = _settings(make_settings, dicom={"allowed_calling_aets": ["GOODAE"]})
    service = start_service(settings)
    assert service.address is not None
    assert service.api_address is not None
    port = service.address[1]
    files = make_ct_series(tmp_path / "push", 2, size=32)
    bad = dcmread(files[1])
    del bad.StudyInstanceUID  # refused 0xA900 and quarantined

    def associate(calling: str) -> Any:
        ae = AE(ae_title=calling)
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        ae.add_requested_context(CTImageStorage)
        return ae.associate("127.0.0.1", port, ae_title="DICOM_AI")

    refused = associate("BADAE")
    assert refused.is_rejected
    assoc = associate("GOODAE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(dcmread(files[0])).Status == 0x0000
    assert assoc.send_c_store(bad).Status == 0xA900
    assoc.release()
    aborted = associate("GOODAE")
    assert aborted.is_established
    aborted.abort()

    with httpx.Client(base_url=f"http://127.0.0.1:{service.api_address[1]}",
                      timeout=30) as client:
        def scrape() -> str:
            return client.get("/metrics").text

        # Release and abort are notified on the association threads: wait for them.
        wait_until(lambda: _labelled(scrape(), "dicom_ai_associations_total",
                                     outcome="aborted") == 1, 10, "the abort is counted")
        text = scrape()
    assert _labelled(text, "dicom_ai_associations_total", outcome="accepted") == 2
    assert _labelled(text, "dicom_ai_associations_total", outcome="released") == 1
    assert _labelled(text, "dicom_ai_associations_total", outcome="rejected") == 1
    assert _labelled(text, "dicom_ai_association_rejections_total",
                     reason="calling AE title not allowed") == 1
    assert _metric(text, "dicom_ai_associations_active") == 0
    assert _labelled(text, "dicom_ai_store_responses_total", status="0x0000") == 1
    assert _labelled(text, "dicom_ai_store_responses_total", status="0xA900") == 1
    assert _labelled(text, "dicom_ai_dimse_requests_total", service="echo") == 1
    assert _labelled(text, "dicom_ai_dimse_requests_total", service="store") == 2
    # The stored file as received (the index holds its size too).
    assert _metric(text, "dicom_ai_received_bytes_total") == _metric(
        text, "dicom_ai_instance_bytes")
    assert _labelled(text, "dicom_ai_instances_rejected", status="0xA900") == 1
