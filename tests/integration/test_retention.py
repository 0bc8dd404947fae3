"""Retention on real files and real SQLite/PostgreSQL indexes: what goes, what always stays.

The world every test starts from is built through the real receive path (the Ingestor), the
real completion and routing code, and the job/outbox functions workers and senders use:

* A: routed, job done, SR + heat-map SC sent at T0 + 1 day (delivered);
* F: routed, job done, SR sent at T0 + 5 days (delivered, later);
* B: routed, job done, SR not sent (undelivered);
* C: still receiving;
* D: routed, job running;
* E: complete, matched no route (processed at T0, nothing to deliver);
* G: routed, job failed for good at T0 + 3 minutes (processed, nothing to deliver).

T0 is 30 days ago, so the CLI and the service (which use the real clock) see the same ages.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from dicom_ai import retention
from dicom_ai.cli import app
from dicom_ai.config import Destination, RetentionSettings, Route, Settings
from dicom_ai.dispatch.scheduler import Scheduler
from dicom_ai.ingest.recovery import reconcile
from dicom_ai.ingest.spool import Ingestor, Received
from dicom_ai.service import Service
from storage import audit, jobs, outbox, repository
from storage.db import Database
from storage.filestore import FileStore
from storage.models import (
    FindingRecord,
    Instance,
    Job,
    OutboxItem,
    Patient,
    ResultObject,
    Series,
    Study,
)
from storage.paging import MAX_LIMIT
from tests.peers import make_ct_series

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=30)
DAY = timedelta(days=1)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class World:
    """The store, the index and what each study of the scenario is."""

    settings: Settings
    store: FileStore
    db: Database
    uids: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)  # store-relative
    job_of: dict[str, int] = field(default_factory=dict)
    results_of: dict[str, list[str]] = field(default_factory=dict)  # store-relative

    def exists(self, relative: str) -> bool:
        """Whether a store file is on disk."""
        return self.store.absolute(relative).is_file()

    def size(self, *names: str) -> int:
        """Bytes of the instance files of these studies."""
        return sum(self.store.absolute(p).stat().st_size for n in names for p in self.files[n])

    def instance_rows(self, name: str) -> int:
        """Indexed instances of a study."""
        with self.db.sessions() as session:
            return int(session.scalar(
                select(func.count(Instance.id)).join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .where(Study.study_instance_uid == self.uids[name])) or 0)

    def study_row(self, name: str) -> bool:
        """Whether the study row exists."""
        with self.db.sessions() as session:
            return session.scalar(select(Study.id).where(
                Study.study_instance_uid == self.uids[name])) is not None

    def job_rows(self, name: str) -> tuple[int, int, int]:
        """(result objects, outbox rows, findings) of a study's job."""
        job_id = self.job_of[name]
        with self.db.sessions() as session:
            return (
                int(session.scalar(select(func.count(ResultObject.id))
                                   .where(ResultObject.job_id == job_id)) or 0),
                int(session.scalar(select(func.count(OutboxItem.id))
                                   .where(OutboxItem.job_id == job_id)) or 0),
                int(session.scalar(select(func.count(FindingRecord.id))
                                   .where(FindingRecord.job_id == job_id)) or 0),
            )

    def snapshot(self) -> tuple[set[str], dict[str, int]]:
        """Every file under the store root and the row count of each table."""
        files = {str(p.relative_to(self.store.root)) for p in self.store.root.rglob("*")
                 if p.is_file() and "index.sqlite3" not in p.name}
        counts = {}
        with self.db.sessions() as session:
            for model in (Patient, Study, Series, Instance, Job, ResultObject, OutboxItem,
                          FindingRecord):
                counts[model.__name__] = int(
                    session.scalar(select(func.count()).select_from(model)) or 0)
        return files, counts


def _write_study(tmp: Path, name: str, description: str) -> list[Path]:
    paths = make_ct_series(tmp / name, 2, size=32, seed=len(name))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyDescription = description
        ds.save_as(path, enforce_file_format=True)
    return paths


def _ingest(store: FileStore, ingestor: Ingestor, paths: list[Path]) -> list[str]:
    stored = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        incoming = store.new_incoming_path()
        shutil.copyfile(path, incoming)
        status = ingestor.ingest(Received(incoming, str(ds.SOPClassUID),
                                          str(ds.SOPInstanceUID), "MODALITY"))
        assert status == 0x0000
        stored.append(store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                          ds.SOPInstanceUID))
    return stored


