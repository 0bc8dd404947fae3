"""The FastAPI application: health, readiness, metrics, data endpoints and operator actions.

Unauthenticated: ``/health``, ``/ready``, ``/metrics``, ``/openapi.json``, ``/docs``. Everything
under ``/api`` needs an API key (:mod:`dicom_ai.api.auth`); ``POST`` actions need an operator
key, and a browser request of another site is refused (:func:`dicom_ai.api.auth.same_origin`).
Lists are keyset-paginated: ``?limit=N`` (1-500, default 50) and ``?after=ID`` with the
``next_after`` of the previous page; ``order=desc`` (default, newest first) or ``asc``.
Ids in paths and queries are 1..:data:`storage.paging.MAX_ID` (the range of the id
columns): anything else answers 422 before the database is asked.
Patient names, IDs and birth dates are never returned unless ``api.show_patient_names``.
Every object answered is a model of :mod:`dicom_ai.views` (the ``response_model``), the same
the CLI's ``--json`` prints.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_ai import __version__
from dicom_ai.api.auth import Authenticator, same_origin
from dicom_ai.api.dashboard import dashboard_router
from dicom_ai.api.metrics import make_registry
from dicom_ai.audit import Auditor
from dicom_ai.config import Settings
from dicom_ai.network.counters import ReceiverCounters
from dicom_ai.views import (
    AuditEntryView,
    BatchDetailView,
    BatchView,
    DeliveryView,
    FindingView,
    JobDetailView,
    JobView,
    ModelListView,
    OutboxRowView,
    Page,
    SeriesView,
    StudyDetailView,
    StudyView,
    audit_view,
    batch_view,
    delivery_view,
    finding_view,
    job_view,
    model_view,
    outbox_view,
    page,
    result_view,
    routing_view,
    series_view,
    study_view,
)
from storage import apikeys, audit, batches
from storage import jobs as job_rows
from storage import outbox as outbox_rows
from storage import studies as study_rows
from storage.db import Database, DatabaseError, ping
from storage.paging import MAX_ID, MAX_LIMIT

LOGGER = logging.getLogger(__name__)

#: A readiness check: returns a short description, raises with the reason when not ready.
Check = Callable[[], str]

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size.")]
# Ids are bounded by the columns' range: a larger one would make the database driver raise.
After = Annotated[int | None, Query(ge=0, le=MAX_ID,
                                    description="`next_after` of the previous page.")]
RowId = Annotated[int, Path(ge=1, le=MAX_ID, description="A row id.")]
JobFilter = Annotated[int | None, Query(ge=1, le=MAX_ID,
                                        description="Only rows of this job.")]
OrderParam = Annotated[Literal["asc", "desc"], Query(description="By id; desc is newest "
                                                     "first.")]


def _client_host(request: Request) -> str | None:
    """The caller's address (for the audit trail)."""
    return request.client.host if request.client is not None else None


#: The caller's host; None when an action is called directly (the dashboard's buttons).
ClientHost = Annotated[str | None, Depends(_client_host)]
_DA_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
FINISHED_BATCH_STATES = ("done", "cancelled")


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _study_dates(text: str | None) -> tuple[str | None, str | None]:
    if not text:
        return None, None
    match = _DA_RANGE.match(text)
    if match is None or text == "-":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            detail="study_date is YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or "
                            "YYYYMMDD-")
    low, dash, high = match.group(1), match.group(2), match.group(3)
    return (low, high) if dash else (low, low)


def default_checks(settings: Settings, db: Database) -> dict[str, Check]:
    """The database and store checks of ``/ready`` (workers and broker are added by serve)."""

    def database() -> str:
        with db.sessions() as session:
            ping(session)
        return "ok"

    def store() -> str:
        root = settings.storage.root
        if not root.is_dir() or not os.access(root, os.W_OK):
            raise RuntimeError(f"{root} is not a writable folder")
        free = shutil.disk_usage(root).free
        if free < settings.storage.min_free_bytes:
            raise RuntimeError(f"{free} bytes free, below storage.min_free_bytes")
        return f"{free} bytes free"

    def results() -> str:
        # Below its watermark jobs wait (no attempt used) instead of writing results.
        from dicom_ai.resources import results_space_problem

        problem = results_space_problem(root=settings.storage.root,
                                        min_free_bytes=settings.storage.results_min_free_bytes)
        if problem is not None:
            raise RuntimeError(f"results cannot be written, jobs wait: {problem}")
        return "writable"

    return {"database": database, "store": store, "results": results}


