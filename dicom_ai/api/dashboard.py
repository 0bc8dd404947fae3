"""The web dashboard: one server-rendered HTML page, its thumbnails and its two buttons.

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
import html
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

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
from storage import api_queries, apikeys, dashboard_queries
from storage.db import Database
from storage.models import ROLE_OPERATOR, FindingRecord, Job, OutboxItem, ResultObject
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
RowId = Annotated[int, PathParam(ge=1, le=api_queries.MAX_ID, description="A row id.")]

#: An operator action of the API: ``(id, key, client address) -> answer``; raises
#: HTTPException 404/409. The key and the address go to the audit trail as the API's do.
Action = Callable[[int, apikeys.ApiKeyInfo, str | None], Mapping[str, Any]]

_e = html.escape

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.meta { color: #666; font-size: .9em; }
.notice { background: #eef6ee; border: 1px solid #9c9; padding: .4em .8em; }
.notice.bad { background: #fbeeee; border-color: #c99; }
.counts { display: flex; flex-wrap: wrap; gap: .6em; }
.count { border: 1px solid #ccc; border-radius: 4px; padding: .3em .8em; min-width: 7em; }
.count b { display: block; font-size: 1.4em; }
table { border-collapse: collapse; } th, td { padding: .25em .6em; text-align: left;
  vertical-align: top; border-bottom: 1px solid #e4e4e4; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.present { color: #a00; font-weight: bold; } .absent { color: #070; }
.failed, .failing { color: #a00; } .superseded { color: #888; text-decoration: line-through; }
.err { max-width: 40em; overflow-wrap: anywhere; font-size: .9em; }
.skip-note { color: #8a5a00; }
img.thumb { max-width: 160px; max-height: 160px; background: #000; margin-right: 4px; }
form { display: inline; } .empty { color: #888; font-style: italic; }
"""

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


def _short_uid(uid: str) -> str:
    """A UID cut to its start and end (the full UID is in the element's title)."""
    text = uid if len(uid) <= 24 else f"{uid[:10]}…{uid[-10:]}"
    return f'<span class="uid" title="{_e(uid)}">{_e(text)}</span>'


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def _table(headers: Sequence[str], rows: Sequence[str], empty: str, table_id: str) -> str:
    if not rows:
        return f'<p class="empty" id="{table_id}">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>' \
           f'{"".join(rows)}</tbody></table>'


def _document(title: str, body: str, *, refresh: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}; url=dashboard">' \
        if refresh else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>")


def _page(title: str, body: str, code: int = 200, *, refresh: bool = False,
          headers: Mapping[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(_document(title, body, refresh=refresh), status_code=code,
                        headers={**_HTML_HEADERS, **(headers or {})})


def _login_page(request: Request, reason: str,
                code: int = status.HTTP_401_UNAUTHORIZED) -> HTMLResponse:
    """The sign-in form (a POST of the key, never a key in the address)."""
    body = (f"<h1>dicom-ai dashboard</h1><p>{_e(reason)}</p>"
            f'<form method="post" action="{_e(_base(request))}/login" id="sign-in">'
            '<label>API key <input type="password" name="key" id="key" required '
            'autocomplete="current-password" size="50"></label> '
            '<button type="submit">Sign in</button></form>'
            "<p>The key is then kept in a cookie of this browser until it closes or you sign "
            "out. Make a key with <code>dicom-ai apikeys create NAME --role read</code> (or "
            "<code>--role operator</code> for the Re-run and Retry buttons).</p>")
    headers = {"WWW-Authenticate": "Bearer"} if code == status.HTTP_401_UNAUTHORIZED else {}
    return _page("dicom-ai dashboard: sign in", body, code, headers=headers)


def _refused(text: str, code: int = status.HTTP_403_FORBIDDEN) -> HTMLResponse:
    return _page("dicom-ai dashboard", f"<h1>Refused</h1><p>{_e(text)}</p>", code)


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
                                                      le=api_queries.MAX_ID)] = None,
                  new: Annotated[int | None, Query(ge=1, le=api_queries.MAX_ID)] = None,
                  code: Annotated[int | None, Query(ge=100, le=599)] = None) -> Response:
        """The dashboard page (the sign-in form without a valid key)."""
        viewer_key = viewer(request)
        if viewer_key is None:
            # An old bookmark with ?key=: say why it no longer signs in (never echo the key).
            reason = ("A key in the address is not accepted: sign in with the form."
                      if "key" in request.query_params else "This page needs an API key.")
            return _login_page(request, reason)
        notice = _notice(done, failed, target, new, code)
        return _page("dicom-ai dashboard", render_body(viewer_key, notice), refresh=True)

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

    def render_body(viewer_key: apikeys.ApiKeyInfo, notice: str) -> str:
        now = datetime.now(UTC)
        operator = viewer_key.role == ROLE_OPERATOR
        with db.sessions() as session:
            snap = api_queries.metrics_snapshot(session, now=now)
            studies = api_queries.list_studies(session, limit=ROWS, with_patient=show_patient)
            routing = dashboard_queries.routing_of_studies(
                session, [s.study_instance_uid for s in studies])
            notes = dashboard_queries.job_notes(
                session, [d.job_id for ds in routing.values() for d in ds
                          if d.job_id is not None])
            findings = api_queries.list_findings(session, limit=ROWS)
            failed_jobs = api_queries.list_jobs(session, state="failed", limit=ROWS)
            failing = api_queries.list_outbox(session, failing=True, limit=ROWS)
        role = "operator" if operator else "read-only"
        header = (f"<h1>dicom-ai dashboard</h1><div class=\"meta\">dicom-ai {_e(__version__)} · "
                  f"{_when(now)} · reloads every {REFRESH_SECONDS} s · key "
                  f"<b>{_e(viewer_key.name)}</b> ({role}) · "
                  '<form method="post" action="dashboard/logout"><button type="submit" '
                  f'id="sign-out">Sign out</button></form></div>{notice}')
        return "".join([
            header,
            "<h2>Counts</h2>", _counts(snap),
            "<h2>Recent studies</h2>", _studies(studies, routing, notes, show_patient),
            "<h2>Recent findings</h2>", _findings(findings),
            "<h2>Failed jobs</h2>", _failed_jobs(failed_jobs, operator),
            "<h2>Failing deliveries</h2>", _failing(failing, operator),
            "<h2>Models</h2>", _models(settings),
        ])

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
            finding = dashboard_queries.finding(session, finding_id)
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
            return _page("dicom-ai dashboard", "<h1>Refused</h1><p>This action needs an "
                         'operator key. <a href="../../../dashboard">Back</a></p>',
                         status.HTTP_403_FORBIDDEN)
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