def _finish(world: World, name: str, *, sent_at: datetime | None) -> None:
    """Claim and complete a study's job with an SR (and a heat-map SC for A); send it."""
    job_id = world.job_of[name]
    study = world.uids[name]
    with world.db.write_session() as session:
        assert jobs.claim_job(session, job_id, owner="w", lease_seconds=300,
                              now=T0 + timedelta(seconds=60)) is not None
    folder = f"results/{study}/{job_id}"
    kinds = [("sr", SR_CLASS), ("heatmap", SC_CLASS)] if name == "A" else [("sr", SR_CLASS)]
    results, paths = [], []
    for n, (kind, sop_class) in enumerate(kinds, start=1):
        sop = f"2.25.{job_id}{n}"
        relative = f"{folder}/{sop}.dcm"
        world.store.absolute(relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(world.store.absolute(world.files[name][0]),
                        world.store.absolute(relative))
        paths.append(relative)
        results.append(jobs.ResultToStore(
            kind=kind, sr_kind="comprehensive" if kind == "sr" else None,
            study_instance_uid=study, series_instance_uid=f"2.25.{job_id}{n}0",
            sop_instance_uid=sop, sop_class_uid=sop_class, path=relative,
            destinations=["pacs"]))
    sop_uid = world.files[name][0].rsplit("/", 1)[1].removesuffix(".dcm")
    finding = {
        "study_instance_uid": study, "series_instance_uid": "1.2.3", "sop_instance_uid": sop_uid,
        "frame_number": None, "model_name": "chest-nodule", "model_version": "1.0.0",
        "label": "nodule", "code_value": "RID50149", "code_scheme": "RADLEX",
        "code_meaning": "Pulmonary nodule", "probability": 0.9, "threshold": 0.5,
        "present": True, "location_kind": "point", "location": {"point": [1, 2]},
        "segment_number": None, "heatmap_path": paths[-1] if name == "A" else None,
        "tracking_uid": f"2.25.{job_id}9",
    }
    with world.db.write_session() as session:
        assert jobs.complete_job(session, job_id, owner="w", model_version="1.0.0",
                                 findings=[finding], results=results, timings={},
                                 now=T0 + timedelta(seconds=120))
    world.results_of[name] = paths
    if sent_at is not None:
        with world.db.write_session() as session:
            for item, _ in outbox.list_outbox(session, order="asc", limit=MAX_LIMIT):
                if item.job_id == job_id:
                    outbox.mark_sent(session, item.id, now=sent_at, detail="")


@pytest.fixture
def world(make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[World]:
    """The seven studies of the module docstring, in a migrated store and index."""
    settings = make_settings(workers={"processes": 0})
    settings = settings.model_copy(update={
        "destinations": [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=9)],
        "routes": [Route(name="chest", match={"StudyDescription": "ROUTE ME"},
                         model="chest-nodule", destinations=["pacs"])],
    })
    store = FileStore(settings.storage.root)
    db = Database(settings.storage.url)
    db.upgrade()
    w = World(settings, store, db)
    ingestor = Ingestor(store, db, settings.storage)
    for name in "ABDEFG":
        paths = _write_study(tmp_path / "src", name, "NO ROUTE" if name == "E" else "ROUTE ME")
        w.uids[name] = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
        w.files[name] = _ingest(store, ingestor, paths)
    with db.write_session() as session:
        repository.complete_quiet(session, now=datetime.now(UTC), series_quiet=0, study_quiet=0)
    paths = _write_study(tmp_path / "src", "C", "ROUTE ME")  # arrives after: still receiving
    w.uids["C"] = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    w.files["C"] = _ingest(store, ingestor, paths)
    Scheduler(settings, db, None).route_pending(now=T0)
    with db.sessions() as session:
        for job in session.scalars(select(Job)).all():
            name = next(n for n, u in w.uids.items() if u == job.study_instance_uid)
            w.job_of[name] = job.id
    assert sorted(w.job_of) == ["A", "B", "D", "F", "G"]  # E matched no route
    _finish(w, "A", sent_at=T0 + DAY)
    _finish(w, "F", sent_at=T0 + 5 * DAY)
    _finish(w, "B", sent_at=None)
    with db.write_session() as session:
        assert jobs.claim_job(session, w.job_of["D"], owner="w", lease_seconds=10**7,
                              now=T0 + timedelta(seconds=60)) is not None
        assert jobs.claim_job(session, w.job_of["G"], owner="w", lease_seconds=300,
                              now=T0 + timedelta(seconds=60)) is not None
        assert jobs.fail_job(session, w.job_of["G"], owner="w", error="cannot decode",
                             retryable=False, backoff_seconds=1,
                             now=T0 + timedelta(seconds=180)) == "failed"
    yield w
    db.dispose()


def _consistent(w: World) -> None:
    """The index and the store agree: reconcile has nothing to do."""
    assert reconcile(w.store, w.db) == (0, 0, 0)
    with w.db.sessions() as session:
        indexed = set(repository.indexed_paths(session))
    assert indexed == set(w.store.iter_relative_paths())


# -- plans --------------------------------------------------------------------------------------
def test_dry_run_lists_exactly_the_delivered_studies_past_the_age(world: World) -> None:
    before = world.snapshot()
    plan = retention.plan(world.db, RetentionSettings(instances_days=2), now=T0 + 6 * DAY)
    # Oldest delivered first: E (routed at T0), G (failed at T0 + 3 min), A (sent T0 + 1 day).
    assert plan.study_instance_uids == [world.uids[n] for n in "EGA"]
    assert [s.delivered_at for s in plan.studies] == [
        T0, T0 + timedelta(seconds=180), T0 + DAY]
    assert {s.reason for s in plan.studies} == {"age"}
    assert plan.instances == 6
    assert plan.size_bytes == world.size("E", "G", "A")
    assert plan.store_bytes == world.size(*"ABCDEFG")
    assert plan.jobs == ()
    assert plan.dry_run
    assert world.snapshot() == before  # nothing deleted
    # F was delivered at T0 + 5 days: inside 2 days of T0 + 6 days, outside 0.5.
    later = retention.plan(world.db, RetentionSettings(instances_days=0.5), now=T0 + 6 * DAY)
    assert later.study_instance_uids == [world.uids[n] for n in "EGAF"]
    assert retention.plan(world.db, RetentionSettings(), now=T0 + 60 * DAY).empty


def test_apply_removes_exactly_the_planned_files_and_rows(world: World) -> None:
    plan = retention.plan(world.db, RetentionSettings(instances_days=2), now=T0 + 6 * DAY)
    removed = retention.apply(plan, world.store, world.db)
    assert not removed.dry_run
    assert removed.study_instance_uids == plan.study_instance_uids
    assert (removed.instances, removed.size_bytes) == (plan.instances, plan.size_bytes)
    for name in "EGA":
        assert not any(world.exists(p) for p in world.files[name])
        assert world.instance_rows(name) == 0
        assert not (world.store.instances / world.uids[name]).exists()  # folders too
    for name in "BCDF":  # undelivered, receiving, running, or not old enough: untouched
        assert all(world.exists(p) for p in world.files[name])
        assert world.instance_rows(name) == 2
        assert world.study_row(name)
    # A's results, findings and job stay (they name UIDs, not instance rows), and so does its
    # study row, through which our Q/R SCP finds the results; E and G had none.
    assert world.study_row("A")
    assert not world.study_row("E")
    assert not world.study_row("G")
    assert world.job_rows("A") == (2, 2, 1)
    assert all(world.exists(p) for p in world.results_of["A"])
    _consistent(world)
    again = retention.plan(world.db, RetentionSettings(instances_days=2), now=T0 + 6 * DAY)
    assert again.empty


def test_results_expire_only_when_every_outbox_row_is_sent(world: World) -> None:
    policy = RetentionSettings(results_days=3)
    assert retention.plan(world.db, policy, now=T0 + 2 * DAY).empty  # not 3 days old yet
    plan = retention.plan(world.db, policy, now=T0 + 6 * DAY)
    # A and F are fully sent; B's SR is still pending; D runs; G failed with no results.
    assert [j.job_id for j in plan.jobs] == sorted([world.job_of["A"], world.job_of["F"]])
    assert (plan.results, plan.findings) == (3, 2)
    assert plan.studies == ()
    removed = retention.apply(plan, world.store, world.db)
    assert (removed.results, removed.findings) == (3, 2)
    for name in "AF":
        assert world.job_rows(name) == (0, 0, 0)
        assert not any(world.exists(p) for p in world.results_of[name])
        assert not (world.store.root / "results" / world.uids[name]).exists()
        assert world.instance_rows(name) == 2  # instances are another policy
    assert world.job_rows("B") == (1, 1, 1)
    assert all(world.exists(p) for p in world.results_of["B"])
    with world.db.sessions() as session:
        assert session.get(Job, world.job_of["A"]) is not None  # job rows stay
    _consistent(world)


def test_results_of_a_study_whose_instances_are_kept_wait_for_them(world: World) -> None:
    # F was delivered at T0 + 5 days: its instances are due at T0 + 7 days, and its send
    # times (what dates the delivery) stay until then, with its results.
    both = RetentionSettings(instances_days=2, results_days=3)
    plan = retention.plan(world.db, both, now=T0 + 6 * DAY)
    assert plan.study_instance_uids == [world.uids[n] for n in "EGA"]
    assert [j.job_id for j in plan.jobs] == [world.job_of["A"]]
    retention.apply(plan, world.store, world.db)
    assert not world.study_row("A")  # no instances and no results left: the row goes too
    assert world.job_rows("F") == (1, 1, 1)
    assert world.instance_rows("F") == 2
    plan = retention.plan(world.db, both, now=T0 + 7 * DAY)
    assert plan.study_instance_uids == [world.uids["F"]]
    assert [j.job_id for j in plan.jobs] == [world.job_of["F"]]
    retention.apply(plan, world.store, world.db)
    assert not world.study_row("F")
    assert world.study_row("B")
    with world.db.sessions() as session:  # the patient still has other studies
        assert session.scalar(select(func.count(Patient.id))) == 1
    _consistent(world)


def test_store_cap_removes_oldest_delivered_first_and_stops_under_it(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    total = world.size(*"ABCDEFG")
    cap = total - world.size("E") - 1  # E alone is not enough; E and G are
    plan = retention.plan(world.db, RetentionSettings(max_store_bytes=cap), now=T0 + DAY)
    assert plan.study_instance_uids == [world.uids["E"], world.uids["G"]]
    assert {s.reason for s in plan.studies} == {"size"}
    assert plan.cap_met
    assert plan.store_bytes_after <= cap < plan.store_bytes_after + world.size("G")
    retention.apply(plan, world.store, world.db)
    assert all(world.exists(p) for n in "ABCDF" for p in world.files[n])
    _consistent(world)

    # A cap nothing delivered can meet: every delivered study goes, nothing else; reported.
    caplog.clear()
    plan = retention.plan(world.db, RetentionSettings(max_store_bytes=1), now=T0 + DAY)
    assert plan.study_instance_uids == [world.uids[n] for n in "AF"]
    assert not plan.cap_met
    assert "above max_store_bytes=1" in caplog.text
    removed = retention.apply(plan, world.store, world.db)
    assert not removed.cap_met
    assert removed.store_bytes_after == world.size(*"BCD")
    for name in "BCD":
        assert all(world.exists(p) for p in world.files[name])
        assert world.instance_rows(name) == 2
    _consistent(world)


def test_late_images_keep_a_study_until_it_is_processed_and_delivered_again(
        world: World, tmp_path: Path) -> None:
    policy = RetentionSettings(instances_days=2)
    plan = retention.plan(world.db, policy, now=T0 + 6 * DAY)
    assert world.uids["A"] in plan.study_instance_uids
    late = make_ct_series(tmp_path / "late", 1, size=32, study_uid=world.uids["A"])
    ingestor = Ingestor(world.store, world.db, world.settings.storage)
    added = _ingest(world.store, ingestor, late)
    # Applying the earlier plan re-checks each study: A is receiving again, so it stays.
    removed = retention.apply(plan, world.store, world.db)
    assert removed.study_instance_uids == [world.uids["E"], world.uids["G"]]
    assert all(world.exists(p) for p in world.files["A"] + added)
    assert world.instance_rows("A") == 3

    def planned() -> list[str]:
        return retention.plan(world.db, policy, now=T0 + 60 * DAY).study_instance_uids

    assert world.uids["A"] not in planned()  # receiving
    with world.db.write_session() as session:
        repository.complete_quiet(session, now=datetime.now(UTC), series_quiet=0,
                                  study_quiet=0)
    assert world.uids["A"] not in planned()  # complete again, not yet routed
    Scheduler(world.settings, world.db, None).route_pending(now=T0 + 2 * DAY)
    assert world.uids["A"] not in planned()  # its new job is pending
    _consistent(world)


def test_a_crash_between_files_and_rows_is_repaired_by_reconcile(world: World) -> None:
    # Apply deletes files first. Stop right there, as a crash would: the rows outlive the
    # files, and reconciliation deletes them; nothing is re-indexed, nothing comes back.
    retention.remove_files(world.store, world.files["A"], under=world.store.instances)
    assert world.instance_rows("A") == 2
    assert reconcile(world.store, world.db) == (0, 2, 0)
    assert world.instance_rows("A") == 0
    plan = retention.plan(world.db, RetentionSettings(instances_days=2), now=T0 + 6 * DAY)
    assert plan.study_instance_uids == [world.uids["E"], world.uids["G"]]
    _consistent(world)


def test_paths_outside_the_folder_are_never_deleted(world: World) -> None:
    outside = world.files["B"][0]
    assert retention.remove_files(world.store, [outside, "../escape.dcm"],
                                  under=world.store.root / "results") == 0
    assert world.exists(outside)


# -- the command and the service ----------------------------------------------------------------
def _toml(world: World, tmp_path: Path, retention_table: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[storage]\nroot = "{world.settings.storage.root}"\n'
        f'database_url = "{world.settings.storage.url}"\n\n'
        f"[retention]\n{retention_table}\n"
    )
    return config


def test_purge_dry_run_json_prints_the_plan(world: World, tmp_path: Path) -> None:
    # 27 days ago is T0 + 3 days: E, G and A were delivered before, F after.
    config = _toml(world, tmp_path, "instances_days = 27\nresults_days = 27\n")
    before = world.snapshot()
    runner = CliRunner()
    result = runner.invoke(app, ["purge", "--dry-run", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    shown: dict[str, Any] = json.loads(result.stdout)
    assert shown["dry_run"] is True
    assert shown["studies"] == [world.uids[n] for n in "EGA"]
    assert shown["instances"] == 6
    assert shown["bytes"] == world.size("E", "G", "A")
    assert shown["jobs"] == [world.job_of["A"]]  # F's instances (and so results) are kept
    assert (shown["results"], shown["findings"]) == (2, 1)
    assert [d["reason"] for d in shown["study_details"]] == ["age"] * 3
    assert world.snapshot() == before

    result = runner.invoke(app, ["purge", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    done: dict[str, Any] = json.loads(result.stdout)
    assert done["dry_run"] is False
    assert done["studies"] == shown["studies"]
    assert not any(world.exists(p) for n in "EGA" for p in world.files[n])
    assert all(world.exists(p) for n in "BCDF" for p in world.files[n])
    with world.db.sessions() as session:  # the audit trail has one row per study and job
        purged = audit.list_events(session, action="purge.applied", order="asc")
    assert [(e.study_instance_uid, e.detail["removed"]) for e in purged] == [
        *((world.uids[n], "instances") for n in "EGA"), (world.uids["A"], "results")]

    result = runner.invoke(app, ["purge", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "removed the instances of 0 stud(ies)" in result.stdout
    _consistent(world)


def test_serve_applies_the_policy_in_the_background(
        world: World, start_service: Callable[[Settings], Service]) -> None:
    settings = world.settings.model_copy(update={
        "retention": RetentionSettings(instances_days=27, interval_seconds=3600)})
    service = start_service(settings)
    assert service.retention is not None
    deadline = time.monotonic() + 20
    while world.instance_rows("A") and time.monotonic() < deadline:
        time.sleep(0.1)
    service.stop()
    for name in "EGA":
        assert world.instance_rows(name) == 0
        assert not any(world.exists(p) for p in world.files[name])
    for name in "BCDF":
        assert world.instance_rows(name) == 2
        assert all(world.exists(p) for p in world.files[name])
