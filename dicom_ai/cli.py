"""The ``dicom-ai`` command line."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dicom_ai import __version__
from dicom_ai.config import Settings, load_settings
from dicom_ai.exceptions import DicomAIError
from dicom_ai.logs import setup_logging

app = typer.Typer(help="dicom-ai: a DICOM-native PACS integration service for imaging AI.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Index database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (else DICOM_AI_CONFIG, else defaults).",
                 envvar="DICOM_AI_CONFIG"),
]


def _settings(config: Path | None) -> Settings:
    try:
        settings = load_settings(config)
    except DicomAIError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    setup_logging(settings.logging)
    return settings


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def serve(
    config: ConfigOption = None,
    receivers: Annotated[int | None, typer.Option(help="Receiver processes (overrides "
                                                  "dicom.receivers).")] = None,
) -> None:
    """Run the receiver (C-ECHO, C-STORE, MPPS) and the completion monitor until stopped."""
    from dicom_ai.service import Service

    settings = _settings(config)
    if receivers is not None:
        settings = settings.model_copy(
            update={"dicom": settings.dicom.model_copy(update={"receivers": receivers})}
        )
    try:
        Service(settings).run_forever()
    except DicomAIError as exc:
        raise _fail(exc) from None


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


@app.command()
def studies(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List received studies with their completion state."""
    from storage import repository
    from storage.db import Database

    settings = _settings(config)
    db = Database(settings.storage.url)
    db.upgrade()
    with db.sessions() as session:
        rows = repository.list_studies(session)
    db.dispose()
    if as_json:
        typer.echo(json.dumps([
            {
                "StudyInstanceUID": s.study_instance_uid,
                "AccessionNumber": s.accession_number,
                "StudyDate": s.study_date,
                "state": s.state,
                "instances": s.instances,
                "series": s.series,
                "modalities": s.modalities,
                "first_received_at": _iso(s.first_received_at),
                "last_received_at": _iso(s.last_received_at),
                "completed_at": _iso(s.completed_at),
                "completion_reason": s.completion_reason,
            }
            for s in rows
        ], indent=2))
        return
    table = Table("StudyInstanceUID", "Accession", "Modalities", "Series", "Instances", "State",
                  "Last received")
    for s in rows:
        table.add_row(s.study_instance_uid, s.accession_number, ",".join(s.modalities),
                      str(s.series), str(s.instances), s.state,
                      s.last_received_at.strftime("%Y-%m-%d %H:%M:%S") if s.last_received_at
                      else "")
    Console().print(table)


@app.command()
def echo(
    to: Annotated[str, typer.Option("--to", help="Destination name or AET@HOST:PORT.")],
    config: ConfigOption = None,
) -> None:
    """Send a C-ECHO (verify a DICOM node is reachable)."""
    from dicom_ai.network.scu import echo as send_echo
    from dicom_ai.network.scu import resolve_peer

    settings = _settings(config)
    try:
        status = send_echo(resolve_peer(to, settings), settings.dicom)
    except DicomAIError as exc:
        raise _fail(exc) from None
    typer.echo(f"C-ECHO status 0x{status:04X}")
    if status != 0:
        raise typer.Exit(1)


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to send.", exists=True)],
    to: Annotated[str, typer.Option("--to", help="Destination name or AET@HOST:PORT.")],
    config: ConfigOption = None,
) -> None:
    """C-STORE files and folders, each in its own transfer syntax, with a status summary."""
    from dicom_ai.network.scu import FileToSend, inspect, iter_files, resolve_peer, send_files

    settings = _settings(config)
    try:
        peer = resolve_peer(to, settings)
    except DicomAIError as exc:
        raise _fail(exc) from None
    files: list[FileToSend] = []
    skipped: list[Path] = []
    for found in iter_files(paths):
        item = inspect(found)
        if item is None:
            skipped.append(found)
        else:
            files.append(item)
    with Progress(TextColumn("sending"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("send", total=len(files))
        report = send_files(files, peer, settings.dicom,
                            progress=lambda *_: bar.advance(task))
    summary = Table("status", "files")
    for category in ("success", "warning", "failure"):
        summary.add_row(category, str(report.statuses.get(category, 0)))
    summary.add_row("skipped (not DICOM)", str(len(skipped)))
    console.print(summary)
    for failed, detail in report.failures[:50]:
        console.print(f"[red]failed[/red] {failed}: {detail}")
    if len(report.failures) > 50:
        console.print(f"... and {len(report.failures) - 50} more failures")
    if not report.ok or not files:
        raise typer.Exit(1)


@app.command()
def preview(
    target: Annotated[Path, typer.Argument(help="A DICOM file or a series folder.",
                                           exists=True)],
    model: Annotated[str, typer.Option("--model", help="A preprocessing spec file (TOML or "
                                       "JSON) until the model registry lands.")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")],
) -> None:
    """Write the exact preprocessed input a model would get (a montage for volumes)."""
    from dicom_ai.pipeline.preview import load_spec
    from dicom_ai.pipeline.preview import preview as make_preview

    try:
        steps = make_preview(target, load_spec(Path(model)), out)
    except DicomAIError as exc:
        raise _fail(exc) from None
    for step in steps:
        typer.echo(step)
    typer.echo(f"wrote {out}")


class SynthModality(StrEnum):
    """Modalities `synth` can make."""

    CR = "CR"
    DX = "DX"
    CT = "CT"
    MR = "MR"


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    studies: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 10,
    seed: Annotated[int, typer.Option(help="Same seed, same studies (byte-identical).")] = 0,
    modality: Annotated[SynthModality, typer.Option(help="CR, DX, CT or MR.")] = SynthModality.CR,
    positive_fraction: Annotated[float, typer.Option(
        "--positive-fraction", min=0.0, max=1.0, help="Share of studies with lesions.")] = 0.5,
    difficulty: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Higher: smaller, fainter lesions.")] = 0.5,
    compress: Annotated[bool, typer.Option(help="Compress some studies (RLE, JPEG 2000, "
                                           "JPEG-LS).")] = True,
) -> None:
    """Write synthetic phantom studies with ground truth (labels.csv and lesion masks)."""
    from dicom_ai.training.synth import synthesize

    report = synthesize(out, studies=studies, seed=seed, modality=modality.value,
                        positive_fraction=positive_fraction, difficulty=difficulty,
                        compress=compress)
    typer.echo(f"wrote {report.studies} {modality.value} studies ({report.instances} instances, "
               f"{report.positives} positive, {report.lesions} lesions) to {report.out}")
    typer.echo(f"labels: {report.labels_csv}")
    for line in report.fallbacks:
        typer.echo(f"note: {line}")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply pending schema migrations."""
    from storage.db import Database

    db = Database(_settings(config).storage.url)
    db.upgrade()
    db.dispose()
    typer.echo("database is up to date")


@db_app.command("reconcile")
def db_reconcile(config: ConfigOption = None) -> None:
    """Make the index agree with the store (index orphan files, drop rows without files).

    Run it while the service is stopped or running; it is idempotent.
    """
    from dicom_ai.ingest.recovery import reconcile
    from storage.db import Database
    from storage.filestore import FileStore

    settings = _settings(config)
    db = Database(settings.storage.url)
    db.upgrade()
    indexed, removed, quarantined = reconcile(FileStore(settings.storage.root), db)
    db.dispose()
    typer.echo(f"indexed {indexed} file(s), removed {removed} row(s), "
               f"quarantined {quarantined} file(s)")


if __name__ == "__main__":  # pragma: no cover
    app()
