"""API-key authentication: ``Authorization: Bearer <token>`` or ``X-API-Key: <token>``.

A missing, unknown or revoked key answers 401; a read-only key on an operator action 403.
Keys are made with ``dicom-ai apikeys create`` (see :mod:`storage.apikeys`).

State-changing requests (``POST``) also pass :func:`cross_site_reason`: a browser says where
a request comes from (``Sec-Fetch-Site``, else ``Origin`` or ``Referer``), and one that comes
from another site is refused, so a page elsewhere cannot make a signed-in browser act (CSRF).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from storage import apikeys
from storage.db import Database
from storage.models import ROLE_OPERATOR

LOGGER = logging.getLogger(__name__)

bearer_scheme = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False,
                             description="An API key in the X-API-Key header.")


#: ``Sec-Fetch-Site`` of a request made by a page of this origin, or by the user (address bar).
_SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})


def _same_origin_url(url: str, host: str) -> bool:
    """Whether an ``Origin`` or ``Referer`` value names this server (``host[:port]``)."""
    parts = urlsplit(url)
    # Only the host and port are compared: behind a TLS proxy the scheme the browser used
    # (https) need not be the one this server sees. "null" (an opaque origin) never matches.
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host


def cross_site_reason(request: Request, *, key_in_header: bool = False) -> str | None:
    """Why a state-changing request must be refused as cross-site; None if it may go on.

    The browser's Fetch Metadata decides when present (``Sec-Fetch-Site`` must be
    ``same-origin`` or ``none``); otherwise ``Origin``, else ``Referer``, must name this
    server (the ``Host`` the request was sent to). A request with none of the three is not
    a browser's: it may go on only when its key is in a header (``Authorization`` or
    ``X-API-Key``, which a page of another site cannot set without CORS, never granted here),
    not when it relies on a cookie or signs in.

    Parameters
    ----------
    request : Request
        The ``POST``.
    key_in_header : bool
        The request authenticates with a header, not with the dashboard's cookie.

    Returns
    -------
    str or None
        A short fixed reason (no header values: they are the caller's text), or None.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return None if site.strip().lower() in _SAME_ORIGIN_FETCH else \
            "a request of another site (Sec-Fetch-Site)"
    host = request.headers.get("host", "").strip().lower()
    origin = request.headers.get("origin")
    if origin is not None:
        return None if _same_origin_url(origin.strip(), host) else "Origin of another site"
    referer = request.headers.get("referer")
    if referer is not None:
        return None if _same_origin_url(referer.strip(), host) else "Referer of another site"
    return None if key_in_header else "no Origin or Referer header"


def same_origin(request: Request) -> None:
    """A FastAPI dependency for the API's actions: 403 for a browser request of another site.

    The API's keys travel in headers, so a client that is not a browser (no Fetch Metadata,
    ``Origin`` or ``Referer``) goes on; this refuses only what a browser marks as cross-site.
    """
    reason = cross_site_reason(request, key_in_header=True)
    if reason is not None:
        # The route's template, not the path: the path is the caller's text.
        route = getattr(request.scope.get("route"), "path", "an action")
        LOGGER.warning("API: refused %s %s: %s", request.method, route, reason)
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            detail=f"refused: {reason}; this server takes no cross-site "
                            "requests")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail,
                         headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    """A FastAPI dependency that resolves the request's API key.

    Parameters
    ----------
    db : Database
        Where the keys are.
    operator : bool
        Require the ``operator`` role (403 for a read-only key).
    """

    def __init__(self, db: Database, *, operator: bool = False) -> None:
        self.db = db
        self.operator = operator

    def __call__(
        self,
        bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme),  # noqa: B008
        header: str | None = Security(header_scheme),
    ) -> apikeys.ApiKeyInfo:
        """Return the caller's key, or raise 401/403."""
        token = bearer.credentials if bearer is not None else header
        if not token:
            raise _unauthorized("an API key is required (Authorization: Bearer <key>)")
        now = datetime.now(UTC)
        with self.db.sessions() as session:
            key = apikeys.authenticate(session, token)
        if key is None:
            raise _unauthorized("unknown or revoked API key")
        if apikeys.needs_touch(key, now):
            with self.db.write_session() as session:
                apikeys.touch_key(session, key.id, now=now)
        if self.operator and key.role != ROLE_OPERATOR:
            LOGGER.info("API key %d (%s) refused an operator action", key.id, key.prefix)
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                detail="this action needs an operator key")
        return key
