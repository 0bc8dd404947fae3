"""The audit trail: ``audit``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from dicom_ai.cli._common import (
    ConfigOption,
    _emit,
    _print_json,
    command_context,
)


def _since(text: str) -> Any:
    """``--since``: an ISO date or date-time (UTC if no zone), or an age like 30m, 12h, 7d."""
    import re
    from datetime import UTC, datetime, timedelta

    age = re.fullmatch(r"(\d+)([mhd])", text.strip())
    if age is not None:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[age.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(age.group(1))})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter("an ISO date or date-time, or an age like 30m, 12h, 7d") \
            from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def audit(
    since: Annotated[str | None, typer.Option(help="Only events at or after this: ISO date or "
                                              "date-time (UTC if no zone), or 30m, 12h, 7d.")]
    = None,
    study: Annotated[str | None, typer.Option(help="Only events about this "
                                              "StudyInstanceUID.")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action (e.g. query.find), or "
                                               "a prefix ending in '.' (association.).")]
    = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest N events.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    config: ConfigOption = None,
) -> None:
    """Show the audit trail: who (AE title, API key id) did what to which UIDs, and when.

    Events are printed oldest first; they name UIDs, AE titles, hosts and counts, never
    patient data.
    """
    from storage import audit as audit_rows

    events: list[Any] = []
    after = None
    with command_context(config) as ctx:
        _ = ctx.settings  # a bad config is reported before a bad --since
        start = _since(since) if since else None
        with ctx.db.sessions() as session:
            while len(events) < limit:
                page = audit_rows.list_events(session, after=after, limit=min(500, limit),
                                              action=action, study_instance_uid=study,
                                              since=start)
                events.extend(page[:limit - len(events)])
                if len(page) < min(500, limit):
                    break
                after = page[-1].id
    events.reverse()
    if as_json:
        from dicom_ai.views import audit_view

        _print_json([audit_view(e) for e in events])
        return
    table = Table("Time (UTC)", "Actor", "Peer", "Action", "StudyInstanceUID", "Detail")
    for e in events:
        table.add_row(e.at.strftime("%Y-%m-%d %H:%M:%S"), e.actor, e.peer or "", e.action,
                      e.study_instance_uid or "",
                      json.dumps(e.detail, sort_keys=True, separators=(",", ":")))
    _emit(table)

