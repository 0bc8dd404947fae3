"""The web dashboard: one server-rendered HTML page, its thumbnails and its two buttons.

The pages are Jinja2 templates in ``dicom_ai/api/templates/`` (package data), rendered with
autoescape: a value from the index (a route name, an error, a patient name) is text, never
markup.

Routes (all under ``/dashboard``, so the cookie below is sent to nothing else):

* ``GET /dashboard``: counts, recent studies (next to each job of a study, why its model
  skipped series: ``not applicable: ...`` when it took none and sent no result), recent
  findings with the source image and the heat-map side by side, failed jobs, failing
  deliveries, models. The page reloads itself every
  :data:`REFRESH_SECONDS` (a meta refresh: no scripts at all, and a Content-Security-Policy that
  allows none).
* ``POST /dashboard/login`` (the sign-in form, ``key=TOKEN`` in the body): checks the API key,
  keeps it in an HttpOnly, SameSite=Strict cookie (Secure over TLS) and redirects to
  ``/dashboard``. A key in the address (``?key=``) is not accepted: a link of another site
  could otherwise sign a browser in with the linker's key (login CSRF), and addresses end up in
  histories and proxy logs. ``POST /dashboard/logout`` (the Sign out button) forgets it.
* ``GET /dashboard/thumbnails/{heatmap|source}/{finding_id}.png``: a PNG about
  :data:`THUMBNAIL_PX` pixels on its long side of a finding's heat-map Secondary Capture or of
  its source image (windowed as the pipeline does: Bits Stored masked, modality LUT, VOI,
  MONOCHROME1 inverted; colour images as they are).
* ``POST /dashboard/jobs/{id}/rerun`` and ``POST /dashboard/outbox/{id}/retry``: the API's
  operator actions (the same functions as ``POST /api/jobs/{id}/rerun`` and
  ``POST /api/outbox/{id}/retry``) behind HTML forms; they need an operator key and answer with
  a redirect back to the page.

A request is authenticated by ``Authorization: Bearer``, ``X-API-Key`` or the cookie, all
checked by :class:`dicom_ai.api.auth.Authenticator`. Without a valid key the page answers 401
with the sign-in form. Every ``POST`` (sign-in, sign-out, the buttons) must come from this
origin (:func:`dicom_ai.api.auth.cross_site_reason`: ``Sec-Fetch-Site``, else ``Origin`` or
``Referer``); besides, the cookie is ``SameSite=Strict``. Patient names, IDs and birth dates
are on the page only with ``api.show_patient_names``.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

import jinja2
import numpy as np
import pydicom
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from PIL import Image
from pydicom.errors import InvalidDicomError

from dicom_ai import __version__
from dicom_ai.api.auth import Authenticator, cross_site_reason
from dicom_ai.config import LimitsSettings, Settings
from dicom_ai.exceptions import ConfigError, DicomAIError
from dicom_ai.inference.registry import Registry
from dicom_ai.pipeline.loading import DEFER_BYTES, decode
from dicom_ai.pipeline.preprocessing import unit_image
from storage import apikeys
from storage import jobs as job_rows
from storage import metrics as storage_metrics
from storage import outbox as outbox_rows
from storage import studies as study_rows
from storage.db import Database
from storage.models import ROLE_OPERATOR
from storage.paging import MAX_ID
from storage.repository import find_instance_path

__all__ = ["COOKIE_NAME", "MAX_FORM_BYTES", "REFRESH_SECONDS", "THUMBNAIL_PX", "Action",
           "dashboard_router", "render_thumbnail"]

LOGGER = logging.getLogger(__name__)

#: The cookie that keeps the dashboard's API key (HttpOnly, SameSite=Strict, Path=/dashboard).
COOKIE_NAME = "dicom_ai_dashboard"
#: The page reloads itself this often.
REFRESH_SECONDS = 10
#: Thumbnails are this many pixels on their long side.
THUMBNAIL_PX = 160
#: Rows per table.
ROWS = 20
#: The sign-in form's body (one key of about 50 characters); a larger one is refused unread.
MAX_FORM_BYTES = 4096
#: A row id in a path or the page's query: ids are 1..MAX_ID (larger ones cannot exist and
#: would make the database driver raise), anything else answers 422.
RowId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="A row id.")]

#: An operator action of the API: ``(id, key, client address) -> answer``; raises
#: HTTPException 404/409. The key and the address go to the audit trail as the API's do.
Action = Callable[[int, apikeys.ApiKeyInfo, str | None], Mapping[str, Any]]

#: The page templates (``dicom_ai/api/templates``, package data): every value is escaped
#: unless marked safe, and an undefined name is an error, not an empty string.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("dicom_ai.api", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

# No scripts, no frames, images and forms only from here. The referrer goes to this origin
# only: with "no-referrer" a browser without Fetch Metadata would post "Origin: null", which
# the same-origin check of the forms refuses; no address here carries a secret.
_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")
_HTML_HEADERS = {"Content-Security-Policy": _CSP, "Cache-Control": "no-store",
                 "Referrer-Policy": "same-origin", "X-Content-Type-Options": "nosniff",
                 "X-Frame-Options": "DENY"}


# -- small HTML helpers -------------------------------------------------------------------------
def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%SZ")


def _date(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else (da or "—")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


_TEMPLATES.filters["when"] = _when


def _page(template: str, title: str, code: int = 200, *, refresh: bool = False,
          headers: Mapping[str, str] | None = None, **context: Any) -> HTMLResponse:
    """Render one of the templates as the answer (with the security headers)."""
    text = _TEMPLATES.get_template(template).render(
        title=title, refresh_seconds=REFRESH_SECONDS if refresh else None, **context)
    return HTMLResponse(text, status_code=code, headers={**_HTML_HEADERS, **(headers or {})})


def _login_page(request: Request, reason: str,
                code: int = status.HTTP_401_UNAUTHORIZED) -> HTMLResponse:
    """The sign-in form (a POST of the key, never a key in the address)."""
    headers = {"WWW-Authenticate": "Bearer"} if code == status.HTTP_401_UNAUTHORIZED else {}
    return _page("login.html", "dicom-ai dashboard: sign in", code, headers=headers,
                 reason=reason, base=_base(request))


def _refused(text: str, code: int = status.HTTP_403_FORBIDDEN, *,
             back: str | None = None) -> HTMLResponse:
    return _page("refused.html", "dicom-ai dashboard", code, reason=text, back=back)


def _base(request: Request) -> str:
    """The dashboard's absolute path (behind a proxy that sets ``root_path``)."""
    return f"{request.scope.get('root_path', '')}/dashboard"


