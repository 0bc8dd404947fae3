"""Keyset pagination, shared by every list reader of :mod:`storage`, and rows of a page's keys.

Every list is ``WHERE <filters> AND id > :after ORDER BY id LIMIT :limit`` (or ``id <`` with
``ORDER BY id DESC``, newest first). Equality filters have an index ending in ``id`` (see the
indexes at the end of :mod:`storage.models`), so a page is one index range scan whatever the
table size. The CLI (``--limit``/``--after``) and the HTTP API (``?limit=``/``?after=``) page
through the same readers. What a page shows of other tables (the routing decisions of a page of
studies, the deliveries of a job's results) is read for the page's keys only (:func:`grouped`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, TypeVar, TypeVarTuple

from sqlalchemy import Select, inspect, select
from sqlalchemy.orm import InstrumentedAttribute, Session

Order = Literal["asc", "desc"]
MAX_LIMIT = 500
#: The largest row id: ids are INTEGER columns (32-bit on PostgreSQL, 64-bit on SQLite), so a
#: larger id or cursor cannot exist; the API refuses it (422) before it reaches the database,
#: where it would raise (integer out of range, or OverflowError in the SQLite driver).
MAX_ID = 2**31 - 1
_Ts = TypeVarTuple("_Ts")
_K = TypeVar("_K")
_E = TypeVar("_E")


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


def grouped(session: Session, entity: type[_E], column: InstrumentedAttribute[_K],
            keys: Iterable[_K]) -> dict[_K, list[_E]]:
    """The rows of `entity` whose `column` is one of `keys`, by key, oldest (lowest id) first.

    Parameters
    ----------
    session : Session
        An open session.
    entity : type
        A mapped class, e.g. :class:`storage.models.OutboxItem`.
    column : InstrumentedAttribute
        Its indexed column the keys are values of, e.g. ``OutboxItem.result_id``.
    keys : iterable
        The keys of one page (a bounded list).

    Returns
    -------
    dict
        ``key -> rows``; every key given is a key, with an empty list when no row has it.
    """
    found: dict[_K, list[_E]] = {key: [] for key in keys}
    if not found:
        return found
    rows = session.scalars(select(entity).where(column.in_(list(found)))
                           .order_by(*inspect(entity).primary_key)).all()
    for row in rows:
        found[getattr(row, column.key)].append(row)
    return found
