"""No patient data in errors, logs, tables or answers; no forged log lines (issue 17).

The canary test pushes, with dcmtk ``storescu``, an image whose every patient attribute carries
a canary (the birth date in the dashed form a vendor writes, Patient's Sex outside M/F/O, a
one-component name that highdicom warns about) through the whole loop with the default
``api.show_patient_names = false``: receive, route, the bundled model in a worker process, SR
and heat-map SC built and sent to a dcmtk ``storescp`` (index on SQLite and PostgreSQL). Then it
greps every log the session and the service wrote, every column of every table of the index
(except the patient columns the Q/R index keeps on purpose) and every answer of the API and the
dashboard: no canary may appear. Before the fix, highdicom's ``Unable to convert '1873-04-29' to
'DA' object`` reached ``jobs.error``, the log, the API and the dashboard, and pydicom's
``Invalid value for VR DA: '1873-04-29'`` the log.

The log-forging test sends a raw A-ASSOCIATE-RQ (pynetdicom refuses to build such a title on
our side) whose calling AE title holds a newline: pynetdicom aborts it and logs the title it
refused; before the fix that log line was split in two, the second starting ``FAKE LINE``.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from sqlalchemy import MetaData, select

from dicom_ai.config import Settings
from dicom_ai.logs import setup_logging
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import apikeys
from storage.db import Database
from tests.conftest import SESSION_LOG, need_binary
from tests.integration.test_loop import (
    assert_iod_valid,
    assert_valid_sr,
    db_jobs,
    loop_settings,
    push,
    received,
)
from tests.peers import StoreSCP, wait_until

BIRTH_DATE = "1873-04-29"  # dashed: not a DA value (PS3.5 6.2); highdicom refuses to copy it
# Every patient attribute (PS3.3 C.7.1.1 Patient, C.7.2.2 Patient Study) with its canary.
CANARIES: dict[str, str | list[str]] = {
    "PatientName": "QZCANARYNAME",  # one component: highdicom logs a warning quoting it
    "PatientID": "QZCANARY-PID",
    "IssuerOfPatientID": "QZCANARY-ISSUER",
    "PatientBirthDate": BIRTH_DATE,
    "PatientBirthTime": "QZCANARYBT",
    "PatientSex": "QZCANARYSEX",  # not M, F or O
    "OtherPatientIDs": ["QZCANARY-OPID1", "QZCANARY-OPID2"],
    "OtherPatientNames": ["QZCANARYOTHER^ONE", "QZCANARYOTHER^TWO"],
    "PatientBirthName": "QZCANARYBIRTH^NAME",
    "PatientMotherBirthName": "QZCANARYMOTHER^NAME",
    "PatientAddress": "QZCANARY ADDRESS 1",
    "PatientTelephoneNumbers": "QZCANARY-TEL",
    "EthnicGroup": "QZCANARYETHNIC",
    "PatientComments": "QZCANARY COMMENT",
    "PatientAge": "QZCANARYAGE",
    "Occupation": "QZCANARYJOB",
    "AdditionalPatientHistory": "QZCANARY HISTORY",
    "MedicalAlerts": "QZCANARY ALERT",
}
CANARY = re.compile(r"qzcanary|1873-?04-?29", re.IGNORECASE)
# Where the index keeps patient attributes on purpose (C-FIND at PATIENT level answers them).
PATIENT_COLUMNS = {("patients", column) for column in (
    "patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date", "patient_sex")}

sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def serve_logging() -> Iterator[Callable[[Settings], None]]:
    """Log as ``dicom-ai serve`` does (its ``[logging]`` file); the root logger is restored."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def configure(settings: Settings) -> None:
        setup_logging(settings.logging)

    yield configure
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def _canary_image(tmp_path: Path) -> Path:
    synthesize(tmp_path / "synth", studies=1, seed=31, modality="CR", positive_fraction=1.0,
               difficulty=0.2, compress=False)
    source = sorted((tmp_path / "synth").glob("*/*/*.dcm"))[0]
    ds = dcmread(source)
    with warnings.catch_warnings():  # pydicom warns about the invalid values, quoting them
        warnings.simplefilter("ignore")
        for keyword, value in CANARIES.items():
            setattr(ds, keyword, value)
    path = tmp_path / "canary.dcm"
    ds.save_as(path)
    return path


def _ended(db_url: str) -> list[Any] | None:
    rows = db_jobs(db_url)
    return rows if rows and all(j.state in ("done", "failed") for j in rows) else None


def _both(folder: Path) -> bool:
    found = received(folder)
    return bool(found["sr"] and found["sc"])


def _hits(where: str, text: str) -> list[str]:
    return [f"{where}: ...{text[max(0, m.start() - 80):m.end() + 80]}..."
            for m in CANARY.finditer(text)]


def _table_hits(db_url: str) -> tuple[list[str], set[str]]:
    """Canaries in any column of any table (but the patient columns), and the tables read."""
    db = Database(db_url)
    hits: list[str] = []
    try:
        meta = MetaData()
        meta.reflect(db.engine)
        with db.engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(select(table)).mappings():
                    for column, value in row.items():
                        if (table.name, column) in PATIENT_COLUMNS or value is None:
                            continue
                        hits += _hits(f"{table.name}.{column}", str(value))
        return hits, set(meta.tables)
    finally:
        db.dispose()