async def _form_fields(request: Request) -> dict[str, str] | int:
    """The fields of a small url-encoded form body, or the HTTP status that refuses it.

    The body is read in the chunks that arrive and given up past :data:`MAX_FORM_BYTES`, so
    a client declaring or sending a large body costs no more than that.
    """
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return status.HTTP_415_UNSUPPORTED_MEDIA_TYPE
    declared = request.headers.get("content-length", "0").strip()
    # Digits only (isdigit alone takes "²"), and short enough for int() to be cheap.
    if not (declared.isascii() and declared.isdigit()) or len(declared) > 9 \
            or int(declared) > MAX_FORM_BYTES:
        return status.HTTP_413_CONTENT_TOO_LARGE
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return status.HTTP_413_CONTENT_TOO_LARGE
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    except ValueError:  # more fields than a sign-in form has
        return status.HTTP_400_BAD_REQUEST
    return {name: values[0] for name, values in fields.items()}


# -- thumbnails ---------------------------------------------------------------------------------
def render_thumbnail(path: Path, frame_number: int | None = None,
                     size: int = THUMBNAIL_PX, *, limits: LimitsSettings | None = None) -> bytes:
    """A PNG thumbnail of one frame of a DICOM image, made in bounded memory.

    The declared size is checked against `limits` before anything is decoded (the file is read
    with its pixel data deferred, so a refused file's pixels are not even loaded); the decoded
    frame is then windowed and scaled down in strips of rows
    (:func:`~dicom_ai.pipeline.preprocessing.unit_image`), so a large image costs about its
    decoded size, never several float copies of it.

    Parameters
    ----------
    path : Path
        The DICOM file.
    frame_number : int, optional
        1-based frame of a multi-frame image (the first when None).
    size : int
        Pixels on the long side (small images are enlarged to it too).
    limits : LimitsSettings, optional
        ``[limits]`` (``max_frame_pixels``, ``max_pixel_bytes``); default: their defaults.

    Returns
    -------
    bytes
        The PNG: 8-bit grey for MONOCHROME1/2 (Bits Stored masked, modality LUT and VOI
        applied, MONOCHROME1 inverted, PS3.3 C.7.6.3.1, C.11), RGB for colour images.

    Raises
    ------
    PixelLimitError
        The image declares more pixels or bytes than `limits` allow (a :class:`DicomAIError`).
    DicomAIError
        The pixel data cannot be decoded or windowed.
    InvalidDicomError, OSError
        The file is not DICOM or cannot be read.
    """
    ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = min(max((frame_number or 1) - 1, 0), frames - 1) if frames > 1 else None
    arr = decode(ds, index, limits=limits)
    rows, columns = int(arr.shape[0]), int(arr.shape[1])
    scale = size / max(rows, columns)
    target = (max(1, round(rows * scale)), max(1, round(columns * scale)))
    unit = unit_image(arr, ds, target)
    del arr  # the decoded frame goes before the PNG is made
    pixels = np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB").save(out, format="PNG")
    return out.getvalue()


