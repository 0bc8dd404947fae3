"""Query/Retrieve closed by default, retrieve by unique keys only, linear wildcard matching.

Issue 17's findings against the running service with dcmtk: with the default configuration any
calling AE could C-FIND every patient and one ``getscu -k PatientID=?*`` at PATIENT level
retrieved the whole store; the called AE title was never checked; a 19-character wildcard on a
result series' SeriesDescription stalled the receiver for minutes. Each test here failed on
that code.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread

from dicom_ai.config import Settings
from dicom_ai.network.handlers import host_allowed
from dicom_ai.service import Service
from storage import audit
from storage.db import Database
from tests.conftest import need_binary
from tests.integration.test_qr_scp import QR_CALLERS, Stored, find, store_studies, viewer
from tests.peers import ENV, StoreSCP, storescu

__all__ = ["viewer"]  # the fixture, shared with test_qr_scp

PATIENT_ID = "QR-1"  # the CT study's patient (tests/integration/test_qr_scp.py)


def _dcmtk(tool: str, port: int, keys: Sequence[str], *, model: str = "-S",
           calling: str = "RETRIEVER", extra: Sequence[str] = ()
           ) -> subprocess.CompletedProcess[str]:
    args = [need_binary(tool), "-v", model, "-aet", calling, "-aec", "DICOM_AI", *extra,
            *[a for k in keys for a in ("-k", k)], "127.0.0.1", str(port)]
    return subprocess.run(args, env=ENV, capture_output=True, text=True, check=False,
                          timeout=60)


def _get(port: int, keys: Sequence[str], folder: Path, *, model: str = "-S",
         calling: str = "RETRIEVER") -> tuple[set[str], str]:
    """getscu into `folder`: the SOP Instance UIDs received and the tool's log."""
    folder.mkdir(parents=True, exist_ok=True)
    result = _dcmtk("getscu", port, keys, model=model, calling=calling,
                    extra=["-od", str(folder)])
    received = {str(dcmread(p).SOPInstanceUID) for p in folder.iterdir()}
    return received, result.stdout + result.stderr


def _audit_rows(db_url: str, action: str, count: int, timeout: float = 10.0
                ) -> list[audit.AuditRecord]:
    """The first `count` rows of `action` (the receiver writes them on its own thread)."""
    db = Database(db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with db.sessions() as session:
                rows = audit.list_events(session, limit=500, order="asc", action=action)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)
    finally:
        db.dispose()


def _not_authorised(log: str) -> bool:
    """dcmtk 3.6.7 names no C-FIND/C-GET status 0x0124: it prints "Unknown Status: 0x124"."""
    return any(s in log.lower() for s in ("0x124", "0x0124", "notauthori"))


def _no_patient_values(rows: Sequence[audit.AuditRecord]) -> None:
    text = json.dumps([r.to_dict() for r in rows])
    for value in (PATIENT_ID, "Doe", "SYN0"):
        assert value not in text, f"{value} in the audit trail"


