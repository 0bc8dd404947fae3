"""API-key authentication: ``Authorization: Bearer <token>`` or ``X-API-Key: <token>``.

A missing, unknown or revoked key answers 401; a read-only key on an operator action 403.
Keys are made with ``dicom-ai apikeys create`` (see :mod:`storage.apikeys`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from fastapi import HTTPException, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from storage import apikeys
from storage.db import Database
from storage.models import ROLE_OPERATOR

LOGGER = logging.getLogger(__name__)

bearer_scheme = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False,
                             description="An API key in the X-API-Key header.")


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