@lru_cache(maxsize=256)
def _cached_thumbnail(path: str, mtime_ns: int, frame_number: int | None,
                      limits: LimitsSettings | None = None) -> bytes:
    """Thumbnails by file, version, frame and limits (a few MB at most: PNGs of 160 pixels)."""
    del mtime_ns  # part of the cache key only: a rewritten file gets a new thumbnail
    return render_thumbnail(Path(path), frame_number, limits=limits)


# -- the router ---------------------------------------------------------------------------------
def dashboard_router(settings: Settings, db: Database, *, rerun: Action,
                     retry: Action) -> APIRouter:
    """The dashboard's routes.

    Parameters
    ----------
    settings : Settings
        The store root, ``api.show_patient_names`` and the model registry folder.
    db : Database
        The index.
    rerun : Action
        The API's job re-run action (``POST /api/jobs/{id}/rerun``).
    retry : Action
        The API's delivery retry action (``POST /api/outbox/{id}/retry``).

    Returns
    -------
    APIRouter
        Mount it with ``app.include_router``.
    """
    router = APIRouter(tags=["dashboard"])
    authenticator = Authenticator(db)
    root = settings.storage.root.resolve()
    show_patient = settings.api.show_patient_names

    def header_token(request: Request) -> str:
        """A key sent in a header (Bearer or X-API-Key): a script's, not a browser cookie's."""
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        token = credentials.strip() if scheme.lower() == "bearer" else ""
        return token or request.headers.get("x-api-key", "")

    def viewer(request: Request) -> apikeys.ApiKeyInfo | None:
        """The request's key: Bearer, X-API-Key or the cookie; None if none is valid."""
        return key_of(header_token(request) or request.cookies.get(COOKIE_NAME, ""))

    def key_of(token: str) -> apikeys.ApiKeyInfo | None:
        if not token:
            return None
        try:
            return authenticator(None, token)
        except HTTPException:
            return None

    # -- the page -------------------------------------------------------------------------------
    @router.get("/dashboard", response_class=HTMLResponse, summary="The web dashboard",
                responses={401: {"description": "No valid API key"}})
    def dashboard(request: Request,
                  done: Literal["rerun", "retry"] | None = None,
                  failed: Literal["rerun", "retry"] | None = None,
                  target: Annotated[int | None, Query(alias="id", ge=1,
                                                      le=MAX_ID)] = None,
                  new: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
                  code: Annotated[int | None, Query(ge=100, le=599)] = None) -> Response:
        """The dashboard page (the sign-in form without a valid key)."""
        viewer_key = viewer(request)
        if viewer_key is None:
            # An old bookmark with ?key=: say why it no longer signs in (never echo the key).
            reason = ("A key in the address is not accepted: sign in with the form."
                      if "key" in request.query_params else "This page needs an API key.")
            return _login_page(request, reason)
        notice = _notice(done, failed, target, new, code)
        return _page("dashboard.html", "dicom-ai dashboard", refresh=True,
                     **page_context(viewer_key, notice))

    # -- signing in and out (POST forms of this origin only) ----------------------------------
    @router.post("/dashboard/login", response_class=RedirectResponse,
                 status_code=status.HTTP_303_SEE_OTHER, summary="Sign in (the page's form)",
                 responses={401: {"description": "Unknown or revoked key"},
                            403: {"description": "A request of another site"}})
    async def sign_in(request: Request) -> Response:
        """Check the form's ``key`` and keep it in the dashboard's cookie."""
        refused = cross_site_reason(request)
        if refused is not None:
            LOGGER.warning("dashboard: sign-in refused: %s", refused)
            return _refused("A form of another site cannot sign in here.")
        fields = await _form_fields(request)
        if isinstance(fields, int):
            return _refused("The sign-in form takes one short key.", fields)
        token = fields.get("key", "").strip()
        found = await run_in_threadpool(key_of, token)
        if found is None:
            LOGGER.info("dashboard: sign-in with an unknown or revoked key refused")
            return _login_page(request, "That API key is unknown or revoked.")
        base = _base(request)
        redirect = RedirectResponse(base, status_code=status.HTTP_303_SEE_OTHER,
                                    headers=_HTML_HEADERS)
        redirect.set_cookie(COOKIE_NAME, token, path=base, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        LOGGER.info("dashboard: API key %d (%s) signed in", found.id, found.prefix)
        return redirect

    @router.post("/dashboard/logout", response_class=HTMLResponse,
                 summary="Sign out (the page's button)",
                 responses={403: {"description": "A request of another site"}})
    def sign_out(request: Request) -> Response:
        """Forget the key kept in this browser's cookie."""
        refused = cross_site_reason(request)
        if refused is not None:
            LOGGER.warning("dashboard: sign-out refused: %s", refused)
            return _refused("A form of another site cannot sign out here.")
        response = _login_page(request, "Signed out: the key is forgotten in this browser.",
                               status.HTTP_200_OK)
        response.delete_cookie(COOKIE_NAME, path=_base(request), httponly=True,
                               samesite="strict", secure=request.url.scheme == "https")
        return response

    def page_context(viewer_key: apikeys.ApiKeyInfo, notice: Notice | None) -> dict[str, Any]:
        """What ``dashboard.html`` shows, read in one session."""
        now = datetime.now(UTC)
        with db.sessions() as session:
            snap = storage_metrics.metrics_snapshot(session, now=now)
            studies = study_rows.list_studies(session, limit=ROWS, with_patient=show_patient)
            routing = job_rows.decisions_of_studies(
                session, [s.study_instance_uid for s in studies])
            notes = job_rows.job_notes(
                session, [d.job_id for ds in routing.values() for d in ds
                          if d.job_id is not None])
            findings = job_rows.list_findings(session, limit=ROWS)
            failed_jobs = job_rows.list_jobs(session, state="failed", limit=ROWS)
            failing = outbox_rows.list_outbox(session, failing=True, limit=ROWS)
        models, models_error = _models(settings)
        return {
            "version": __version__, "now": _when(now), "key_name": viewer_key.name,
            "operator": viewer_key.role == ROLE_OPERATOR,
            "role": "operator" if viewer_key.role == ROLE_OPERATOR else "read-only",
            "notice": notice, "counts": _counts(snap), "show_patient": show_patient,
            "studies": [_study(s, routing.get(s.study_instance_uid, []), notes)
                        for s in studies],
            "findings": findings, "failed_jobs": failed_jobs, "failing": failing,
            "models": models, "models_error": models_error,
        }

    # -- thumbnails -----------------------------------------------------------------------------
    @router.get("/dashboard/thumbnails/{kind}/{finding_id}.png", response_class=Response,
                summary="A finding's heat-map or source image as a PNG thumbnail",
                responses={200: {"content": {"image/png": {}}}})
    def thumbnail(request: Request, kind: Literal["heatmap", "source"],
                  finding_id: RowId) -> Response:
        """A PNG thumbnail of a finding's heat-map Secondary Capture or of its source image."""
        if viewer(request) is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="an API key is required",
                                headers={"WWW-Authenticate": "Bearer"})
        with db.sessions() as session:
            finding = job_rows.finding(session, finding_id)
            if finding is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such finding")
            frame: int | None = None
            if kind == "heatmap":
                relative = finding.heatmap_path
            else:
                relative = find_instance_path(session, finding.sop_instance_uid)
                frame = finding.frame_number
        if not relative:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"the finding has no {kind}")
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"the {kind} file is gone")
        mtime_ns = path.stat().st_mtime_ns
        etag = '"' + hashlib.sha256(
            f"{path}|{mtime_ns}|{frame}|{THUMBNAIL_PX}".encode()).hexdigest()[:32] + '"'
        cache = {"Cache-Control": "private, max-age=86400", "ETag": etag,
                 "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=cache)
        try:
            png = _cached_thumbnail(str(path), mtime_ns, frame, settings.limits)
        except (DicomAIError, InvalidDicomError, OSError, ValueError) as exc:
            LOGGER.warning("dashboard: no thumbnail of %s: %s", relative, exc)
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                detail=f"cannot render the {kind}") from None
        return Response(png, media_type="image/png", headers=cache)

    # -- buttons --------------------------------------------------------------------------------
    def act(request: Request, action: Literal["rerun", "retry"], target: int) -> Response:
        # The cookie is sent by the browser on its own: its requests must show this origin.
        # A key in a header is a script's (a page of another site cannot set one).
        refused = cross_site_reason(request, key_in_header=bool(header_token(request)))
        if refused is not None:
            LOGGER.warning("dashboard: %s button refused: %s", action, refused)
            return _refused("A form of another site cannot act here.")
        key = viewer(request)
        if key is None:
            return _login_page(request, "This action needs an API key.")
        if key.role != ROLE_OPERATOR:
            LOGGER.info("API key %d (%s) refused a dashboard action", key.id, key.prefix)
            return _refused("This action needs an operator key.", back="../../../dashboard")
        base = _base(request)
        try:
            peer = request.client.host if request.client is not None else None
            answer = (rerun if action == "rerun" else retry)(target, key, peer)
        except HTTPException as exc:
            where = f"{base}?failed={action}&id={target}&code={exc.status_code}"
            return RedirectResponse(where, status_code=status.HTTP_303_SEE_OTHER)
        new = ""
        if action == "rerun":
            job = answer.get("job")
            new = f"&new={int(job['id'])}" if isinstance(job, Mapping) else ""
        return RedirectResponse(f"{base}?done={action}&id={target}{new}",
                                status_code=status.HTTP_303_SEE_OTHER)

    @router.post("/dashboard/jobs/{job_id}/rerun", summary="Re-run a job (the page's button)",
                 response_class=RedirectResponse, status_code=status.HTTP_303_SEE_OTHER)
    def rerun_button(request: Request, job_id: RowId) -> Response:
        """``POST /api/jobs/{id}/rerun`` for the page's form; redirects back to the page."""
        return act(request, "rerun", job_id)

    @router.post("/dashboard/outbox/{outbox_id}/retry",
                 summary="Retry a failing delivery now (the page's button)",
                 response_class=RedirectResponse, status_code=status.HTTP_303_SEE_OTHER)
    def retry_button(request: Request, outbox_id: RowId) -> Response:
        """``POST /api/outbox/{id}/retry`` for the page's form; redirects back to the page."""
        return act(request, "retry", outbox_id)

    return router


