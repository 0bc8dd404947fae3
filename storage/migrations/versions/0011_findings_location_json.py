"""findings.location: JSON held in a Text column becomes a JSON column (JSONB on PostgreSQL)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 17:00:00

The approach of 0010, for the one nullable column it left: on PostgreSQL the column is
converted in place (``ALTER COLUMN ... TYPE jsonb USING location::jsonb``); on SQLite the text
already is JSON, so only the declared type changes (a new column, the text copied into it as it
is, the old one dropped and the new one renamed: SQLite 3.35 or later), because batch mode's
copy of the table would fail on its foreign key to ``jobs``. A finding without geometry stays
SQL NULL (the model's ``none_as_null``); an empty text, which no version wrote but which no
database could convert, becomes NULL first.
"""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

TABLE = 'findings'
COLUMN = 'location'


def _swap_sqlite_column(declared: str) -> None:
    """Give ``findings.location`` the `declared` type on SQLite, its values copied as they are."""
    if sqlite3.sqlite_version_info < (3, 35):
        raise RuntimeError(f"migration 0011 needs SQLite 3.35 or later "
                           f"(ALTER TABLE ... DROP COLUMN), not {sqlite3.sqlite_version}")
    new = f'{COLUMN}_0011'
    # Names are the constants above, never input; the column stays nullable.
    op.execute(f'ALTER TABLE {TABLE} ADD COLUMN {new} {declared}')
    rows = sa.table(TABLE, sa.column(COLUMN), sa.column(new))
    op.execute(rows.update().values({new: rows.c[COLUMN]}))
    op.execute(f'ALTER TABLE {TABLE} DROP COLUMN {COLUMN}')
    op.execute(f'ALTER TABLE {TABLE} RENAME COLUMN {new} TO {COLUMN}')


def upgrade() -> None:
    rows = sa.table(TABLE, sa.column(COLUMN, sa.Text()))
    op.execute(rows.update().where(rows.c[COLUMN] == '').values({COLUMN: None}))
    if op.get_bind().dialect.name == 'postgresql':
        op.alter_column(TABLE, COLUMN, type_=postgresql.JSONB(), existing_type=sa.Text(),
                        existing_nullable=True, postgresql_using=f'{COLUMN}::jsonb')
    else:
        _swap_sqlite_column('JSON')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':  # jsonb -> text writes JSON text back
        op.alter_column(TABLE, COLUMN, type_=sa.Text(), existing_type=postgresql.JSONB(),
                        existing_nullable=True, postgresql_using=f'{COLUMN}::text')
    else:
        _swap_sqlite_column('TEXT')
