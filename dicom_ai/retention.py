"""Retention: delete what was processed and delivered, by age and by store size; never the rest.

``[retention]`` has three policies, each off until set:

* ``instances_days``: a study's received instances are deleted this many days after it was
  *delivered* (complete, routed, no job pending or running, every outbox row sent; a study
  whose series matched no route counts as delivered when it was routed);
* ``results_days``: a job's result files (SR, SEG, heat-map SC), result rows, outbox rows and
  findings are deleted this many days after the job finished, once all its outbox rows are
  sent and no job of its study is pending or running (the job row stays, as does every routing
  decision). With ``instances_days`` set too, the results of a delivered study whose instances
  are still kept wait for them: their send times are what dates the delivery;
* ``max_store_bytes``: while the instance store (the sum of the indexed instances' sizes) is
  above this, delivered studies' instances are deleted, oldest delivered first. Undelivered
  studies are never touched; when the cap cannot be met a warning is logged and reported.

:func:`plan` computes what would go (``dicom-ai purge --dry-run`` prints it); :func:`apply`
deletes it, re-checking each study and job right before its delete.

Order of deletes, and crashes: files go first (their directories fsynced), then the rows in one
transaction. A crash in between leaves rows whose files are gone, which start-up recovery and
``dicom-ai db reconcile`` delete (and the next retention run would too) - the intended end
state. The other order would leave files without rows, which recovery re-indexes as a new
study that would be routed and processed again, sending its results twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from dicom_ai.audit import Auditor, entry
from dicom_ai.config import RetentionSettings, Settings
from dicom_ai.periodic import PeriodicWorker
from storage import retention as rows
from storage.db import Database
from storage.filestore import FileStore, fsync_dir

LOGGER = logging.getLogger(__name__)
#: Where workers write result objects, relative to the store root.
RESULTS_FOLDER = "results"


@dataclass(frozen=True)
class StudyRemoval:
    """One study whose received instances go, and why."""

    study_instance_uid: str
    delivered_at: datetime
    instances: int
    size_bytes: int
    reason: Literal["age", "size"]


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention policy removes (or, returned by :func:`apply`, removed).

    Attributes
    ----------
    now : datetime
        The moment ages were measured from.
    studies : tuple of StudyRemoval
        Studies whose instances go, oldest delivered first.
    jobs : tuple of storage.retention.ExpiredResults
        Jobs whose results and findings go, oldest first.
    store_bytes : int
        The instance store's size before.
    max_store_bytes : int or None
        The cap, if one is set.
    cap_met : bool
        False when the store stays above the cap (too little is delivered).
    dry_run : bool
        True for a plan nothing was applied from.
    """

    now: datetime
    studies: tuple[StudyRemoval, ...] = ()
    jobs: tuple[rows.ExpiredResults, ...] = ()
    store_bytes: int = 0
    max_store_bytes: int | None = None
    cap_met: bool = True
    dry_run: bool = True

    @property
    def study_instance_uids(self) -> list[str]:
        """The studies whose instances go, in order."""
        return [s.study_instance_uid for s in self.studies]

    @property
    def instances(self) -> int:
        """Instances removed."""
        return sum(s.instances for s in self.studies)

    @property
    def size_bytes(self) -> int:
        """Bytes of instances removed."""
        return sum(s.size_bytes for s in self.studies)

    @property
    def store_bytes_after(self) -> int:
        """The instance store's size after."""
        return self.store_bytes - self.size_bytes

    @property
    def results(self) -> int:
        """Result objects (SR, SEG, heat-map SC) removed."""
        return sum(j.results for j in self.jobs)

    @property
    def findings(self) -> int:
        """Finding rows removed."""
        return sum(j.findings for j in self.jobs)

    @property
    def empty(self) -> bool:
        """Nothing to remove."""
        return not self.studies and not self.jobs

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (UIDs and counts; never patient data)."""
        return {
            "dry_run": self.dry_run,
            "now": self.now.isoformat(),
            "studies": self.study_instance_uids,
            "instances": self.instances,
            "bytes": self.size_bytes,
            "results": self.results,
            "findings": self.findings,
            "jobs": [j.job_id for j in self.jobs],
            "store_bytes": self.store_bytes,
            "store_bytes_after": self.store_bytes_after,
            "max_store_bytes": self.max_store_bytes,
            "cap_met": self.cap_met,
            "study_details": [
                {"study_instance_uid": s.study_instance_uid,
                 "delivered_at": s.delivered_at.isoformat(), "instances": s.instances,
                 "bytes": s.size_bytes, "reason": s.reason} for s in self.studies],
            "job_details": [
                {"job_id": j.job_id, "study_instance_uid": j.study_instance_uid,
                 "finished_at": j.finished_at.isoformat(), "results": j.results,
                 "findings": j.findings, "outbox": j.outbox} for j in self.jobs],
        }


def plan(db: Database, policy: RetentionSettings, *, now: datetime | None = None
         ) -> RetentionPlan:
    """What `policy` removes now; deletes nothing.

    Parameters
    ----------
    db : Database
        The index.
    policy : RetentionSettings
        The ``[retention]`` section.
    now : datetime, optional
        The moment ages are measured from (timezone-aware; default: now).

    Returns
    -------
    RetentionPlan
        Studies by age then by size (oldest delivered first), expired jobs' results, and
        whether the cap is met.
    """
    now = now or datetime.now(UTC)
    with db.sessions() as session:
        total = rows.store_bytes(session)
        delivered = (rows.delivered_studies(session)
                     if policy.instances_days is not None or policy.max_store_bytes is not None
                     else [])
        expired = ([] if policy.results_days is None else rows.expired_results(
            session, cutoff=now - timedelta(days=policy.results_days)))
    chosen: dict[str, StudyRemoval] = {}
    if policy.instances_days is not None:
        cutoff = now - timedelta(days=policy.instances_days)
        for study in delivered:
            if study.delivered_at <= cutoff:
                chosen[study.study_instance_uid] = _removal(study, "age")
    cap_met = True
    if policy.max_store_bytes is not None:
        remaining = total - sum(s.size_bytes for s in chosen.values())
        for study in delivered:
            if remaining <= policy.max_store_bytes:
                break
            if study.study_instance_uid not in chosen:
                chosen[study.study_instance_uid] = _removal(study, "size")
                remaining -= study.size_bytes
        cap_met = remaining <= policy.max_store_bytes
        if not cap_met:
            LOGGER.warning("the instance store holds %d bytes, above max_store_bytes=%d even "
                           "after removing every delivered study (%d bytes would remain): the "
                           "rest is not yet processed or delivered", total,
                           policy.max_store_bytes, remaining)
    if policy.instances_days is not None:
        # Send times date a delivery; a study whose instances are kept for now keeps them
        # (with its results), or its instances would become due early.
        waiting = {s.study_instance_uid for s in delivered} - set(chosen)
        expired = [e for e in expired if e.study_instance_uid not in waiting]
    studies = sorted(chosen.values(), key=lambda s: (s.delivered_at, s.study_instance_uid))
    return RetentionPlan(now=now, studies=tuple(studies), jobs=tuple(expired), store_bytes=total,
                         max_store_bytes=policy.max_store_bytes, cap_met=cap_met)


def _removal(study: rows.DeliveredStudy, reason: Literal["age", "size"]) -> StudyRemoval:
    return StudyRemoval(study.study_instance_uid, study.delivered_at, study.instances,
                        study.size_bytes, reason)


def apply(plan: RetentionPlan, store: FileStore, db: Database, *,
          should_stop: Callable[[], bool] | None = None) -> RetentionPlan:
    """Delete what `plan` lists, each study and job re-checked right before its delete.

    A study that received instances, got new work or has an unsent result since the plan was
    made is kept (the next run decides again); so is a job whose study has work in flight.
    Files go before rows (see the module docstring).

    Parameters
    ----------
    plan : RetentionPlan
        From :func:`plan`.
    store : FileStore
        The store the index describes.
    db : Database
        The index.
    should_stop : callable, optional
        Checked between studies and jobs; True stops early (what was done is reported).

    Returns
    -------
    RetentionPlan
        What was removed (``dry_run`` False), with the counts found when deleting.
    """
    stop = should_stop or (lambda: False)
    removed_studies: list[StudyRemoval] = []
    for item in plan.studies:
        if stop():
            break
        done = _remove_study(item, store, db)
        if done is not None:
            removed_studies.append(done)
            _audit(db, [done], [])
    removed_jobs: list[rows.ExpiredResults] = []
    for job in plan.jobs:
        if stop():
            break
        gone = _remove_results(job, store, db)
        if gone is not None:
            removed_jobs.append(gone)
            _audit(db, [], [gone])
    return RetentionPlan(now=plan.now, studies=tuple(removed_studies), jobs=tuple(removed_jobs),
                         store_bytes=plan.store_bytes, max_store_bytes=plan.max_store_bytes,
                         cap_met=plan.cap_met, dry_run=False)


def _audit(db: Database, studies: Sequence[StudyRemoval], jobs: Sequence[rows.ExpiredResults]
           ) -> None:
    """One ``purge.applied`` row per study whose instances went and per job whose results
    went (never raises)."""
    Auditor(db).write(
        [entry("system", "retention", "purge.applied", study_instance_uid=s.study_instance_uid,
               uids=[s.study_instance_uid],
               detail={"removed": "instances", "instances": s.instances, "bytes": s.size_bytes,
                       "reason": s.reason, "delivered_at": s.delivered_at.isoformat()})
         for s in studies]
        + [entry("system", "retention", "purge.applied", study_instance_uid=j.study_instance_uid,
                 uids=[j.study_instance_uid],
                 detail={"removed": "results", "job_id": j.job_id, "results": j.results,
                         "findings": j.findings, "outbox": j.outbox})
           for j in jobs])


def _remove_study(item: StudyRemoval, store: FileStore, db: Database) -> StudyRemoval | None:
    uid = item.study_instance_uid
    with db.sessions() as session:
        still = rows.delivered_studies(session, study_instance_uids=[uid])
        instances = rows.instances_of_study(session, uid) if still else []
    if not still or still[0].delivered_at > item.delivered_at:
        LOGGER.info("retention: study %s changed since the plan (new images or work): kept",
                    uid)
        return None
    remove_files(store, [path for _, path in instances], under=store.instances)
    with db.write_session() as session:
        deleted = rows.delete_instances(session, [pk for pk, _ in instances])
    LOGGER.info("retention: removed %d instance(s) (%d bytes) of study %s, delivered %s (%s)",
                deleted.instances, still[0].size_bytes, uid, item.delivered_at.isoformat(),
                item.reason)
    return StudyRemoval(uid, item.delivered_at, deleted.instances, still[0].size_bytes,
                        item.reason)


def _remove_results(job: rows.ExpiredResults, store: FileStore, db: Database
                    ) -> rows.ExpiredResults | None:
    with db.sessions() as session:
        still = rows.expired_results(session, cutoff=job.finished_at, job_ids=[job.job_id])
    if not still:
        LOGGER.info("retention: results of job %d changed since the plan: kept", job.job_id)
        return None
    current = still[0]
    remove_files(store, current.paths, under=store.root / RESULTS_FOLDER)
    with db.write_session() as session:
        deleted = rows.delete_results(session, [job.job_id])
    LOGGER.info("retention: removed %d result object(s) and %d finding(s) of job %d (study %s)",
                deleted.results, deleted.findings, job.job_id, job.study_instance_uid)
    return rows.ExpiredResults(job.job_id, job.study_instance_uid, current.finished_at,
                          deleted.results, deleted.findings, deleted.outbox, current.paths)


def remove_files(store: FileStore, relative_paths: Iterable[str], *, under: Path) -> int:
    """Delete store files durably, and the folders this empties, up to `under`.

    Each affected folder is removed if empty (its parent fsynced) or else fsynced, so the
    deletes are on disk before the caller deletes the rows. A path outside `under` is refused
    and logged, never deleted; a file already gone is fine.

    Parameters
    ----------
    store : FileStore
        The store the paths are relative to.
    relative_paths : iterable of str
        Store-relative paths.
    under : Path
        The folder every path must be inside (``instances/`` or ``results/``).

    Returns
    -------
    int
        Files deleted.
    """
    base = under.resolve()
    folders: set[Path] = set()
    deleted = 0
    for relative in relative_paths:
        path = (store.root / relative).resolve()
        if not path.is_relative_to(base) or path == base:
            LOGGER.error("retention: %s is not under %s; not deleted", relative, base)
            continue
        try:
            path.unlink()
            deleted += 1
        except FileNotFoundError:
            pass
        folders.add(path.parent)
    # Deepest folders first, so a series folder goes before its study folder.
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        _prune(folder, base)
    return deleted


def _prune(folder: Path, base: Path) -> None:
    """Remove `folder` and its parents below `base` while empty; fsync what changed."""
    while folder != base and folder.is_relative_to(base):
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # not empty: flush the entries removed from it, and stop
            fsync_dir(folder)
            return
        folder = folder.parent
    fsync_dir(folder)


class RetentionRunner(PeriodicWorker):
    """Applies ``[retention]`` at start and every ``interval_seconds`` in a daemon thread.

    Parameters
    ----------
    settings : Settings
        The settings (``retention`` is the policy).
    store : FileStore
        The store.
    db : Database
        The index.
    """

    def __init__(self, settings: Settings, store: FileStore, db: Database) -> None:
        self.policy = settings.retention
        self.store = store
        self.db = db
        # The database may be briefly unavailable: the next run retries, the outage logged once.
        super().__init__("retention", LOGGER, [("retention run", self.run_once)],
                         interval=self.policy.interval_seconds, join_timeout=60,
                         run_first=True)

    def run_once(self, now: datetime | None = None) -> RetentionPlan:
        """Plan and apply the policy once; returns what was removed."""
        removed = apply(plan(self.db, self.policy, now=now), self.store, self.db,
                        should_stop=lambda: self.stopping)
        if not removed.empty:
            LOGGER.info("retention removed the instances of %d stud(ies) (%d instances, %d "
                        "bytes), %d result object(s) and %d finding(s)", len(removed.studies),
                        removed.instances, removed.size_bytes, removed.results,
                        removed.findings)
        return removed

    def start(self) -> None:
        """Run now, then every ``interval_seconds``."""
        super().start()
        LOGGER.info("retention: instances_days=%s results_days=%s max_store_bytes=%s, every "
                    "%.0f s", self.policy.instances_days, self.policy.results_days,
                    self.policy.max_store_bytes, self.policy.interval_seconds)

    def stop(self) -> None:
        """Stop after the study or job being deleted, and wait for the thread."""
        super().stop()


def describe(removed: RetentionPlan) -> Sequence[str]:
    """Human-readable summary lines of a plan or of what was removed."""
    verb = "would remove" if removed.dry_run else "removed"
    lines = [
        f"{verb} the instances of {len(removed.studies)} stud(ies): {removed.instances} "
        f"instance(s), {removed.size_bytes} bytes",
        f"{verb} {removed.results} result object(s) and {removed.findings} finding(s) of "
        f"{len(removed.jobs)} job(s)",
        f"instance store: {removed.store_bytes} bytes before, {removed.store_bytes_after} after"
        + (f" (cap {removed.max_store_bytes}"
           f"{'' if removed.cap_met else ', NOT met: the rest is not yet delivered'})"
           if removed.max_store_bytes is not None else ""),
    ]
    return lines