def test_called_ae_title_must_be_ours(
        make_settings: Callable[..., Settings],
        start_service: Callable[[Settings], Service]) -> None:
    """``[dicom] check_called_aet`` (default true): another called AE title is rejected."""
    echoscu = need_binary("echoscu")
    service = start_service(make_settings())
    assert service.address is not None
    port = str(service.address[1])

    def echo(called: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([echoscu, "-v", "-aec", called, "127.0.0.1", port], env=ENV,
                              capture_output=True, text=True, check=False, timeout=30)

    wrong = echo("WRONG")
    assert wrong.returncode != 0
    log = wrong.stdout + wrong.stderr
    assert "Called AE Title Not Recognized" in log, log
    assert echo("DICOM_AI").returncode == 0


def test_query_retrieve_is_closed_by_default(
        tmp_path: Path, make_settings: Callable[..., Settings],
        start_service: Callable[[Settings], Service], db_url: str, viewer: StoreSCP) -> None:
    """Empty ``[query_retrieve]``: storage and echo work, every C-FIND/C-MOVE/C-GET refused."""
    stored = store_studies(tmp_path, make_settings(), start_service, db_url, viewer)
    port = stored.port  # the CT and CR studies were stored: C-STORE is unaffected

    answers, log = find(stored.port, "-P", "PATIENT", ["PatientID=*", "PatientName"],
                        tmp_path / "find", extra=["-v"])
    assert answers == []
    assert _not_authorised(log), log

    received, log = _get(port, ["QueryRetrieveLevel=STUDY",
                                f"StudyInstanceUID={stored.ct_study}"], tmp_path / "got")
    assert received == set()
    assert _not_authorised(log), log

    moved = _dcmtk("movescu", port, ["QueryRetrieveLevel=STUDY",
                                     f"StudyInstanceUID={stored.ct_study}"],
                   extra=["-aem", "STORESCP"])
    log = moved.stdout + moved.stderr
    assert "MoveDestinationUnknown" in log or "0xa801" in log.lower(), log
    assert list(viewer.folder.iterdir()) == []
    assert subprocess.run([need_binary("echoscu"), "-aec", "DICOM_AI", "127.0.0.1", str(port)],
                          env=ENV, check=False, timeout=30).returncode == 0

    # Each refusal is audited: caller, host, level, key names, status, reason; no values.
    [found] = _audit_rows(db_url, "query.find", 1)
    assert found.actor == "FINDSCU"
    assert found.peer == "127.0.0.1"
    assert found.detail == {"model": "patient", "level": "PATIENT", "keys": ["PatientID"],
                            "studies": 0, "status": "0x0124",
                            "reason": "calling AE title not allowed"}
    [got] = _audit_rows(db_url, "retrieve.get", 1)
    assert got.detail["status"] == "0x0124"
    assert (got.detail["level"], got.detail["keys"]) == ("STUDY", ["StudyInstanceUID"])
    [move] = _audit_rows(db_url, "retrieve.move", 1)
    assert move.detail["status"] == "0xA801"
    assert move.detail["reason"] == "calling AE title not allowed"
    _no_patient_values([found, got, move])


def test_only_allowed_callers_from_allowed_hosts_query(
        tmp_path: Path, make_settings: Callable[..., Settings],
        start_service: Callable[[Settings], Service], db_url: str, viewer: StoreSCP) -> None:
    """A storage AE admitted to the association is not a Q/R caller; hosts narrow it down."""
    settings = make_settings(
        dicom={"allowed_calling_aets": ["STORESCU", "FINDSCU", "MODALITY"]},
        query_retrieve={"allowed_calling_aets": ["FINDSCU"]})
    stored = store_studies(tmp_path, settings, start_service, db_url, viewer)
    answers, _ = find(stored.port, "-S", "STUDY", ["StudyInstanceUID"], tmp_path / "allowed")
    assert len(answers) == 2
    # MODALITY may store (the association is accepted) but may not query.
    modality = _dcmtk("findscu", stored.port, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"],
                      calling="MODALITY")
    log = modality.stdout + modality.stderr
    assert _not_authorised(log), log
    assert storescu(stored.port, stored.ct_files[:1], calling="MODALITY").returncode == 0
    stored.service.stop()

    # The caller is allowed, the host is not (loopback is outside 10.0.0.0/8).
    elsewhere = start_service(make_settings(
        query_retrieve={"allowed_calling_aets": ["FINDSCU"], "allowed_hosts": ["10.0.0.0/8"]}))
    assert elsewhere.address is not None
    answers, log = find(elsewhere.address[1], "-S", "STUDY", ["StudyInstanceUID"],
                        tmp_path / "far", extra=["-v"])
    assert answers == []
    assert _not_authorised(log), log
    rows = _audit_rows(db_url, "query.find", 3)
    assert [r.detail.get("reason") for r in rows] == [
        None, "calling AE title not allowed", "host not allowed"]
    assert [r.actor for r in rows] == ["FINDSCU", "MODALITY", "FINDSCU"]


def test_allowed_hosts_match_addresses_and_networks() -> None:
    """An IPv4 peer seen on a dual-stack socket (``::ffff:a.b.c.d``) matches IPv4 entries."""
    networks = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.168.1.7/32", "fd00::/8")]
    assert host_allowed("10.1.2.3", networks)
    assert host_allowed("::ffff:10.1.2.3", networks)
    assert host_allowed("192.168.1.7", networks)
    assert host_allowed("fd00::1%eth0", networks)
    assert not host_allowed("192.168.1.8", networks)
    assert not host_allowed("::1", networks)
    assert not host_allowed("not an address", networks)


def _allowed(tmp_path: Path, make_settings: Callable[..., Settings],
             start_service: Callable[[Settings], Service], db_url: str,
             viewer: StoreSCP) -> Stored:
    settings = make_settings(query_retrieve={"allowed_calling_aets": QR_CALLERS})
    return store_studies(tmp_path, settings, start_service, db_url, viewer)


def test_retrieve_selects_by_unique_keys_only(
        tmp_path: Path, make_settings: Callable[..., Settings],
        start_service: Callable[[Settings], Service], db_url: str, viewer: StoreSCP) -> None:
    """PS3.4 C.4.2.2.1 / C.4.3.2.1: no wildcard, universal value or other key selects."""
    stored = _allowed(tmp_path, make_settings, start_service, db_url, viewer)
    port = stored.port
    ct = {str(dcmread(p).SOPInstanceUID) for p in stored.ct_files} | {stored.sr_sop}
    runs = iter(range(100))

    def get(*keys: str, model: str = "-S") -> tuple[set[str], str]:
        return _get(port, keys, tmp_path / f"get{next(runs)}", model=model)

    # The finding: one C-GET at PATIENT level with PatientID=?* took every patient's studies.
    for keys in (["QueryRetrieveLevel=PATIENT", "PatientID=?*"],
                 ["QueryRetrieveLevel=PATIENT", "PatientID=*"],
                 ["QueryRetrieveLevel=PATIENT", "PatientID="],
                 ["QueryRetrieveLevel=PATIENT", "PatientID=QR-?"],
                 ["QueryRetrieveLevel=PATIENT", "PatientName=*"]):
        received, log = get(*keys, model="-P")
        assert received == set(), keys
        assert "DataSetDoesNotMatchSOPClass" in log or "0xa900" in log.lower(), log
    for keys in (["QueryRetrieveLevel=STUDY", "StudyInstanceUID=*"],
                 ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.*"],
                 ["QueryRetrieveLevel=STUDY", "StudyInstanceUID="],
                 # a key of a level below the retrieve level
                 ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={stored.ct_study}",
                  f"SeriesInstanceUID={stored.ct_series}"],
                 # a list above the retrieve level
                 ["QueryRetrieveLevel=SERIES",
                  f"StudyInstanceUID={stored.ct_study}\\{stored.cr_study}",
                  f"SeriesInstanceUID={stored.ct_series}"]):
        received, log = get(*keys)
        assert received == set(), keys
        assert "DataSetDoesNotMatchSOPClass" in log or "0xa900" in log.lower(), log
    moved = _dcmtk("movescu", port, ["QueryRetrieveLevel=PATIENT", "PatientID=?*"],
                   model="-P", extra=["-aem", "STORESCP"])
    log = moved.stdout + moved.stderr
    assert "DataSetDoesNotMatchSOPClass" in log or "0xa900" in log.lower(), log
    assert list(viewer.folder.iterdir()) == []

    # What a retrieve may say: a single value, a UID list at its level, empty return keys.
    received, _ = get("QueryRetrieveLevel=PATIENT", f"PatientID={PATIENT_ID}", model="-P")
    assert received == ct
    received, _ = get("QueryRetrieveLevel=STUDY",
                      f"StudyInstanceUID={stored.ct_study}\\{stored.cr_study}",
                      "PatientName=", "StudyDate=")
    assert ct < received
    assert len(received) == len(ct) + 1
    received, _ = get("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={stored.ct_study}",
                      f"SeriesInstanceUID={stored.sr_series}")
    assert received == {stored.sr_sop}
    # Other keys with values (a copied C-FIND answer) are ignored, never matched: a StudyDate
    # that matches nothing still retrieves the study named by its UID.
    received, _ = get("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={stored.ct_study}",
                      "StudyDate=19000101", "PatientName=*")
    assert received == ct

    # Audited with the key names (never values) and the sub-operations.
    rows = _audit_rows(db_url, "retrieve.get", 14)
    refused = [r for r in rows if r.detail["status"] == "0xA900"]
    assert len(refused) == 10
    assert refused[0].detail["keys"] == ["PatientID"]
    assert refused[4].detail["keys"] == ["PatientName"]
    accepted = [r for r in rows if r.detail["status"] == "0xFF00"]
    assert [r.detail["suboperations"] for r in accepted] == [4, 5, 1, 4]
    assert accepted[0].detail["keys"] == ["PatientID"]
    assert accepted[1].detail["keys"] == ["StudyInstanceUID"]
    assert accepted[3].detail["keys"] == ["PatientName", "StudyDate", "StudyInstanceUID"]
    _no_patient_values(rows)


