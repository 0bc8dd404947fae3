"""The audit trail against a real service, dcmtk peers and SQLite and PostgreSQL.

A storescu push, a refused caller, a findscu query, a delivery to a real destination and
operator actions through the HTTP API each leave their rows; no row holds the pushed files'
patient name, ID or birth date; :mod:`storage.audit` has no way to change or remove a row.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

import storage.audit
from dicom_ai.audit import Auditor
from dicom_ai.cli import app as cli_app
from dicom_ai.config import Settings, load_settings
from dicom_ai.dispatch.delivery import OutboxSender
from dicom_ai.service import Service
from storage import apikeys, audit, batches, jobs, outbox
from storage.db import Database
from tests.conftest import need_binary
from tests.peers import ENV, make_ct_series, storescu

# The pushed files' patient attributes: none of them may appear in any audit row.
PATIENT_NAME, PATIENT_ID, BIRTH_DATE = "Auditee^Secreta", "AUD-PID-5521", "19450607"
SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _push_files(folder: Path, count: int) -> tuple[list[Path], str]:
    files = make_ct_series(folder, count, size=32)
    for path in files:
        ds = dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        ds.save_as(path)
    return files, str(dcmread(files[0]).StudyInstanceUID)


def _events(db: Database, **filters: Any) -> list[audit.AuditRecord]:
    with db.sessions() as session:
        return audit.list_events(session, limit=500, order="asc", **filters)


def _wait_for(db: Database, predicate: Callable[[list[audit.AuditRecord]], bool],
              timeout: float = 10.0) -> list[audit.AuditRecord]:
    """The audit rows once `predicate` holds (the receiver writes them on its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _events(db)
        if predicate(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def _assert_no_patient_data(rows: list[audit.AuditRecord]) -> None:
    text = json.dumps([r.to_dict() for r in rows])
    for value in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "Auditee", "Secreta"):
        assert value.lower() not in text.lower(), f"{value} in the audit trail"


def test_dicom_associations_stores_and_queries(
    make_settings: Callable[..., Settings], start_service: Callable[[Settings], Service],
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Push, refused caller and C-FIND leave rows; the API and the CLI read them back."""
    need_binary("storescu")
    findscu = need_binary("findscu")
    settings = make_settings(dicom={"allowed_calling_aets": ["STORESCU", "FINDSCU"]},
                             query_retrieve={"allowed_calling_aets": ["FINDSCU"]},
                             workers={"processes": 0})
    service = start_service(settings)
    assert service.address is not None
    assert service.api_address is not None
    port = service.address[1]
    db = Database(settings.storage.url)
    files, study_uid = _push_files(tmp_path / "push", 3)

    pushed = storescu(port, files)
    assert pushed.returncode == 0, pushed.stderr
    refused = storescu(port, files[:1], calling="INTRUDER")
    assert refused.returncode != 0
    found = subprocess.run(
        [findscu, "-S", "-aet", "FINDSCU", "-aec", "DICOM_AI", "-k", "QueryRetrieveLevel=STUDY",
         "-k", "PatientName=Auditee*", "-k", "PatientID", "-k", "StudyInstanceUID",
         "127.0.0.1", str(port)], env=ENV, capture_output=True, text=True, check=False)
    assert found.returncode == 0, found.stderr
    # A malformed birth date is refused (0xA900): neither the log nor the audit names it.
    subprocess.run(
        [findscu, "-S", "-aet", "FINDSCU", "-aec", "DICOM_AI", "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"PatientBirthDate={BIRTH_DATE}-X", "127.0.0.1", str(port)], env=ENV,
        capture_output=True, text=True, check=False)

    def complete(rows: list[audit.AuditRecord]) -> bool:
        actions = [r.action for r in rows]
        return (actions.count("association.released") >= 3 and actions.count("query.find") == 2
                and {"instances.stored", "association.rejected"} <= set(actions))

    rows = _wait_for(db, complete)
    by_action: dict[str, list[audit.AuditRecord]] = {}
    for row in rows:
        by_action.setdefault(row.action, []).append(row)

    accepted = [r for r in by_action["association.accepted"] if r.actor == "STORESCU"]
    assert len(accepted) == 1
    assert accepted[0].actor_kind == "dicom"
    assert accepted[0].peer == "127.0.0.1"
    assert accepted[0].detail["called"] == "DICOM_AI"

    [stored] = by_action["instances.stored"]  # one row for the association's one study
    assert (stored.actor, stored.study_instance_uid) == ("STORESCU", study_uid)
    assert stored.detail == {"instances": 3, "series": 1}
    assert stored.uids == [str(dcmread(files[0]).SeriesInstanceUID)]
    released = [r for r in by_action["association.released"] if r.actor == "STORESCU"]
    assert released[0].detail["stored"] == 3
    assert released[0].detail["refused"] == 0
    assert released[0].uids == [study_uid]

    [rejected] = by_action["association.rejected"]
    assert rejected.actor == "INTRUDER"
    assert rejected.detail["reason"] == "calling AE title not allowed"

    find, malformed = by_action["query.find"]
    assert malformed.detail == {"model": "study", "level": "STUDY", "studies": 0,
                                "status": "0xA900", "keys": ["PatientBirthDate"],
                                "reason": "PatientBirthDate: not a valid DA value"}
    assert find.actor == "FINDSCU"
    assert find.study_instance_uid == study_uid
    assert find.detail == {"level": "STUDY", "model": "study", "matches": 1, "studies": 1,
                           "status": "0x0000", "keys": ["PatientName"]}
    finder = [r for r in by_action["association.released"] if r.actor == "FINDSCU"]
    assert finder[0].detail["requests"] == {"query.find": 1}
    _assert_no_patient_data(rows)
    assert "PatientBirthDate: not a valid DA value" in caplog.text
    assert BIRTH_DATE not in caplog.text

    # The API: a read key, filters, keyset pages.
    with db.write_session() as session:
        token = apikeys.create_key(session, name="auditor", role="read",
                                   now=datetime.now(UTC)).token
    base = f"http://127.0.0.1:{service.api_address[1]}"
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/api/audit").status_code == 401
        page = client.get("/api/audit", params={"study_instance_uid": study_uid},
                          headers=headers).json()
        assert {e["action"] for e in page["items"]} == {"instances.stored", "query.find"}
        page = client.get("/api/audit", params={"action": "association.", "limit": 2},
                          headers=headers).json()
        assert len(page["items"]) == 2
        assert page["next_after"] is not None
        assert all(e["action"].startswith("association.") for e in page["items"])
        seen = [e["id"] for e in page["items"]]
        while page["next_after"] is not None:
            page = client.get("/api/audit", params={"action": "association.", "limit": 2,
                                                    "after": page["next_after"]},
                              headers=headers).json()
            seen += [e["id"] for e in page["items"]]
        assert seen == sorted(seen, reverse=True)
        assert len(seen) == len(set(seen)) >= 5
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert client.get("/api/audit", params={"since": future},
                          headers=headers).json()["items"] == []
        assert PATIENT_ID not in client.get("/api/audit", params={"limit": 500},
                                            headers=headers).text

    # The CLI.
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nroot = "{settings.storage.root}"\n'
                      f'database_url = "{settings.storage.url}"\n')
    shown = CliRunner().invoke(cli_app, ["audit", "--study", study_uid, "--since", "1h",
                                         "--json", "-c", str(config)])
    assert shown.exit_code == 0, shown.output
    assert [e["action"] for e in json.loads(shown.stdout)] == ["instances.stored", "query.find"]
    table = CliRunner().invoke(cli_app, ["audit", "--action", "association.rejected",
                                         "-c", str(config)])
    assert table.exit_code == 0, table.output
    assert "INTRUDER" in table.stdout
    assert "calling AE title not allowed" in table.stdout
    db.dispose()


def test_results_sent_and_operator_actions(
    make_settings: Callable[..., Settings], start_service: Callable[[Settings], Service],
    tmp_path: Path,
) -> None:
    """A delivery to a real receiver and the four operator actions, each with its key id."""
    base = make_settings(workers={"processes": 0}).model_dump()
    destination = start_service(make_settings(storage={"root": tmp_path / "pacs",
                                                       "database_url":
                                                       f"sqlite:///{tmp_path / 'pacs.db'}"},
                                              api={"enabled": False}))
    assert destination.address is not None
    settings = load_settings(None, **{
        **base,
        "destinations": [{"name": "pacs", "ae_title": "DICOM_AI", "host": "127.0.0.1",
                          "port": destination.address[1]}],
        "routes": [{"name": "chest", "match": {"Modality": "CT"}, "model": "chest-nodule",
                    "destinations": ["pacs"]}],
    })
    service = start_service(settings)
    assert service.api_address is not None
    db = Database(settings.storage.url)
    files, study_uid = _push_files(tmp_path / "result", 1)
    result_file = settings.storage.root / "results" / "sr.dcm"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(files[0], result_file)
    ds = dcmread(result_file, stop_before_pixels=True)
    now = datetime.now(UTC)
    with db.write_session() as session:
        job = jobs.create_job(session, study_instance_uid=study_uid, series_instance_uids=[],
                              route="chest", model_name="chest-nodule", max_attempts=1,
                              event_id=None, now=now)
        job_id = job.id
        assert jobs.claim_job(session, job_id, owner="me", lease_seconds=60, now=now)
        assert jobs.complete_job(session, job_id, owner="me", model_version="1", findings=[],
                                 results=[jobs.ResultToStore(
                                     kind="sr", sr_kind="comprehensive",
                                     study_instance_uid=study_uid,
                                     series_instance_uid=str(ds.SeriesInstanceUID),
                                     sop_instance_uid=str(ds.SOPInstanceUID),
                                     sop_class_uid=str(ds.SOPClassUID),
                                     path="results/sr.dcm", destinations=["pacs"])],
                                 timings={}, now=now)
        batch_id = batches.create_batch(session, kind="run", source="archive", route=None,
                                        query={}, now=now).id
        operator = apikeys.create_key(session, name="ops", role="operator", now=now)
    # The service's own sender may deliver first; either way one row says it was sent.
    OutboxSender(settings, db).send_due()
    rows = _wait_for(db, lambda rows: any(r.action == "results.sent" for r in rows))
    [sent] = [r for r in rows if r.action == "results.sent"]
    assert (sent.actor_kind, sent.actor, sent.study_instance_uid) == ("system", "outbox",
                                                                      study_uid)
    assert sent.uids == [str(ds.SOPInstanceUID)]
    assert sent.peer == "127.0.0.1"
    assert sent.detail == {"destination": "pacs", "ae_title": "DICOM_AI", "sop_instances": 1,
                           "failed": 0}

    headers = {"Authorization": f"Bearer {operator.token}"}
    actor = f"apikey:{operator.info.id}"
    with httpx.Client(base_url=f"http://127.0.0.1:{service.api_address[1]}",
                      timeout=30) as client:
        with db.sessions() as session:
            result_id = jobs.results_of_job(session, job_id)[0].id
            outbox_id = outbox.list_outbox(session, order="asc")[0][0].id
        assert client.post(f"/api/jobs/{job_id}/rerun", headers=headers).status_code == 201
        assert client.post(f"/api/results/{result_id}/resend",
                           headers=headers).status_code == 200
        assert client.post(f"/api/outbox/{outbox_id}/retry",
                           headers=headers).status_code in (200, 409)
        assert client.post(f"/api/batches/{batch_id}/cancel",
                           headers=headers).status_code == 200
        assert client.post("/api/jobs/999999/rerun", headers=headers).status_code == 404
    actions = {r.action: r for r in _events(db, since=now) if r.actor_kind == "api"}
    assert set(actions) == {"job.rerun", "result.resend", "delivery.retry", "batch.cancel"}
    assert {r.actor for r in actions.values()} == {actor}
    assert {r.peer for r in actions.values()} == {"127.0.0.1"}
    assert actions["job.rerun"].study_instance_uid == study_uid
    assert actions["job.rerun"].detail["job_id"] == job_id
    assert actions["result.resend"].detail["result_id"] == result_id
    assert actions["delivery.retry"].detail["outbox_id"] == outbox_id
    assert actions["batch.cancel"].detail == {"batch_id": batch_id}
    _assert_no_patient_data(_events(db))
    db.dispose()


def test_audit_table_is_append_only_and_failures_never_raise(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """storage.audit inserts and reads only; a failed write is logged, not raised."""
    public = {name: obj for name, obj in vars(storage.audit).items()
              if name in storage.audit.__all__ and inspect.isfunction(obj)}
    assert set(public) == {"insert_events", "list_events", "studies_of_instances"}
    source = inspect.getsource(storage.audit)
    for forbidden in ("update(", "delete(", ".delete", "DELETE", "UPDATE", "text("):
        assert forbidden not in source, forbidden

    db = Database(db_url)
    with pytest.raises(ValueError, match="patient data"), db.write_session() as session:
        audit.insert_events(session, [audit.AuditEntry(
            at=datetime.now(UTC), actor_kind="system", actor="x", action="x",
            detail={"PatientName": "x"})])
    # No audit table yet (no migration): the write fails, is logged, and nothing raises.
    auditor = Auditor(db)
    with caplog.at_level(logging.ERROR, logger="dicom_ai.audit"):
        assert auditor.record("system", "test", "job.rerun", detail={"job_id": 1}) is False
        auditor.submit([])
        auditor.submit(lambda: [])
        assert auditor.flush(5)
    assert "could not record 1 event(s) (job.rerun)" in caplog.text
    db.upgrade()
    assert auditor.record("system", "test", "job.rerun", uids=[f"1.2.{i}" for i in range(150)],
                          detail={"job_id": 1}) is True
    auditor.close()
    [row] = _events(db)
    assert len(row.uids) == audit.MAX_UIDS
    assert row.detail == {"job_id": 1, "uids_total": 150}
    db.dispose()