# -- page sections ------------------------------------------------------------------------------
_FAILURES = {
    ("rerun", 404): "Job {id}: no such job.",
    ("rerun", 409): "Job {id} cannot be re-run: its route is no longer configured.",
    ("retry", 404): "Delivery {id}: no such delivery.",
    ("retry", 409): "Delivery {id} was already sent; to send its result again use "
                    "POST /api/results/RESULT_ID/resend.",
}


@dataclass(frozen=True)
class Notice:
    """The outcome of a button shown at the top of the page."""

    text: str
    bad: bool = False


def _notice(done: str | None, failed: str | None, target: int | None, new: int | None,
            code: int | None) -> Notice | None:
    """The outcome of a button, from the redirect's query (numbers and fixed words only)."""
    if target is None:
        return None
    if done == "rerun":
        return Notice(f"Job {target} is re-run" + (f" as job {new}." if new is not None else "."))
    if done == "retry":
        return Notice(f"Delivery {target} is tried now.")
    if failed is not None:
        text = _FAILURES.get((failed, code or 0), "{action} {id} failed (HTTP {code}).").format(
            id=target, action=failed.capitalize(), code=code)
        return Notice(text, bad=True)
    return None


def _counts(snap: storage_metrics.MetricsSnapshot) -> list[tuple[str, int, str]]:
    """The count boxes: (label, number, id slug)."""
    studies, jobs = snap.studies_by_state, snap.jobs_by_state
    return [
        ("studies receiving", studies.get("receiving", 0), "studies-receiving"),
        ("studies complete", studies.get("complete", 0), "studies-complete"),
        ("instances", snap.instances, "instances"),
        ("jobs pending", jobs.get("pending", 0), "jobs-pending"),
        ("jobs due now", snap.jobs_due, "jobs-due"),
        ("jobs running", jobs.get("running", 0), "jobs-running"),
        ("jobs waiting (disk or index)", jobs.get("waiting", 0), "jobs-waiting"),
        ("jobs done", jobs.get("done", 0), "jobs-done"),
        ("jobs failed", jobs.get("failed", 0), "jobs-failed"),
        ("deliveries pending", sum(snap.pending.values()), "outbox-pending"),
        ("deliveries failing", sum(snap.failing.values()), "outbox-failing"),
        ("results sent", sum(snap.sent.values()), "outbox-sent"),
        # Storage Commitment destinations: delivered only once committed.
        ("results committed", sum(snap.committed.values()), "outbox-committed"),
        ("awaiting commitment", sum(snap.awaiting.values()), "outbox-awaiting"),
        ("instances refused", sum(snap.rejected_by_status.values()), "refused"),
    ]


