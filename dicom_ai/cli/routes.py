"""Routing rules: ``routes test``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dicom_ai.cli._common import (
    ConfigOption,
    _emit,
    command_context,
)


def routes_test(
    target: Annotated[Path, typer.Argument(help="A DICOM file or a folder.", exists=True)],
    config: ConfigOption = None,
    calling_aet: Annotated[str, typer.Option("--calling-aet", help="The sender's AE title to "
                                             "match CallingAETitle against.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show which [[routes]] each series under TARGET matches, and why (key by key)."""
    from pydicom.filereader import dcmread

    from dicom_ai.network.scu import inspect, iter_files
    from dicom_ai.routing import evaluate_file

    seen: set[str] = set()
    report: list[dict[str, Any]] = []
    with command_context(config) as ctx:
        routes = [(r.name, dict(r.match)) for r in ctx.settings.routes]
        models = {r.name: r.model for r in ctx.settings.routes}
        for path in iter_files([target]):
            if inspect(path) is None:  # not DICOM: skipped like `send` does
                continue
            series = str(dcmread(path, stop_before_pixels=True, specific_tags=[
                "SeriesInstanceUID"]).get("SeriesInstanceUID", path))
            if series in seen:
                continue
            seen.add(series)
            results = evaluate_file(routes, path, [calling_aet] if calling_aet else [])
            report.append({"file": str(path), "series_instance_uid": series, "routes": [
                {"route": r.route, "model": models[r.route], "matched": r.matched,
                 "reason": r.reason} for r in results]})
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table("series (first file)", "route", "model", "matches", "why")
    for item in report:
        if not item["routes"]:
            table.add_row(item["file"], "-", "-", "no", "no routes configured")
        for n, r in enumerate(item["routes"]):
            table.add_row(item["file"] if n == 0 else "", r["route"], r["model"],
                          "[green]yes[/green]" if r["matched"] else "no", r["reason"])
        if item["routes"] and not any(r["matched"] for r in item["routes"]):
            table.add_row("", "[yellow](none)[/yellow]", "", "", "unrouted: recorded, no job")
    _emit(table)

