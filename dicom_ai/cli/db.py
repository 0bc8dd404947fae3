"""Index maintenance: ``db upgrade``, ``db reconcile``, ``purge`` (the [retention] policy)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from dicom_ai.cli._common import (
    ConfigOption,
    _emit,
    command_context,
    console,
)


def db_upgrade(config: ConfigOption = None) -> None:
    """Apply pending schema migrations."""
    with command_context(config) as ctx:
        _ = ctx.db  # opening the index applies them
    typer.echo("database is up to date")


def db_reconcile(config: ConfigOption = None) -> None:
    """Make the index agree with the store (index orphan files, drop rows without files).

    Run it while the service is stopped or running; it is idempotent.
    """
    from dicom_ai.ingest.recovery import reconcile

    with command_context(config) as ctx:
        indexed, removed, quarantined = reconcile(
            ctx.settings.storage.file_store(), ctx.db,
            max_inflated_bytes=ctx.settings.limits.max_inflated_bytes)
    typer.echo(f"indexed {indexed} file(s), removed {removed} row(s), "
               f"quarantined {quarantined} file(s)")


def purge(
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what the [retention] "
                                          "policy would remove.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Apply the [retention] policy now: delete delivered studies' instances and old results.

    Nothing that is not yet processed and delivered is ever deleted.
    """
    from dicom_ai import retention

    with command_context(config) as ctx:
        settings = ctx.settings
        if not settings.retention.enabled:
            console.print("no \\[retention] policy is set (instances_days, results_days, "
                          "max_store_bytes): nothing to remove")
        outcome = retention.plan(ctx.db, settings.retention)
        if not dry_run:
            outcome = retention.apply(outcome, settings.storage.file_store(), ctx.db)
    if as_json:
        typer.echo(json.dumps(outcome.to_dict(), indent=2))
        return
    if outcome.studies:
        table = Table("StudyInstanceUID", "Delivered", "Instances", "Bytes", "Why")
        for s in outcome.studies:
            table.add_row(s.study_instance_uid, s.delivered_at.strftime("%Y-%m-%d %H:%M:%S"),
                          str(s.instances), str(s.size_bytes),
                          "age" if s.reason == "age" else "store cap")
        _emit(table)
    for line in retention.describe(outcome):
        typer.echo(line)

