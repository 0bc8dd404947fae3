"""One job, start to end: the readable chain a worker runs.

    claim (lease) -> load frames -> preprocess -> inference (+ Grad-CAM) -> findings
      -> SR / SEG / heat-map SC files -> findings, results and outbox rows (one transaction)

A full disk (below ``storage.results_min_free_bytes``, ``ENOSPC``, ``EDQUOT``) or an unavailable
index is not a failed attempt: the job waits (state ``waiting``, its attempt given back) and is
due again after ``workers.resource_wait_seconds``; the results watermark is checked before the
model runs. Writing the job's outcome to an unavailable index is retried until it is back.

:class:`JobRunner` is what both dispatch backends call with a job id: the local pool's worker
processes and Celery tasks. It keeps models loaded between jobs. Everything a job writes is
keyed on the job: result UIDs derive from the job, files are overwritten by a retry, and
:func:`storage.jobs.complete_job` commits only while the lease is still ours, so a job whose
worker was presumed dead cannot complete twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import numpy as np

from dicom_ai.config import Route, Settings
from dicom_ai.exceptions import (
    ConfigError,
    DicomAIError,
    JobError,
    OutOfSpaceError,
    safe_message,
)
from dicom_ai.inference.registry import Registry
from dicom_ai.inference.runtime import InferenceError, Predictor, load_predictor
from dicom_ai.resources import results_space_problem, space_problem
from dicom_ai.runner.analysis import OutOfScopeError, analyse
from dicom_ai.runner.results import build_results, finding_row
from storage import jobs
from storage.db import Database, is_resource_error

LOGGER = logging.getLogger(__name__)

__all__ = ["WAIT_PREFIX", "JobOutcome", "JobRunner", "ModelCache", "resource_problem"]

#: How the ``error`` of a waiting job starts (the rest says which resource, no patient value).
WAIT_PREFIX = "waiting: "
_T = TypeVar("_T")


def resource_problem(exc: BaseException) -> str | None:
    """Why `exc` is an exhausted resource (a wait, not an attempt), or None.

    A full disk (:func:`dicom_ai.resources.space_problem`) or a full or unavailable index
    (:func:`storage.db.is_resource_error`), anywhere in the exception's chain.
    """
    return space_problem(exc) or is_resource_error(exc)

_WATERMARK = "results store below "


def _kind(reason: str) -> str:
    """A wait reason without its details (free bytes, SQLSTATE): the same outage, or not."""
    return reason.split(" (")[0]


# -- models kept loaded ----------------------------------------------------------------------
class ModelCache:
    """Loaded predictors (and their Grad-CAM) by name and version, kept for the process' life.

    Parameters
    ----------
    registry : Registry
        Where models are found; the active version of a name is looked up per job, so
        activating a new version takes effect at the next job without a restart.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._loaded: dict[tuple[str, str], tuple[Predictor, Any]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> tuple[Predictor, Any]:
        """The active version of `name`, loaded (and its explainer, or None).

        Raises
        ------
        JobError
            Unknown model (not retryable) or a network that cannot load (retryable).
        """
        try:
            entry = self.registry.get(name)
        except ConfigError as exc:
            raise JobError(safe_message(exc), retryable=False) from exc
        key = (entry.name, entry.version)
        with self._lock:
            if key not in self._loaded:
                try:
                    predictor = load_predictor(entry.path)
                except InferenceError as exc:
                    raise JobError(safe_message(exc), retryable=True) from exc
                except ConfigError as exc:
                    raise JobError(safe_message(exc), retryable=False) from exc
                explainer = _explainer_for(predictor)
                if explainer is not None:  # trace the Grad-CAM function now, not in a job
                    explainer(np.zeros((1, *predictor.spec.input_shape), np.float32))
                self._loaded[key] = (predictor, explainer)
                LOGGER.info("loaded %s in %.2f s", predictor.label, predictor.load_seconds)
            return self._loaded[key]


def _explainer_for(predictor: Predictor) -> Any:
    """A compiled Grad-CAM for Keras classifiers; None where it does not apply."""
    if predictor.spec.task != "classification" or predictor.backend != "keras":
        return None
    from dicom_ai.inference.explain import GradCam

    try:
        # Fixed colour scale: the map's top is the model's probability (explain.py).
        return GradCam(predictor.model, scale="probability")  # type: ignore[attr-defined]
    except ValueError as exc:
        LOGGER.warning("no Grad-CAM for %s: %s", predictor.label, exc)
        return None


# -- the job runner --------------------------------------------------------------------------
@dataclass(frozen=True)
class JobOutcome:
    """What running one job produced, handed to :func:`storage.jobs.complete_job` whole.

    Attributes
    ----------
    model_version : str
        The version of the model that ran.
    findings : list of FindingToStore
        One row per finding, present or absent.
    results : list of ResultToStore
        The result files written, with their destinations (the SR first).
    timings : dict
        Seconds per stage.
    note : str, optional
        For the job row: the series the model skipped and why (``"not applicable: ..."`` when
        it took none).
    supersedes_job_id : int, optional
        The study and route's previous done job, whose results this run's replace (its SR is
        this one's predecessor).
    """

    model_version: str
    findings: list[jobs.FindingToStore]
    results: list[jobs.ResultToStore]
    timings: dict[str, float]
    note: str | None
    supersedes_job_id: int | None = None


class JobRunner:
    """Claims and runs jobs by id; one per worker process.

    Parameters
    ----------
    settings : Settings
        The service settings (store, database, routes, destinations, worker policy).
    owner : str, optional
        The lease owner name; default ``host:pid:random``.
    db : Database, optional
        An open database to share (default: one of its own).
    """

    def __init__(self, settings: Settings, *, owner: str | None = None,
                 db: Database | None = None) -> None:
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.db = db or Database(settings.storage.url)
        self.store = settings.storage.file_store()
        self.models = ModelCache(Registry(settings.storage.root / "models"))

    def preload(self, names: Sequence[str]) -> None:
        """Load the models the routes use now and warm the report builders, so the first job
        pays neither the model's load nor highdicom's first use (about 0.8 s)."""
        for name in names:
            try:
                self.models.get(name)
            except JobError as exc:
                LOGGER.error("cannot preload model %s: %s", name, exc)
        from dicom_ai.runner.warmup import warm_up_reports

        try:
            warm_up_reports({d.sr_kind for d in self.settings.destinations} or {"comprehensive"})
        except Exception:  # only a warm-up: the first job pays instead
            LOGGER.exception("warming up the report builders failed")

    def run(self, job_id: int) -> str:
        """Claim job `job_id` and run it to done, a recorded failure, or a wait.

        Returns
        -------
        str
            ``"done"``, ``"pending"`` (will be retried), ``"failed"``, ``"waiting"`` (a
            resource is exhausted: no attempt used, due again after
            ``workers.resource_wait_seconds``), or ``"skipped"`` when the job was not
            claimable (done already, or another worker holds it) or the lease was lost.
        """
        now = datetime.now(UTC)

        def claim(session: jobs.Session) -> Any:
            job = jobs.claim_job(session, job_id, owner=self.owner,
                                 lease_seconds=self.settings.workers.lease_seconds, now=now)
            if job is not None:
                session.expunge(job)
            return job

        job = self._write(job_id, "claiming it", claim)
        if job is None:
            return "skipped"
        waited = job.error[len(WAIT_PREFIX):] if (job.error or "").startswith(WAIT_PREFIX) \
            else None
        LOGGER.info("job %d (%s, model %s) attempt %d", job.id, job.route, job.model_name,
                    job.attempts)
        queued = (now - job.created_at).total_seconds()
        try:
            # Cheap, and before the model: a job that cannot write its results waits unrun.
            problem = results_space_problem(self.store.root,
                                            self.settings.storage.results_min_free_bytes)
            if problem is not None:
                raise OutOfSpaceError(problem)
            if waited is not None and waited.startswith(_WATERMARK):
                LOGGER.info("job %d resumes (it waited: %s)", job.id, waited)
            elif waited is not None:  # whether the disk or index is back shows at the end
                LOGGER.debug("job %d tries again (it waited: %s)", job.id, waited)
            with self._heartbeat(job.id):
                outcome = self._execute(job)
        except Exception as exc:
            reason = resource_problem(exc)
            if reason is not None:
                return self._wait(job, reason, waited)
            retryable = exc.retryable if isinstance(exc, JobError) else True
            if not isinstance(exc, DicomAIError):
                LOGGER.exception("job %d crashed", job.id)
            # Library messages may quote attribute values (highdicom: "Unable to convert
            # '1901-12-31' to 'DA' object"): jobs.error, the API and the log get the safe form.
            message = safe_message(exc)

            def fail(session: jobs.Session) -> str | None:
                return jobs.fail_job(
                    session, job.id, owner=self.owner, error=message, retryable=retryable,
                    backoff_seconds=self.settings.workers.retry_backoff_seconds,
                    now=datetime.now(UTC))

            state = self._write(job.id, "recording its failure", fail)
            LOGGER.warning("job %d attempt %d failed (%s): %s", job.id, job.attempts,
                           state or "lease lost", message)
            return state or "skipped"
        timings = {"queue": queued, **outcome.timings}
        started = time.perf_counter()

        def complete(session: jobs.Session) -> bool:
            # The result files are written already (their UIDs derive from the job): a retry
            # after an index outage records the same files.
            ok = jobs.complete_job(session, job.id, owner=self.owner,
                                   model_version=outcome.model_version,
                                   findings=outcome.findings, results=outcome.results,
                                   timings=timings, now=datetime.now(UTC),
                                   supersedes_job_id=outcome.supersedes_job_id,
                                   note=outcome.note)
            if not ok:
                session.rollback()
            return ok

        ok = self._write(job.id, "recording its results", complete)
        if not ok:
            LOGGER.warning("job %d: lease lost before completion; another worker has it", job.id)
            return "skipped"
        LOGGER.info("job %d done: %d findings, %d results (commit %.3f s)%s%s", job.id,
                    len(outcome.findings), len(outcome.results), time.perf_counter() - started,
                    "; not applicable, no result sent" if not outcome.findings and outcome.note
                    else "; some series skipped" if outcome.note else "",
                    f"; resumed after waiting ({waited})" if waited is not None else "")
        return "done"

    def _wait(self, job: Any, reason: str, waited: str | None) -> str:
        """Record that `job` waits for a resource (no attempt used); returns its outcome."""
        retry = self.settings.workers.resource_wait_seconds
        outage = [False]

        def wait(session: jobs.Session) -> str | None:
            # If recording the wait itself had to wait for the index, the resource may well be
            # back: due at once rather than after another resource_wait_seconds.
            return jobs.wait_job(session, job.id, owner=self.owner,
                                 reason=f"{WAIT_PREFIX}{reason}",
                                 retry_seconds=0.0 if outage[0] else retry,
                                 now=datetime.now(UTC))

        state = self._write(job.id, "recording that it waits", wait,
                            on_retry=lambda: outage.__setitem__(0, True))
        if state is None:
            LOGGER.warning("job %d: lease lost while it met an exhausted resource (%s)",
                           job.id, reason)
            return "skipped"
        if waited is not None and _kind(waited) == _kind(reason):
            LOGGER.debug("job %d still waiting: %s", job.id, reason)
        else:
            LOGGER.warning("job %d waits, no attempt used (tried again every %g s): %s",
                           job.id, retry, reason)
        return state

    def _write(self, job_id: int, what: str, work: Callable[[jobs.Session], _T], *,
               on_retry: Callable[[], None] | None = None) -> _T:
        """Run `work` in a write session, retrying while the index is full or unavailable.

        The delay grows from 0.5 s to ``workers.resource_wait_seconds``; the outage is logged
        once, and its end. Any other error is raised.
        """
        delay = 0.5
        since: float | None = None
        while True:
            try:
                with self.db.write_session() as session:
                    done = work(session)
            except Exception as exc:
                reason = is_resource_error(exc)
                if reason is None:
                    raise
                if since is None:
                    since = time.monotonic()
                    LOGGER.warning("job %d: %s while %s; retrying until it is back", job_id,
                                   reason, what)
                if on_retry is not None:
                    on_retry()
                time.sleep(delay)
                delay = min(delay * 2, self.settings.workers.resource_wait_seconds)
                continue
            if since is not None:
                LOGGER.info("job %d: the index is back after %.1f s (%s)", job_id,
                            time.monotonic() - since, what)
            return done

    @contextmanager
    def _heartbeat(self, job_id: int) -> Iterator[None]:
        """Extend the lease every third of its length while the job runs."""
        stop = threading.Event()
        lease = self.settings.workers.lease_seconds

        def beat() -> None:
            while not stop.wait(lease / 3):
                try:
                    with self.db.write_session() as session:
                        until = datetime.now(UTC) + timedelta(seconds=lease)
                        if not jobs.extend_lease(session, job_id, owner=self.owner, until=until):
                            return
                except Exception:  # the next beat retries; an expired lease is the fallback
                    LOGGER.exception("lease extension of job %d failed", job_id)

        thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _route(self, name: str) -> Route:
        for route in self.settings.routes:
            if route.name == name:
                return route
        raise JobError(f"route {name!r} is no longer configured", retryable=False)

    def _execute(self, job: Any) -> JobOutcome:
        """Analyse the job's series and build its results (see :class:`JobOutcome`).

        When the model took no series, the outcome has no findings and no results (nothing is
        sent) and its note says ``"not applicable: ..."``.
        """
        route = self._route(job.route)
        predictor, explainer = self.models.get(job.model_name)
        series_uids = job.series_instance_uids
        with self.db.sessions() as session:
            relative = jobs.instance_paths(session, series_uids)
            prior_job = jobs.latest_done_job(session, job.study_instance_uid, job.route,
                                             before=job.id)
            previous = jobs.results_of_job(session, prior_job.id) if prior_job else []
            supersedes = prior_job.id if prior_job else None
        if not relative:
            raise JobError("the series have no instances (deleted?)", retryable=False)
        paths = [self.store.absolute(p) for p in relative]
        seed = f"{job.study_instance_uid}/{job.id}/{job.created_at.isoformat()}"
        explain = explainer is not None
        try:
            analysis = analyse(paths, predictor, seed=seed, explain=explain,
                               explainer=explainer, limits=self.settings.limits,
                               route=route.name)
        except OutOfScopeError as exc:
            LOGGER.info("job %d: %s %s takes none of its %d series; no result", job.id,
                        predictor.spec.name, predictor.spec.version, len(series_uids))
            return JobOutcome(predictor.spec.version, [], [], {}, str(exc)[:4000], supersedes)
        started = time.perf_counter()
        flagged = any(f.out_of_distribution for f in analysis.run.findings)
        if flagged:
            LOGGER.warning("job %d: input outside the training distribution of %s %s (route "
                           "%s, ood_policy %s)", job.id, predictor.spec.name,
                           predictor.spec.version, route.name, route.ood_policy)
        results: list[jobs.ResultToStore] = []
        heatmap_paths: dict[str, str] = {}
        # "drop": the flagged findings are kept, no result object is built.
        if not (flagged and route.ood_policy == "drop"):
            results, heatmap_paths = build_results(
                analysis, route, self.settings, store_root=self.store.root, job_id=job.id,
                seed=seed, previous=previous, hold=flagged and route.ood_policy == "hold")
        analysis.timings["report"] = time.perf_counter() - started
        series_of = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID)
                     for ds in analysis.datasets}
        findings = [finding_row(f, analysis.run, heatmap_paths, series_of)
                    for f in analysis.run.findings]
        note = "; ".join(analysis.skipped)[:4000] or None
        return JobOutcome(predictor.spec.version, findings, results, analysis.timings, note,
                          supersedes)