def _routing(decisions: Sequence[Any], notes: Mapping[int, str]) -> list[dict[str, Any]]:
    """A study's routing cell: one part per (route, job), in decision order."""
    parts: list[dict[str, Any]] = []
    seen: set[tuple[str | None, int | None]] = set()
    for d in decisions:
        if (d.route, d.job_id) in seen:
            continue
        seen.add((d.route, d.job_id))
        note = notes.get(d.job_id) if d.job_id is not None and d.route is not None else None
        # Why a done job's model skipped series: "not applicable: ..." (no result) or the
        # series it skipped. UIDs and the scope gate's reasons only, never patient data.
        parts.append({
            "route": d.route, "job_id": d.job_id, "reason": d.reason,
            "note": (note if len(note) <= 500 else note[:499] + "…") if note else None,
            "note_kind": ("not-applicable" if note and note.startswith("not applicable: ")
                          else "partly-skipped"),
        })
    return parts


def _study(s: study_rows.StudyRow, decisions: Sequence[Any], notes: Mapping[int, str]
           ) -> dict[str, Any]:
    """One row of the recent studies (patient fields only where the query returned them)."""
    patient = s.patient or {}
    return {
        "uid": s.study_instance_uid, "date": _date(s.study_date),
        "patient_name": patient.get("PatientName", ""), "patient_id": patient.get("PatientID", ""),
        "modalities": ", ".join(s.modalities), "series": s.series, "instances": s.instances,
        "state": s.state, "routing": _routing(decisions, notes),
        "last_received": _when(s.last_received_at),
    }


def _models(settings: Settings) -> tuple[list[dict[str, Any]], str | None]:
    """The registry's models, or the reason it cannot be read."""
    try:
        entries = Registry(settings.storage.root / "models").entries()
    except ConfigError as exc:
        return [], str(exc)
    rows = []
    for entry in entries:
        spec = entry.spec
        metrics = spec.provenance.metrics
        ordered = sorted(metrics, key=lambda k: (k != "roc_auc", k))
        rows.append({
            "name": spec.name, "version": spec.version, "active": entry.active,
            "task": spec.task, "modalities": ", ".join(spec.modalities) or "any",
            "origin": "bundled" if entry.bundled else "registered",
            "metrics": ", ".join(f"{k} {_number(metrics[k])}" for k in ordered),
            "training_data": spec.provenance.training_data,
        })
    return rows, None
