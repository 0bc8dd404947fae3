"""Keyset pagination, shared by every list reader of :mod:`storage`.

Every list is ``WHERE <filters> AND id > :after ORDER BY id LIMIT :limit`` (or ``id <`` with
``ORDER BY id DESC``, newest first). Equality filters have an index ending in ``id`` (see the
indexes at the end of :mod:`storage.models`), so a page is one index range scan whatever the
table size. The CLI (``--limit``/``--after``) and the HTTP API (``?limit=``/``?after=``) page
through the same readers.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVarTuple

from sqlalchemy import Select

Order = Literal["asc", "desc"]
MAX_LIMIT = 500
#: The largest row id: ids are INTEGER columns (32-bit on PostgreSQL, 64-bit on SQLite), so a
#: larger id or cursor cannot exist; the API refuses it (422) before it reaches the database,
#: where it would raise (integer out of range, or OverflowError in the SQLite driver).
MAX_ID = 2**31 - 1
_Ts = TypeVarTuple("_Ts")


def keyset(query: Select[*_Ts], column: Any, after: int | None, limit: int,
           order: Order) -> Select[*_Ts]:
    """Apply the cursor, the order and the limit (clamped to 1..MAX_LIMIT).

    Parameters
    ----------
    query : Select
        The filtered query.
    column : column
        The id column the cursor is on.
    after : int, optional
        The last id of the previous page.
    limit : int
        Page size.
    order : {"asc", "desc"}
        By id; ``desc`` is newest first.

    Returns
    -------
    Select
        The query of one page.
    """
    if after is not None:
        query = query.where(column > after if order == "asc" else column < after)
    query = query.order_by(column.asc() if order == "asc" else column.desc())
    return query.limit(max(1, min(limit, MAX_LIMIT)))
