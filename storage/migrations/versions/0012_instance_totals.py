"""instance_totals: running totals of the instances table, kept by triggers

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 17:00:00

``/metrics`` and retention's store size counted and summed the whole ``instances`` table
(0.16 s at 1M rows on PostgreSQL). Triggers on ``instances`` now add every insert, delete and
size change to a running total in the writer's own transaction, so the totals are exact after
a crash as the rows are, whatever path wrote (ingest, recovery, retention, a bulk load):

* PostgreSQL: statement-level triggers with transition tables (one upsert per statement, not
  per row) add to the row keyed by ``pg_backend_pid()``: a server process runs one transaction
  at a time and no two open connections share a process id, so concurrent receivers never wait
  on each other's row (one hot row would serialise every commit). A row of a connection long
  closed is folded into another by :func:`storage.metrics.instance_totals`.
* SQLite: one writer at a time, so one row (shard 0), added to by row triggers.

``TRUNCATE instances`` (PostgreSQL) empties the totals. The table is seeded here from one count
of ``instances``, after the triggers exist and with the table locked against writers on
PostgreSQL, so no write is counted twice or missed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

# PostgreSQL: one function per event (a transition table's name is fixed per trigger), each one
# statement (a second one, reading the counts first, cost 15 us more per insert). A statement
# that changed nothing (a duplicate: ON CONFLICT DO NOTHING) selects no row and writes nothing.
_PG_UPSERT = (
    "INSERT INTO instance_totals AS t (shard, instances, size_bytes) {select}"
    " ON CONFLICT (shard) DO UPDATE SET instances = t.instances + excluded.instances,"
    " size_bytes = t.size_bytes + excluded.size_bytes;"
)
_PG_FUNCTIONS = {
    'instance_totals_on_insert': _PG_UPSERT.format(select=(
        "SELECT pg_backend_pid(), count(*), coalesce(sum(size_bytes), 0) FROM new_rows"
        " HAVING count(*) > 0")),
    'instance_totals_on_delete': _PG_UPSERT.format(select=(
        "SELECT pg_backend_pid(), -count(*), -coalesce(sum(size_bytes), 0) FROM old_rows"
        " HAVING count(*) > 0")),
    'instance_totals_on_update': _PG_UPSERT.format(select=(
        "SELECT pg_backend_pid(), 0, d FROM (SELECT"
        " coalesce((SELECT sum(size_bytes) FROM new_rows), 0)"
        " - coalesce((SELECT sum(size_bytes) FROM old_rows), 0) AS d) AS delta WHERE d <> 0")),
}
_PG_FUNCTION = """
CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {body}
    RETURN NULL;
END $$
"""
_PG_TRIGGERS = (
    "CREATE TRIGGER instance_totals_insert AFTER INSERT ON instances"
    " REFERENCING NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION instance_totals_on_insert()",
    "CREATE TRIGGER instance_totals_delete AFTER DELETE ON instances"
    " REFERENCING OLD TABLE AS old_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION instance_totals_on_delete()",
    "CREATE TRIGGER instance_totals_update AFTER UPDATE ON instances"
    " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION instance_totals_on_update()",
    "CREATE FUNCTION instance_totals_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$"
    " BEGIN DELETE FROM instance_totals; RETURN NULL; END $$",
    "CREATE TRIGGER instance_totals_truncate AFTER TRUNCATE ON instances"
    " FOR EACH STATEMENT EXECUTE FUNCTION instance_totals_on_truncate()",
)

# SQLite: row triggers on row 0 (``INSERT OR REPLACE`` would delete without the delete trigger
# unless recursive_triggers is on: the code never uses it on instances).
_SQLITE_UPSERT = (
    "INSERT INTO instance_totals (shard, instances, size_bytes) VALUES (0, {n}, {b})"
    " ON CONFLICT (shard) DO UPDATE SET instances = instances + excluded.instances,"
    " size_bytes = size_bytes + excluded.size_bytes;"
)
_SQLITE_TRIGGERS = (
    "CREATE TRIGGER instance_totals_insert AFTER INSERT ON instances BEGIN "
    + _SQLITE_UPSERT.format(n="1", b="NEW.size_bytes") + " END",
    "CREATE TRIGGER instance_totals_delete AFTER DELETE ON instances BEGIN "
    + _SQLITE_UPSERT.format(n="-1", b="-OLD.size_bytes") + " END",
    "CREATE TRIGGER instance_totals_update AFTER UPDATE OF size_bytes ON instances"
    " WHEN NEW.size_bytes IS NOT OLD.size_bytes BEGIN "
    + _SQLITE_UPSERT.format(n="0", b="NEW.size_bytes - OLD.size_bytes") + " END",
)
_TRIGGERS = ('instance_totals_insert', 'instance_totals_delete', 'instance_totals_update',
             'instance_totals_truncate')


def upgrade() -> None:
    """Create the totals table and its triggers, then seed it from one count."""
    op.create_table(
        'instance_totals',
        sa.Column('shard', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('instances', sa.BigInteger(), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('shard'),
    )
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        # Writers wait from here to the commit: none is missed between the seed and the
        # triggers, none counted twice.
        op.execute("LOCK TABLE instances IN SHARE ROW EXCLUSIVE MODE")
        for name, body in _PG_FUNCTIONS.items():
            op.execute(_PG_FUNCTION.format(name=name, body=body))
        for statement in _PG_TRIGGERS:
            op.execute(statement)
    else:
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)
    # Shard 0 is never a server process id.
    op.execute(
        "INSERT INTO instance_totals (shard, instances, size_bytes)"
        " SELECT 0, count(*), coalesce(sum(size_bytes), 0) FROM instances"
    )


def downgrade() -> None:
    """Drop the triggers, their functions and the table."""
    bind = op.get_bind()
    for name in _TRIGGERS:
        if bind.dialect.name == 'postgresql':
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON instances")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    if bind.dialect.name == 'postgresql':
        for name in (*_PG_FUNCTIONS, 'instance_totals_on_truncate'):
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    op.drop_table('instance_totals')