def _api_hits(base: str, token: str) -> tuple[list[str], int]:
    """Canaries in the answers of every read endpoint, the metrics and the dashboard."""
    hits: list[str] = []
    answers = 0
    with httpx.Client(base_url=base, timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as client:

        def get(path: str) -> Any:
            nonlocal answers
            answer = client.get(path)
            assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text[:300]}"
            answers += 1
            hits.extend(_hits(path, answer.text))
            return answer.json() if "json" in answer.headers.get("content-type", "") else None

        for path in ("/health", "/ready", "/metrics", "/api/models", "/api/routes",
                     "/api/destinations", "/api/batches", "/api/outbox?limit=500",
                     "/api/findings?limit=500", "/api/series?limit=500",
                     "/api/audit?limit=500", "/dashboard"):
            get(path)
        for study in get("/api/studies?limit=500")["items"]:
            get(f"/api/studies/{study['study_instance_uid']}")
        for job in get("/api/jobs?limit=500")["items"]:
            get(f"/api/jobs/{job['id']}")
    return hits, answers


def test_canaries_in_every_patient_attribute_reach_no_log_table_or_answer(
        tmp_path: Path, db_url: str, start_service: Callable[[Settings], Service],
        serve_logging: Callable[[Settings], None],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    need_binary("storescu")
    image = _canary_image(tmp_path)
    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(tmp_path, db_url, [
            {"name": "dcmtk", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}])
        assert settings.api.show_patient_names is False  # the default
        serve_logging(settings)
        service = start_service(settings)
        push(service, [image])
        # Done, or failed for good (before the fix: three attempts, each quoting the date).
        ended = wait_until(lambda: _ended(db_url), 120, "the job to end")
        if ended[0].state == "done":  # its results go out; wait for them too
            wait_until(lambda: _both(scp.folder), 60, "the SR and the heat-map SC at storescp")
        db = Database(db_url)
        with db.write_session() as session:
            token = apikeys.create_key(session, name="phi", role="read",
                                       now=datetime.now(UTC)).token
        db.dispose()
        assert service.api_address is not None
        api_hits, answers = _api_hits(f"http://127.0.0.1:{service.api_address[1]}", token)

    table_hits, tables = _table_hits(db_url)
    assert {"patients", "jobs", "outbox", "audit_events", "routing_decisions"} <= tables
    assert answers >= 15
    assert settings.logging.file is not None
    logs = [settings.logging.file, tmp_path_factory.getbasetemp() / SESSION_LOG]
    log_hits = [hit for path in logs if path.is_file()
                for hit in _hits(path.name, path.read_text(encoding="utf-8", errors="replace"))]
    # The worker logged about this patient's job (so the grep looked at the right place).
    assert re.search(r"job \d+ (done|attempt)", settings.logging.file.read_text())
    found = table_hits + api_hits + log_hits
    assert not found, f"{len(found)} canary hit(s):\n" + "\n".join(found[:30])
    # The quirky patient module was emptied on the results' copy: the job did its work, and
    # the SR and the SC are valid.
    assert [(j.state, j.error) for j in db_jobs(db_url)] == [("done", None)]
    got = received(scp.folder)
    assert_valid_sr(got["sr"][0])
    assert_iod_valid(got["sc"][0])
    sr = dcmread(got["sr"][0])
    assert (sr.PatientID, sr.PatientBirthDate, sr.PatientSex) == ("QZCANARY-PID", "", "")


# -- a calling AE title that tries to forge a log line ------------------------------------------
def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _associate_rq(called: bytes, calling: bytes) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2) for Verification, titles as raw 16-byte fields."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1")
                    + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384))
                 + _item(0x52, b"1.2.826.0.1.3680043.9.7433"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        assert chunk, "connection closed"
        head += chunk
    kind, _, length = struct.unpack(">BBI", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed"
        body += chunk
    return kind, body


@sqlite_only
def test_control_characters_in_a_calling_ae_title_cannot_forge_a_log_line(
        make_settings: Callable[..., Settings], start_service: Callable[[Settings], Service],
        serve_logging: Callable[[Settings], None]) -> None:
    settings = make_settings(logging={"level": "INFO"})
    serve_logging(settings)
    service = start_service(settings)
    assert service.address is not None
    forged = b"EVIL\nFAKE LINE\r"  # 15 bytes: a valid field length, invalid characters
    with socket.create_connection(("127.0.0.1", service.address[1]), timeout=10) as sock:
        sock.sendall(_associate_rq(settings.dicom.ae_title.encode(), forged))
        # pynetdicom cannot decode the title (control characters): it aborts, and logs the
        # title it refused in its own error line, which is where a forged line would start.
        kind, _ = _read_pdu(sock)
        assert kind == 0x07, f"expected A-ABORT, got PDU type {kind:#x}"
    assert settings.logging.file is not None
    log = settings.logging.file
    wait_until(lambda: "Calling AE Title" in log.read_text(), 10, "pynetdicom's error line")
    lines = log.read_text(encoding="utf-8").splitlines()
    assert not any("FAKE LINE" in line and "EVIL" not in line for line in lines), lines[-20:]
    assert any("value 'EVIL\\nFAKE LINE" in line for line in lines), lines[-20:]
    # Every line is a record or part of a traceback (frames, the message line, chain text).
    record = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[\d+\] [\w.]+: ")
    in_traceback = False
    for line in lines:
        if record.match(line):
            in_traceback = False
        elif line == "Traceback (most recent call last):":
            in_traceback = True
        else:
            assert in_traceback, f"a line that is no record: {line!r}"