def create_app(settings: Settings, db: Database, *,
               checks: Mapping[str, Check] | None = None,
               on_jobs: Callable[[], None] | None = None,
               on_outbox: Callable[[], None] | None = None,
               counters: ReceiverCounters | None = None) -> FastAPI:
    """Build the API application.

    Parameters
    ----------
    settings : Settings
        The service settings (routes, destinations, ``[api]``).
    db : Database
        The index.
    checks : mapping of str to callable, optional
        Readiness checks besides the database and the store (e.g. workers, broker).
    on_jobs : callable, optional
        Called after an operator action created a job (wakes the scheduler).
    on_outbox : callable, optional
        Called after an operator action made deliveries due (wakes the outbox sender).
    counters : ReceiverCounters, optional
        DIMSE traffic counters of the receivers of this process (``/metrics``).

    Returns
    -------
    FastAPI
        The application; run it with :class:`dicom_ai.api.server.ApiServer`.
    """
    # One schema per view model (dicom_ai.views): the serialisation-mode schema of a model with
    # a wrap serializer (StudyView drops an absent patient) would be empty.
    app = FastAPI(title="dicom-ai", version=__version__, separate_input_output_schemas=False,
                  description="Studies, jobs, findings and results of a dicom-ai service. "
                  "Data endpoints need an API key (`dicom-ai apikeys create`).")
    all_checks = {**default_checks(settings, db), **(checks or {})}
    registry = make_registry(db, settings.storage.root, counters,
                             results_min_free_bytes=settings.storage.results_min_free_bytes)
    read = Depends(Authenticator(db))
    operator = Depends(Authenticator(db, operator=True))
    show_patient = settings.api.show_patient_names
    routes = {r.name: r for r in settings.routes}
    wake_jobs = on_jobs or (lambda: None)
    wake_outbox = on_outbox or (lambda: None)
    auditor = Auditor(db)

    def audited(peer: str | None, key: apikeys.ApiKeyInfo, action: str, *,
                study_instance_uid: str | None = None, **detail: Any) -> None:
        """Record an operator action with its key (never raises)."""
        auditor.record("api", f"apikey:{key.id}", action, peer=peer,
                       study_instance_uid=study_instance_uid,
                       uids=[study_instance_uid] if study_instance_uid else (), detail=detail)

    @app.exception_handler(DatabaseError)
    async def database_down(_request: Request, exc: Exception) -> JSONResponse:
        LOGGER.warning("API: the database did not answer: %s", exc.__class__.__name__)
        return JSONResponse({"detail": "the database is unavailable"},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    # -- unauthenticated ------------------------------------------------------------------------
    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["health"], responses={503: {"description": "Not ready"}})
    def ready(response: Response) -> dict[str, Any]:
        """Readiness: database, store, workers and broker (when configured) answer."""
        results: dict[str, dict[str, Any]] = {}
        for name, check in all_checks.items():
            try:
                results[name] = {"ok": True, "detail": check()}
            except Exception as exc:  # any failure means not ready; the reason is shown
                results[name] = {"ok": False, "detail": f"{exc.__class__.__name__}: {exc}"[:300]}
        ok = all(r["ok"] for r in results.values())
        if not ok:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"ready": ok, "checks": results}

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # -- data (read key) ----------------------------------------------------------------------
    @app.get("/api/studies", tags=["data"], dependencies=[read],
             response_model=Page[StudyView])
    def studies(limit: Limit = 50, after: After = None, order: OrderParam = "desc",
                state: Literal["receiving", "complete"] | None = None,
                study_date: Annotated[str | None, Query(
                    description="YYYYMMDD or a range YYYYMMDD-YYYYMMDD")] = None,
                accession_number: str | None = None) -> dict[str, Any]:
        """Received studies with series/instance counts and modalities."""
        low, high = _study_dates(study_date)
        with db.sessions() as session:
            rows = study_rows.list_studies(
                session, after=after, limit=limit, order=order, state=state,
                study_date_from=low, study_date_to=high, accession_number=accession_number,
                with_patient=show_patient)
        return page([study_view(r) for r in rows], limit)

    @app.get("/api/studies/{study_instance_uid}", tags=["data"], dependencies=[read],
             response_model=StudyDetailView)
    def study(study_instance_uid: str) -> StudyDetailView:
        """One study: counts, series, jobs and routing decisions."""
        with db.sessions() as session:
            row = study_rows.get_study(session, study_instance_uid, with_patient=show_patient)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such study")
            series = study_rows.list_series(session, study_instance_uid=study_instance_uid,
                                            limit=MAX_LIMIT, order="asc")
            jobs = job_rows.list_jobs(session, study_instance_uid=study_instance_uid,
                                      limit=MAX_LIMIT)
            decisions = job_rows.decisions_of_study(session, study_instance_uid)
            return StudyDetailView(**dict(study_view(row)),
                                   series_list=[series_view(s) for s in series],
                                   jobs=[job_view(j) for j in jobs],
                                   routing=[routing_view(d) for d in decisions])

    @app.get("/api/series", tags=["data"], dependencies=[read],
             response_model=Page[SeriesView])
    def series(limit: Limit = 50, after: After = None, order: OrderParam = "desc",
               study_instance_uid: str | None = None,
               modality: str | None = None) -> dict[str, Any]:
        """Series with their instance counts."""
        with db.sessions() as session:
            rows = study_rows.list_series(session, after=after, limit=limit, order=order,
                                          study_instance_uid=study_instance_uid,
                                          modality=modality)
        return page([series_view(r) for r in rows], limit)

    @app.get("/api/jobs", tags=["data"], dependencies=[read], response_model=Page[JobView])
    def jobs(limit: Limit = 50, after: After = None, order: OrderParam = "desc",
             state: Literal["pending", "waiting", "running", "done", "failed"] | None = None,
             model: str | None = None, route: str | None = None,
             study_instance_uid: str | None = None) -> dict[str, Any]:
        """Jobs: state, attempts, last error, stage timings."""
        with db.sessions() as session:
            rows = job_rows.list_jobs(session, after=after, limit=limit, order=order,
                                      state=state, model_name=model, route=route,
                                      study_instance_uid=study_instance_uid)
            return page([job_view(j) for j in rows], limit)

    @app.get("/api/jobs/{job_id}", tags=["data"], dependencies=[read],
             response_model=JobDetailView)
    def job(job_id: RowId) -> JobDetailView:
        """One job with its result objects and their deliveries."""
        with db.sessions() as session:
            row = job_rows.job(session, job_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such job")
            results = job_rows.results_of_job(session, job_id)
            deliveries = outbox_rows.deliveries_of_results(session, [r.id for r in results])
            return JobDetailView(**dict(job_view(row)),
                                 results=[result_view(r, deliveries[r.id]) for r in results])

    @app.get("/api/findings", tags=["data"], dependencies=[read],
             response_model=Page[FindingView])
    def findings(limit: Limit = 50, after: After = None, order: OrderParam = "desc",
                 model: str | None = None,
                 decision: Literal["present", "absent"] | None = None,
                 since: Annotated[datetime | None, Query(
                     description="Created at or after (ISO date or date-time; UTC if no "
                     "zone).")] = None,
                 until: Annotated[datetime | None, Query(
                     description="Created before (ISO date or date-time).")] = None,
                 study_instance_uid: str | None = None, job_id: JobFilter = None,
                 current: Annotated[bool, Query(
                     description="Only findings not superseded by a later job.")] = False,
                 ) -> dict[str, Any]:
        """Findings, filtered by model, decision, creation date, study or job."""
        with db.sessions() as session:
            rows = job_rows.list_findings(
                session, after=after, limit=limit, order=order, model_name=model,
                present=None if decision is None else decision == "present",
                since=_aware(since), until=_aware(until),
                study_instance_uid=study_instance_uid, job_id=job_id, current_only=current)
            return page([finding_view(f) for f in rows], limit)

    @app.get("/api/outbox", tags=["data"], dependencies=[read],
             response_model=Page[OutboxRowView])
    def outbox(limit: Limit = 50, after: After = None, order: OrderParam = "desc",
               state: Literal["pending", "sent", "committed"] | None = None,
               destination: str | None = None, job_id: JobFilter = None,
               failing: Annotated[bool, Query(
                   description="Only pending deliveries whose last attempt failed.")] = False,
               ) -> dict[str, Any]:
        """Deliveries of result objects to destinations."""
        with db.sessions() as session:
            rows = outbox_rows.list_outbox(session, after=after, limit=limit, order=order,
                                           state=state, destination=destination,
                                           job_id=job_id, failing=failing)
            return page([outbox_view(item, result) for item, result in rows], limit)

    @app.get("/api/models", tags=["data"], dependencies=[read], response_model=ModelListView)
    def models() -> ModelListView:
        """Every model version in the registry (bundled ones included)."""
        from dicom_ai.inference.registry import Registry

        entries = Registry(settings.storage.root / "models").entries()
        return ModelListView(items=[model_view(e) for e in entries])

    @app.get("/api/routes", tags=["data"], dependencies=[read])
    def list_routes() -> dict[str, Any]:
        """The configured ``[[routes]]``."""
        return {"items": [r.model_dump(mode="json") for r in settings.routes]}

    @app.get("/api/destinations", tags=["data"], dependencies=[read])
    def destinations() -> dict[str, Any]:
        """The configured ``[[destinations]]``."""
        return {"items": [d.model_dump(mode="json") for d in settings.destinations]}

    @app.get("/api/batches", tags=["data"], dependencies=[read],
             response_model=Page[BatchView])
    def list_batches(limit: Limit = 50, after: After = None, order: OrderParam = "desc",
                     state: str | None = None) -> dict[str, Any]:
        """Query/retrieve batches."""
        with db.sessions() as session:
            rows = batches.list_batches(session, after=after, limit=limit, order=order,
                                        state=state)
            return page([batch_view(b) for b in rows], limit)

    @app.get("/api/batches/{batch_id}", tags=["data"], dependencies=[read],
             response_model=BatchDetailView)
    def batch(batch_id: RowId) -> BatchDetailView:
        """One batch with its studies counted by retrieve state."""
        with db.sessions() as session:
            row = batches.get_batch(session, batch_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such batch")
            counts = batches.batch_study_counts(session, batch_id)
            return BatchDetailView(**dict(batch_view(row)), studies=counts)

    @app.get("/api/audit", tags=["data"], dependencies=[read],
             response_model=Page[AuditEntryView])
    def audit_events(limit: Limit = 50, after: After = None, order: OrderParam = "desc",
                     action: Annotated[str | None, Query(
                         description="An action (`query.find`) or, ending in `.`, a prefix "
                         "(`association.`).")] = None,
                     study_instance_uid: str | None = None,
                     since: Annotated[datetime | None, Query(
                         description="Recorded at or after (ISO date or date-time; UTC if no "
                         "zone).")] = None) -> dict[str, Any]:
        """The audit trail: who (AE title, API key) did what to which UIDs, and when."""
        with db.sessions() as session:
            rows = audit.list_events(session, after=after, limit=limit, order=order,
                                     action=action, study_instance_uid=study_instance_uid,
                                     since=_aware(since))
        return page([audit_view(r) for r in rows], limit)

    # -- operator actions ---------------------------------------------------------------------
    cross_site = [Depends(same_origin)]

    @app.post("/api/jobs/{job_id}/rerun", tags=["actions"], status_code=201,
              dependencies=cross_site)
    def rerun(job_id: RowId, key: apikeys.ApiKeyInfo = operator,
              peer: ClientHost = None) -> dict[str, Any]:
        """Run a job again: a new pending job for the same study, series and route."""
        now = datetime.now(UTC)
        with db.write_session() as session:
            old = job_rows.job(session, job_id)
            if old is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such job")
            route = routes.get(old.route)
            if route is None:
                raise HTTPException(status.HTTP_409_CONFLICT,
                                    detail=f"route {old.route!r} is no longer configured")
            new = job_rows.create_job(
                session, study_instance_uid=old.study_instance_uid,
                series_instance_uids=old.series_instance_uids,
                route=old.route, model_name=route.model,
                max_attempts=settings.workers.max_attempts, event_id=None, now=now)
            created = job_view(new)
        LOGGER.info("API key %d: job %d re-run as job %d", key.id, job_id, created.id)
        audited(peer, key, "job.rerun", study_instance_uid=created.study_instance_uid,
                job_id=job_id, new_job_id=created.id, route=created.route)
        wake_jobs()
        return {"job": created.model_dump(mode="json"), "rerun_of": job_id}

    @app.post("/api/results/{result_id}/resend", tags=["actions"], dependencies=cross_site)
    def resend(result_id: RowId, key: apikeys.ApiKeyInfo = operator,
               peer: ClientHost = None) -> dict[str, Any]:
        """Send a result object again to its destinations (and its route's current ones)."""
        now = datetime.now(UTC)
        with db.write_session() as session:
            result = job_rows.get_result(session, result_id)
            if result is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such result")
            owner = job_rows.job(session, result.job_id)
            route = routes.get(owner.route) if owner is not None else None
            wanted = list(route.destinations) if route is not None else []
            if result.kind == "seg" and route is not None and not route.send_seg:
                wanted = []
            if result.kind == "heatmap" and route is not None and not route.send_heatmap:
                wanted = []
            count = outbox_rows.resend_result(session, result_id, wanted, now=now)
            study_uid, sop_uid = result.study_instance_uid, result.sop_instance_uid
        LOGGER.info("API key %d: result %d queued again to %d destination(s)", key.id,
                    result_id, count)
        audited(peer, key, "result.resend", study_instance_uid=study_uid,
                result_id=result_id, sop_instance_uid=sop_uid, deliveries_queued=count)
        wake_outbox()
        return {"result_id": result_id, "deliveries_queued": count}

    @app.post("/api/outbox/{outbox_id}/retry", tags=["actions"], dependencies=cross_site,
              response_model=DeliveryView)
    def retry(outbox_id: RowId, key: apikeys.ApiKeyInfo = operator,
              peer: ClientHost = None) -> dict[str, Any]:
        """Retry a pending (failing) delivery now instead of after its backoff."""
        now = datetime.now(UTC)
        with db.write_session() as session:
            item = outbox_rows.retry_delivery(session, outbox_id, now=now)
            if item is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such delivery")
            if item.state != "pending":
                raise HTTPException(status.HTTP_409_CONFLICT,
                                    detail="already delivered; use POST "
                                    f"/api/results/{item.result_id}/resend to send it again")
            data = delivery_view(item)
        LOGGER.info("API key %d: delivery %d retried now", key.id, outbox_id)
        audited(peer, key, "delivery.retry", outbox_id=outbox_id,
                result_id=data.result_id, job_id=data.job_id, destination=data.destination)
        wake_outbox()
        return data.model_dump(mode="json")

    @app.post("/api/batches/{batch_id}/cancel", tags=["actions"], dependencies=cross_site,
              response_model=BatchView)
    def cancel(batch_id: RowId, key: apikeys.ApiKeyInfo = operator,
               peer: ClientHost = None) -> BatchView:
        """Cancel a batch (state ``cancelled``); studies already retrieved stay."""
        now = datetime.now(UTC)
        with db.write_session() as session:
            row = batches.get_batch(session, batch_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such batch")
            if row.state in FINISHED_BATCH_STATES:
                raise HTTPException(status.HTTP_409_CONFLICT,
                                    detail=f"batch {batch_id} is already {row.state}")
            batches.set_state(session, batch_id, "cancelled", now)
        LOGGER.info("API key %d: batch %d cancelled", key.id, batch_id)
        audited(peer, key, "batch.cancel", batch_id=batch_id)
        with db.sessions() as session:
            updated = batches.get_batch(session, batch_id)
            assert updated is not None
            return batch_view(updated)

    # -- the web dashboard (its buttons are the two actions above) ------------------------------
    app.include_router(dashboard_router(settings, db, rerun=rerun, retry=retry))
    return app