def _notice(done: str | None, failed: str | None, target: int | None, new: int | None,
            code: int | None) -> str:
    """The outcome of a button, from the redirect's query (numbers and fixed words only)."""
    if target is None:
        return ""
    if done == "rerun":
        text = f"Job {target} is re-run" + (f" as job {new}." if new is not None else ".")
    elif done == "retry":
        text = f"Delivery {target} is tried now."
    elif failed is not None:
        text = _FAILURES.get((failed, code or 0), "{action} {id} failed (HTTP {code}).").format(
            id=target, action=failed.capitalize(), code=code)
        return f'<p class="notice bad" role="status">{_e(text)}</p>'
    else:
        return ""
    return f'<p class="notice" role="status">{_e(text)}</p>'


def _counts(snap: api_queries.MetricsSnapshot) -> str:
    studies, jobs = snap.studies_by_state, snap.jobs_by_state
    cells = [
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
    return '<div class="counts" id="counts">' + "".join(
        f'<div class="count" id="count-{slug}"><b>{n}</b>{_e(label)}</div>'
        for label, n, slug in cells) + "</div>"


def _routing(decisions: Sequence[Any], notes: Mapping[int, str]) -> str:
    if not decisions:
        return "—"
    parts: list[str] = []
    seen: set[tuple[str | None, int | None]] = set()
    for d in decisions:
        if (d.route, d.job_id) in seen:
            continue
        seen.add((d.route, d.job_id))
        if d.route is None:
            parts.append(f'<span title="{_e(d.reason)}">unrouted</span>')
        else:
            job = f" → job {d.job_id}" if d.job_id is not None else ""
            parts.append(f"{_e(d.route)}{job}{_job_note(d.job_id, notes)}")
    return "<br>".join(parts)


def _job_note(job_id: int | None, notes: Mapping[int, str]) -> str:
    """Why a done job's model skipped series: ``not applicable: ...`` (no result) or the
    series it skipped. UIDs and the scope gate's reasons only, never patient data."""
    note = notes.get(job_id) if job_id is not None else None
    if not note:
        return ""
    kind = "not-applicable" if note.startswith("not applicable: ") else "partly-skipped"
    shown = note if len(note) <= 500 else note[:499] + "…"
    return f'<div class="err skip-note {kind}" data-job-id="{job_id}">{_e(shown)}</div>'


def _studies(rows: Sequence[api_queries.StudyRow], routing: Mapping[str, Sequence[Any]],
             notes: Mapping[int, str], show_patient: bool) -> str:
    headers = ["Study", "Date", "Modalities", "Series", "Instances", "State", "Routing",
               "Last received"]
    if show_patient:
        headers[1:1] = ["Patient", "Patient ID"]
    lines = []
    for s in rows:
        patient = ""
        if show_patient and s.patient is not None:
            patient = (f"<td>{_e(s.patient.get('PatientName', ''))}</td>"
                       f"<td>{_e(s.patient.get('PatientID', ''))}</td>")
        lines.append(
            f'<tr data-study-uid="{_e(s.study_instance_uid)}">'
            f"<td>{_short_uid(s.study_instance_uid)}</td>{patient}"
            f"<td>{_e(_date(s.study_date))}</td><td>{_e(', '.join(s.modalities))}</td>"
            f'<td class="num">{s.series}</td><td class="num">{s.instances}</td>'
            f'<td class="state">{_e(s.state)}</td>'
            f"<td>{_routing(routing.get(s.study_instance_uid, []), notes)}</td>"
            f"<td>{_when(s.last_received_at)}</td></tr>")
    return _table(headers, lines, "No studies yet.", "studies")


def _findings(rows: Sequence[FindingRecord]) -> str:
    lines = []
    for f in rows:
        images = "—"
        if f.heatmap_path:
            images = (f'<img class="thumb source" alt="source image" '
                      f'src="dashboard/thumbnails/source/{f.id}.png">'
                      f'<img class="thumb heatmap" alt="heat-map" '
                      f'src="dashboard/thumbnails/heatmap/{f.id}.png">')
        decision = "present" if f.present else "absent"
        superseded = (f' <span class="superseded" title="superseded by job '
                      f'{f.superseded_by_job_id}">superseded</span>'
                      if f.superseded_by_job_id is not None else "")
        lines.append(
            f'<tr data-finding-id="{f.id}" data-study-uid="{_e(f.study_instance_uid)}">'
            f"<td>{_short_uid(f.study_instance_uid)}</td>"
            f"<td>{_e(f.model_name)} {_e(f.model_version)}</td>"
            f"<td>{_e(f.code_meaning)}</td>"
            f'<td class="num probability">{f.probability:.3f}</td>'
            f'<td class="num">{f.threshold:.3f}</td>'
            f'<td class="decision {decision}">{decision}{superseded}</td>'
            f"<td>{images}</td><td>job {f.job_id}<br>{_when(f.created_at)}</td></tr>")
    return _table(["Study", "Model", "Finding", "Probability", "Threshold", "Decision",
                   "Source and heat-map", "Job, time"], lines, "No findings yet.", "findings")


def _button(action: str, label: str, operator: bool) -> str:
    if not operator:
        return f'<button type="button" disabled title="needs an operator key">{label}</button>'
    return f'<form method="post" action="{action}"><button type="submit">{label}</button></form>'


def _failed_jobs(rows: Sequence[Job], operator: bool) -> str:
    lines = [
        f'<tr data-job-id="{j.id}"><td class="num">{j.id}</td>'
        f"<td>{_short_uid(j.study_instance_uid)}</td><td>{_e(j.route)}</td>"
        f"<td>{_e(j.model_name)} {_e(j.model_version or '')}</td>"
        f'<td class="num">{j.attempts}/{j.max_attempts}</td>'
        f'<td class="err failed">{_e((j.error or "")[:500])}</td>'
        f"<td>{_when(j.finished_at)}</td>"
        f"<td>{_button(f'dashboard/jobs/{j.id}/rerun', 'Re-run', operator)}</td></tr>"
        for j in rows]
    return _table(["Job", "Study", "Route", "Model", "Attempts", "Error", "Failed at", ""],
                  lines, "No failed jobs.", "failed-jobs")


def _failing(rows: Sequence[tuple[OutboxItem, ResultObject]], operator: bool) -> str:
    lines = [
        f'<tr data-outbox-id="{item.id}"><td class="num">{item.id}</td>'
        f'<td class="num">{item.job_id}</td><td>{_e(result.kind)}</td>'
        f"<td>{_e(item.destination)}</td><td class=\"num\">{item.attempts}</td>"
        f'<td class="err failing">{_e((item.last_error or "")[:500])}</td>'
        f"<td>{_when(item.next_attempt_at)}</td>"
        f"<td>{_button(f'dashboard/outbox/{item.id}/retry', 'Retry', operator)}</td></tr>"
        for item, result in rows]
    return _table(["Delivery", "Job", "Object", "Destination", "Attempts", "Last error",
                   "Next attempt", ""], lines, "No failing deliveries.", "failing-deliveries")


def _models(settings: Settings) -> str:
    try:
        entries = Registry(settings.storage.root / "models").entries()
    except ConfigError as exc:
        return f'<p class="err failed">The model registry cannot be read: {_e(str(exc))}</p>'
    lines = []
    for entry in entries:
        spec = entry.spec
        metrics = spec.provenance.metrics
        ordered = sorted(metrics, key=lambda k: (k != "roc_auc", k))
        shown = ", ".join(f"{_e(k)} {_number(metrics[k])}" for k in ordered)
        where = "bundled" if entry.bundled else "registered"
        lines.append(
            f'<tr data-model="{_e(spec.name)}" data-version="{_e(spec.version)}">'
            f"<td>{_e(spec.name)}</td><td>{_e(spec.version)}</td>"
            f"<td>{'active' if entry.active else ''}</td><td>{_e(spec.task)}</td>"
            f"<td>{_e(', '.join(spec.modalities) or 'any')}</td><td>{where}</td>"
            f'<td class="metrics">{shown or "—"}</td>'
            f"<td>{_e(spec.provenance.training_data)}</td></tr>")
    return _table(["Model", "Version", "State", "Task", "Modalities", "Origin",
                   "Evaluation metrics", "Training data"], lines, "No models.", "models")
