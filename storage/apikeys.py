"""API keys: created with a random token shown once, stored as its SHA-256, revocable.

A token is ``dak_`` followed by 43 URL-safe characters (32 random bytes). The database keeps
its first 12 characters (to find the row and to tell keys apart in listings) and the hex
SHA-256 of the whole token; the token itself is never stored, so a leaked database does not
leak working keys. A plain hash (no salt, no stretching) is enough for 256 random bits.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import ROLE_OPERATOR, ROLE_READ, ApiKey

__all__ = ["ROLES", "ApiKeyInfo", "NewKey", "authenticate", "create_key", "list_keys",
           "needs_touch", "revoke_key", "touch_key"]

ROLES = (ROLE_READ, ROLE_OPERATOR)
TOKEN_PREFIX = "dak_"  # noqa: S105 - the public marker of our tokens, not a secret
PREFIX_LENGTH = 12
# ``last_used_at`` is written at most this often per key (a read request stays a read).
TOUCH_SECONDS = 60.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyInfo:
    """A key as listings show it (no hash, no token)."""

    id: int
    name: str
    role: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    """A key just created, with its token (the only time the token exists)."""

    info: ApiKeyInfo
    token: str


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(row.id, row.name, row.role, row.prefix, row.created_at, row.revoked_at,
                      row.last_used_at)


def create_key(session: Session, *, name: str, role: str, now: datetime) -> NewKey:
    """Create a key.

    Parameters
    ----------
    session : Session
        A session in a transaction (the caller commits).
    name : str
        Who or what uses the key (1-64 characters).
    role : str
        ``read`` or ``operator``.
    now : datetime
        Creation time (timezone-aware).

    Returns
    -------
    NewKey
        The stored key and its token, to show once.

    Raises
    ------
    ValueError
        An unknown role or an empty or too long name.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not name.strip() or len(name) > 64:
        raise ValueError("a key name has 1 to 64 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name.strip(), role=role, prefix=token[:PREFIX_LENGTH],
                 key_hash=_digest(token), created_at=now)
    session.add(row)
    session.flush()
    return NewKey(_info(row), token)


def list_keys(session: Session) -> list[ApiKeyInfo]:
    """Every key, revoked ones included, oldest first."""
    return [_info(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.id)).all()]


def revoke_key(session: Session, key_id: int, *, now: datetime) -> bool:
    """Revoke a key; False if there is no such key or it was already revoked."""
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def authenticate(session: Session, token: str) -> ApiKeyInfo | None:
    """The live key a token belongs to, or None (unknown, malformed or revoked).

    Looks the row up by prefix (indexed) and compares the hash in constant time; reads only.
    """
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    digest = _digest(token)
    for row in session.scalars(
        select(ApiKey).where(ApiKey.prefix == token[:PREFIX_LENGTH])
    ).all():
        if hmac.compare_digest(row.key_hash, digest):
            return _info(row) if row.revoked_at is None else None
    return None


def needs_touch(key: ApiKeyInfo, now: datetime) -> bool:
    """Whether :func:`touch_key` is due (``last_used_at`` is written at most once a minute)."""
    return key.last_used_at is None or now - key.last_used_at > timedelta(seconds=TOUCH_SECONDS)


def touch_key(session: Session, key_id: int, *, now: datetime) -> None:
    """Record that a key was used."""
    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
