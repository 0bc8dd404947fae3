"""DICOM network commands: ``echo`` (C-ECHO), ``send`` (C-STORE)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dicom_ai.cli._common import (
    ConfigOption,
    _emit,
    command_context,
    console,
)


def echo(
    to: Annotated[str, typer.Option("--to", help="Destination name or AET@HOST:PORT.")],
    config: ConfigOption = None,
) -> None:
    """Send a C-ECHO (verify a DICOM node is reachable)."""
    from dicom_ai.network.scu import echo as send_echo
    from dicom_ai.network.scu import resolve_peer

    with command_context(config) as ctx:
        status = send_echo(resolve_peer(to, ctx.settings), ctx.settings.dicom)
    typer.echo(f"C-ECHO status 0x{status:04X}")
    if status != 0:
        raise typer.Exit(1)


def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to send.", exists=True)],
    to: Annotated[str, typer.Option("--to", help="Destination name or AET@HOST:PORT.")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as a JSON "
                                          "object.")] = False,
) -> None:
    """C-STORE files and folders, each in its own transfer syntax, with a status summary.

    The request names each dataset's SOP Class and Instance UIDs (as dcmtk does); a file whose
    meta header names others is sent with a warning. The summary goes to stdout; warnings,
    failures and progress to stderr.
    """
    from dicom_ai.network.scu import FileToSend, inspect, iter_files, resolve_peer, send_files

    with command_context(config) as ctx:
        settings = ctx.settings
        peer = resolve_peer(to, settings)
    files: list[FileToSend] = []
    skipped: list[Path] = []
    for found in iter_files(paths):
        item = inspect(found)
        if item is None:
            skipped.append(found)
        else:
            files.append(item)
            if item.meta_differs:
                console.print(f"[yellow]warning:[/yellow] {found}: the file meta names other "
                              "SOP UIDs than the dataset; sending the dataset's "
                              f"(SOP Instance UID {item.sop_instance_uid})",
                              highlight=False, soft_wrap=True)
    with Progress(TextColumn("sending"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("send", total=len(files))
        report = send_files(files, peer, settings.dicom,
                            progress=lambda *_: bar.advance(task))
    counts = {category: report.statuses.get(category, 0)
              for category in ("success", "warning", "failure")}
    if as_json:
        typer.echo(json.dumps({**counts, "skipped": len(skipped),
                               "meta_differs": sum(f.meta_differs for f in files),
                               "failures": [{"file": f, "detail": d}
                                            for f, d in report.failures]}, indent=2))
    else:
        summary = Table("status", "files")
        for category, n in counts.items():
            summary.add_row(category, str(n))
        summary.add_row("skipped (not DICOM)", str(len(skipped)))
        _emit(summary)
        for failed, detail in report.failures[:50]:
            console.print(f"[red]failed[/red] {failed}: {detail}", highlight=False)
        if len(report.failures) > 50:
            console.print(f"... and {len(report.failures) - 50} more failures")
    if not report.ok or not files:
        raise typer.Exit(1)