def test_wildcards_on_result_headers_match_in_linear_time(
        tmp_path: Path, make_settings: Callable[..., Settings],
        start_service: Callable[[Settings], Service], db_url: str, viewer: StoreSCP) -> None:
    """SeriesDescription of our SR results is matched in Python (the index lacks it): the
    pattern that backtracked for minutes on this 40-character value answers at once."""
    settings = make_settings(query_retrieve={"allowed_calling_aets": QR_CALLERS})
    description = "AI findings: chest nodule model v1.2.3.4"
    assert len(description) == 40
    stored = store_studies(tmp_path, settings, start_service, db_url, viewer,
                           sr_description=description)
    started = time.monotonic()
    answers, log = find(stored.port, "-S", "SERIES",
                        ["SeriesDescription=*?**?**?**?**?**?*Z", "SeriesInstanceUID"],
                        tmp_path / "slow", extra=["-td", "20"])
    elapsed = time.monotonic() - started
    assert answers == [], log
    assert elapsed < 5, f"C-FIND took {elapsed:.1f} s"
    answers, _ = find(stored.port, "-S", "SERIES",
                      ["SeriesDescription=*?**?**?**?**?**?*4", "SeriesInstanceUID"],
                      tmp_path / "match")
    assert [a.SeriesInstanceUID for a in answers] == [stored.sr_series]
