"""Storage Commitment (PS3.4 annex J): a result counts as delivered only once the PACS commits it.

Real peers: Orthanc (a Storage Commitment SCP that reports on a new association to the AE of
its DicomModalities), and a small pynetdicom Storage Commitment SCP written here that reports
objects as failed, or never reports, or reports on the same association.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, build_role
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy import select

from dicom_ai.config import Destination, Settings
from dicom_ai.dimse_status import Status
from dicom_ai.dispatch.delivery import OutboxSender
from dicom_ai.network.contexts import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
)
from dicom_ai.network.scp import Receiver
from dicom_ai.service import Service, build_components
from storage import audit as audit_rows
from storage.db import Database
from storage.models import COMMITTED, PENDING, SENT, Job, OutboxItem, ResultObject
from tests.conftest import need_binary
from tests.integration.test_loop import dicom_files, loop_settings, push
from tests.peers import Orthanc, free_port, wait_until

PACS = "PACS"
OUR_AET = "DICOMAI"


# -- a Storage Commitment SCP of our own ------------------------------------------------------
class CommitmentPeer:
    """A pynetdicom PACS: stores anything, answers N-ACTION, reports as its plan says.

    ``plan`` per N-ACTION received: ``"commit"`` (all committed), ``"fail-first"`` (the first
    object failed with 0x0110, the rest committed), ``"silent"`` (never reports). Reports go on a
    new association to ``report_to`` (proposing the SCP role, as a PACS does), or on the same
    association with ``same_association``.
    """

    def __init__(self, plan: list[str], *, same_association: bool = False) -> None:
        self.plan = plan
        self.same_association = same_association
        self.port = free_port()
        self.report_to: int | None = None
        self.stored: list[str] = []  # SOP Instance UIDs, in C-STORE order
        self.transactions: list[str] = []
        self.report_statuses: list[int] = []
        self.reported = threading.Event()
        self._server: Any = None

    def __enter__(self) -> CommitmentPeer:
        ae = AE(ae_title=PACS)
        ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()

    def _store(self, event: evt.Event) -> int:
        self.stored.append(str(cast(C_STORE, event.request).AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        info = event.action_information
        self.transactions.append(str(info.TransactionUID))
        step = self.plan[min(len(self.transactions), len(self.plan)) - 1]
        if step != "silent":
            report, event_type = self._report(info, step)
            if self.same_association:
                assoc = event.assoc
                threading.Thread(target=self._send_on, args=(assoc, report, event_type),
                                 daemon=True).start()
            else:
                threading.Thread(target=self._send_new, args=(report, event_type),
                                 daemon=True).start()
        return 0x0000, None

    @staticmethod
    def _report(info: Dataset, step: str) -> tuple[Dataset, int]:
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        refs = list(info.ReferencedSOPSequence)
        if step == "fail-first":
            failed = refs.pop(0)
            failed.FailureReason = 0x0110
            report.FailedSOPSequence = [failed]
        report.ReferencedSOPSequence = refs
        return report, 2 if step == "fail-first" else 1

    def _send_on(self, assoc: Any, report: Dataset, event_type: int) -> None:
        time.sleep(0.05)  # after the N-ACTION response went out
        status, _ = assoc.send_n_event_report(report, event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                              STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        self.report_statuses.append(int(status.Status) if "Status" in status else -1)
        self.reported.set()

    def _send_new(self, report: Dataset, event_type: int) -> None:
        assert self.report_to is not None
        status = send_report(PACS, self.report_to, report, event_type)
        self.report_statuses.append(status)
        self.reported.set()


def send_report(calling: str, port: int, report: Dataset, event_type: int = 1) -> int:
    """N-EVENT-REPORT on a new association, as a PACS sends it; returns the status (-1: none,
    -2: the context was refused)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AET,
                         ext_neg=[build_role(STORAGE_COMMITMENT_PUSH_MODEL, scp_role=True)])
    if not assoc.is_established:
        return -3
    try:
        if not assoc.accepted_contexts:
            return -2
        status, _ = assoc.send_n_event_report(report, event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                              STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


# -- the outbox, without the model loop -------------------------------------------------------
def settings_for(make_settings: Callable[..., Settings], peer_port: int, *,
                 commitment: bool = True, timeout: float = 600) -> Settings:
    settings = make_settings(
        dicom={"ae_title": OUR_AET},
        delivery={"retry_initial_seconds": 0.1, "retry_max_seconds": 0.1,
                  "commitment_timeout_seconds": timeout})
    return settings.model_copy(update={"destinations": [Destination(
        name="pacs", ae_title=PACS, host="127.0.0.1", port=peer_port,
        storage_commitment=commitment)]})


def add_results(settings: Settings, db: Database, n: int) -> list[str]:
    """`n` result files (small SC objects) under results/ and an outbox row each."""
    now = datetime.now(UTC)
    folder = settings.storage.root / "results"
    folder.mkdir(parents=True, exist_ok=True)
    study, series = str(generate_uid()), str(generate_uid())
    uids = []
    with db.write_session() as session:
        job = Job(study_instance_uid=study, route="r", model_name="m", state="done",
                  not_before=now, created_at=now)
        session.add(job)
        session.flush()
        for i in range(n):
            uid = str(generate_uid())
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.Modality = "OT"
            ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
            result = ResultObject(job_id=job.id, kind="heatmap", study_instance_uid=study,
                                  series_instance_uid=series, sop_instance_uid=uid,
                                  sop_class_uid=SecondaryCaptureImageStorage,
                                  path=f"results/{i}.dcm", created_at=now)
            session.add(result)
            session.flush()
            session.add(OutboxItem(result_id=result.id, job_id=job.id, destination="pacs",
                                   state=PENDING, attempts=0, next_attempt_at=now,
                                   created_at=now))
            uids.append(uid)
    return uids


def outbox_by_uid(db: Database) -> dict[str, OutboxItem]:
    with db.sessions() as session:
        return {str(r.sop_instance_uid): item for item, r in session.execute(
            select(OutboxItem, ResultObject).join(ResultObject,
                                                  OutboxItem.result_id == ResultObject.id))}


@pytest.fixture
def receiver_for() -> Iterator[Callable[[Settings], tuple[Receiver, Database, int]]]:
    """Start a receiver (and migrate the index) for settings; stopped at teardown."""
    started: list[tuple[Receiver, Database]] = []

    def start(settings: Settings) -> tuple[Receiver, Database, int]:
        parts = build_components(settings)
        parts.db.upgrade()
        receiver = Receiver(settings.dicom, parts.ingestor, parts.mpps,
                            destinations=settings.destinations)
        _, port = receiver.start()
        started.append((receiver, parts.db))
        return receiver, parts.db, port

    yield start
    for receiver, db in started:
        receiver.stop(grace_seconds=1)
        db.dispose()


@pytest.mark.postgres
def test_failed_object_is_sent_again_with_its_uid_and_committed(
        make_settings: Callable[..., Settings],
        receiver_for: Callable[[Settings], tuple[Receiver, Database, int]]) -> None:
    with CommitmentPeer(["fail-first", "commit"]) as peer:
        settings = settings_for(make_settings, peer.port)
        _, db, port = receiver_for(settings)
        peer.report_to = port
        first, second = add_results(settings, db, 2)
        sender = OutboxSender(settings, db)
        assert sender.send_due() == 2
        wait_until(peer.reported.is_set, 10, "the first report")
        assert peer.report_statuses == [0x0000]
        rows = outbox_by_uid(db)
        assert rows[second].state == COMMITTED
        assert rows[second].committed_at is not None
        assert rows[first].state == PENDING
        assert "0x0110" in (rows[first].last_error or "")
        peer.reported.clear()
        assert sender.send_due() == 1  # the failed one, due at once
        wait_until(peer.reported.is_set, 10, "the second report")
        rows = outbox_by_uid(db)
        assert {r.state for r in rows.values()} == {COMMITTED}
        assert peer.stored == [first, second, first], "re-sent with the same SOP Instance UID"
        assert len(set(peer.transactions)) == 2

        def audited() -> bool:
            with db.sessions() as session:
                actions = [e.action for e in audit_rows.list_events(session, limit=100)]
            return actions.count("results.committed") >= 2

        wait_until(audited, 10, "two results.committed audit rows")


@pytest.mark.postgres
def test_unreported_commitment_is_sent_again_after_the_timeout(
        make_settings: Callable[..., Settings],
        receiver_for: Callable[[Settings], tuple[Receiver, Database, int]]) -> None:
    with CommitmentPeer(["silent", "commit"]) as peer:
        settings = settings_for(make_settings, peer.port, timeout=2)
        _, db, port = receiver_for(settings)
        peer.report_to = port
        [uid] = add_results(settings, db, 1)
        sender = OutboxSender(settings, db)
        assert sender.send_due() == 1
        assert outbox_by_uid(db)[uid].state == SENT, "awaiting its report"
        assert sender.send_due() == 0, "not yet timed out"
        time.sleep(2.2)
        assert sender.send_due() == 1, "the timeout sweep made it due again"
        wait_until(peer.reported.is_set, 10, "the report of the second request")
        assert peer.stored == [uid, uid]
        assert outbox_by_uid(db)[uid].state == COMMITTED


def test_reports_from_another_ae_or_for_unknown_transactions_change_nothing(
        make_settings: Callable[..., Settings],
        receiver_for: Callable[[Settings], tuple[Receiver, Database, int]]) -> None:
    with CommitmentPeer(["silent"]) as peer:
        settings = settings_for(make_settings, peer.port)
        _, db, port = receiver_for(settings)
        [uid] = add_results(settings, db, 1)
        assert OutboxSender(settings, db).send_due() == 1
        [transaction] = peer.transactions
        report = Dataset()
        report.TransactionUID = transaction
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = (
            SecondaryCaptureImageStorage, uid)
        report.ReferencedSOPSequence = [ref]
        assert send_report("EVIL", port, report) == Status.NOT_AUTHORISED
        unknown = copy.deepcopy(report)
        unknown.TransactionUID = str(generate_uid())
        assert send_report(PACS, port, unknown) == Status.UNKNOWN_TRANSACTION
        row = outbox_by_uid(db)[uid]
        assert row.state == SENT
        assert row.commit_transaction_uid == transaction
        # The destination itself is heard.
        assert send_report(PACS, port, report) == 0x0000
        assert outbox_by_uid(db)[uid].state == COMMITTED


def test_receiver_refuses_commitment_reports_when_no_destination_asks(
        make_settings: Callable[..., Settings],
        receiver_for: Callable[[Settings], tuple[Receiver, Database, int]]) -> None:
    settings = settings_for(make_settings, free_port(), commitment=False)
    _, _, port = receiver_for(settings)
    report = Dataset()
    report.TransactionUID = str(generate_uid())
    assert send_report(PACS, port, report) in (-2, -3), "closed by default"


def test_reports_come_only_from_callers_the_receiver_allows(
        make_settings: Callable[..., Settings],
        receiver_for: Callable[[Settings], tuple[Receiver, Database, int]]) -> None:
    """[dicom] allowed_calling_aets applies to the PACS calling back: it must be listed."""
    settings = settings_for(make_settings, free_port())
    report = Dataset()
    report.TransactionUID = str(generate_uid())
    closed = settings.model_copy(update={"dicom": settings.dicom.model_copy(
        update={"allowed_calling_aets": ["MODALITY"]})})
    _, _, port = receiver_for(closed)
    assert send_report(PACS, port, report) == -3, "association rejected"
    listed = settings.model_copy(update={"dicom": settings.dicom.model_copy(
        update={"allowed_calling_aets": ["MODALITY", PACS]})})
    _, _, port = receiver_for(listed)
    assert send_report(PACS, port, report) == Status.UNKNOWN_TRANSACTION, "heard, then refused"


def test_report_on_the_same_association_is_taken(
        make_settings: Callable[..., Settings],
        receiver_for: Callable[[Settings], tuple[Receiver, Database, int]]) -> None:
    with CommitmentPeer(["commit"], same_association=True) as peer:
        settings = settings_for(make_settings, peer.port)
        _, db, _ = receiver_for(settings)
        uids = add_results(settings, db, 2)
        assert OutboxSender(settings, db).send_due() == 2
        assert peer.report_statuses == [0x0000]
        rows = outbox_by_uid(db)
        assert [rows[u].state for u in uids] == [COMMITTED, COMMITTED]


# -- Orthanc, the whole loop ------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_cr_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dicom_ai.training.synth import synthesize

    out = tmp_path_factory.mktemp("cr2")
    synthesize(out, studies=2, seed=11, modality="CR", positive_fraction=0.5, difficulty=0.3,
               compress=False)
    return out


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_orthanc_commits_the_results_of_the_loop(
        tmp_path: Path, db_url: str, two_cr_studies: Path,
        start_service: Callable[[Settings], Service]) -> None:
    need_binary("storescu")
    need_binary("Orthanc")
    our_port = free_port()
    with Orthanc(tmp_path / "orthanc",
                 modalities={"DICOMAI": ("DICOM_AI", "127.0.0.1", our_port)}) as orthanc:
        settings = loop_settings(
            tmp_path, db_url,
            [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
              "port": orthanc.port, "storage_commitment": True}],
            dicom={"host": "127.0.0.1", "port": our_port, "receivers": 1})
        service = start_service(settings)
        push(service, dicom_files(two_cr_studies))
        db = Database(db_url)
        try:
            def committed() -> dict[str, OutboxItem] | None:
                rows = outbox_by_uid(db)
                return rows if len(rows) == 4 and all(
                    r.state == COMMITTED for r in rows.values()) else None

            rows = wait_until(committed, 150, "2 SRs and 2 SCs committed by Orthanc")
            delays = [(r.committed_at - r.commit_requested_at).total_seconds()
                      for r in rows.values() if r.committed_at and r.commit_requested_at]
            print(f"N-ACTION to committed: {min(delays):.3f}-{max(delays):.3f} s")
            with db.sessions() as session:
                events = audit_rows.list_events(session, limit=500)
            committed_rows = [e for e in events if e.action == "results.committed"]
            assert len({e.study_instance_uid for e in committed_rows}) == 2
            assert {e.actor for e in committed_rows} == {orthanc.aet}
            # The report came on a new association from Orthanc to our receiver.
            assert any(e.action == "association.accepted" and e.actor == orthanc.aet
                       for e in events)
        finally:
            db.dispose()
        assert orthanc.rest("/statistics")["CountInstances"] == 4
        # Orthanc ran one StorageCommitmentScp job per N-ACTION (its log says nothing of them).
        scp_jobs = [j for j in orthanc.rest("/jobs?expand")
                    if j.get("Type") == "StorageCommitmentScp"]
        print("Orthanc storage commitment jobs:", [
            (j.get("State"), j.get("Content")) for j in scp_jobs])
        assert len(scp_jobs) == 2
        assert {j.get("State") for j in scp_jobs} == {"Success"}
