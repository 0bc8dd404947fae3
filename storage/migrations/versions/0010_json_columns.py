"""JSON held in Text columns becomes JSON columns (JSONB on PostgreSQL)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 14:30:00

On PostgreSQL each column is converted in place (``ALTER COLUMN ... TYPE jsonb USING
col::jsonb``). On SQLite the text already is JSON, which SQLAlchemy's ``JSON`` type stores and
reads as it is (``json.loads`` of the text): only the declared type changes, the values are
copied unchanged (a ``JSON`` column has NUMERIC affinity, which leaves text that is not a
number as text).

``audit_events`` is append-only by code (:mod:`storage.audit` never updates or deletes; there
is no trigger or grant to keep): the conversion keeps every row and its id. The one repair is
of details that an older ``storage.audit`` cut at 4000 characters into text that is not JSON;
they become ``{"detail_truncated": true}``, else no database could convert them.

SQLite cannot use Alembic's batch mode (a copy of the whole table) here: ``jobs`` and
``batches`` are referenced by foreign keys, and ``DROP TABLE`` of the old copy fails on their
child rows (the ``foreign_keys`` pragma cannot be switched off inside the transaction the
upgrade runs in). So each column is swapped in place with SQLite's own ``ALTER TABLE`` (3.35 or
later): a new column is added, the text copied into it as it is, the old one dropped and the new
renamed. The added column needs a default to be ``NOT NULL``: the model's own (``[]`` or
``{}``).
"""

from __future__ import annotations

import json
import sqlite3

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

#: table -> its columns holding JSON text, each with the value of an empty one.
COLUMNS = {
    'mpps': (('referenced_sop_instance_uids', '[]'),),
    'jobs': (('series_instance_uids', '[]'), ('timings', '{}')),
    'batches': (('query', '{}'),),
    'audit_events': (('uids', '[]'), ('detail', '{}')),
}
# storage.audit.MAX_DETAIL_CHARS before 0010: only a detail this long may have been cut.
_CUT_DETAIL_CHARS = 4000


def _repair_cut_details() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.text(
        "SELECT id, detail FROM audit_events WHERE length(detail) >= :n"),
        {"n": _CUT_DETAIL_CHARS}).all()
    for row_id, detail in rows:
        try:
            json.loads(detail)
        except ValueError:
            bind.execute(sa.text("UPDATE audit_events SET detail = :d WHERE id = :id"),
                         {"d": json.dumps({"detail_truncated": True}), "id": row_id})


def _swap_sqlite_column(table: str, column: str, declared: str, empty: str) -> None:
    """Give `column` the `declared` type on SQLite, its values copied as they are."""
    if sqlite3.sqlite_version_info < (3, 35):
        raise RuntimeError(f"migration 0010 needs SQLite 3.35 or later "
                           f"(ALTER TABLE ... DROP COLUMN), not {sqlite3.sqlite_version}")
    new = f'{column}_0010'
    # Names and defaults are the constants above, never input.
    op.execute(f"ALTER TABLE {table} ADD COLUMN {new} {declared} NOT NULL DEFAULT '{empty}'")
    rows = sa.table(table, sa.column(column), sa.column(new))
    op.execute(rows.update().values({new: rows.c[column]}))
    op.execute(f'ALTER TABLE {table} DROP COLUMN {column}')
    op.execute(f'ALTER TABLE {table} RENAME COLUMN {new} TO {column}')


def upgrade() -> None:
    _repair_cut_details()
    postgres = op.get_bind().dialect.name == 'postgresql'
    for table, columns in COLUMNS.items():
        for column, empty in columns:
            if postgres:
                op.alter_column(table, column, type_=postgresql.JSONB(),
                                existing_type=sa.Text(), existing_nullable=False,
                                postgresql_using=f'{column}::jsonb')
            else:
                _swap_sqlite_column(table, column, 'JSON', empty)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    for table, columns in COLUMNS.items():
        for column, empty in columns:
            if postgres:  # jsonb -> text writes the values back as JSON text
                op.alter_column(table, column, type_=sa.Text(),
                                existing_type=postgresql.JSONB(), existing_nullable=False,
                                postgresql_using=f'{column}::text')
            else:
                _swap_sqlite_column(table, column, 'TEXT', empty)
