"""Alembic environment: runs on the connection :func:`storage.db.upgrade` hands it."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `alembic` CLI use reaches this
    raise RuntimeError("run migrations through storage.db.upgrade()")

if connection.dialect.name == "postgresql":
    # Several receivers may start at once: one migrates, the others wait, then find it done.
    connection.execute(text("SELECT pg_advisory_xact_lock(7243501)"))

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
