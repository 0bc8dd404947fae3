"""Query/retrieve batch jobs: ``batch run``, ``resume``, ``status``, ``report``, ``list``,
``export``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dicom_ai.cli._common import (
    AfterOption,
    CommandContext,
    ConfigOption,
    LimitOption,
    _emit,
    _fail,
    _page,
    _print_json,
    command_context,
    console,
)

# What to find on the source (``batch run`` and ``batch export``).
AccessionsOption = Annotated[Path | None, typer.Option(
    "--accessions", exists=True, help="CSV with an AccessionNumber column.")]
StudyDateOption = Annotated[str | None, typer.Option(
    "--study-date", help="YYYYMMDD-YYYYMMDD (or one day, or an open range).")]
ModalityOption = Annotated[str | None, typer.Option(help="ModalitiesInStudy to match.")]
QueryOption = Annotated[list[str] | None, typer.Option(
    "--query", help="Extra C-FIND key, KEY=VALUE (repeatable).")]


def _batch_query(accessions: Path | None, study_date: str | None, modality: str | None,
                 query: list[str] | None) -> Any:
    """The query of ``batch run``/``export`` (a bad CSV raises DicomAIError: called within the
    command context)."""
    from dicom_ai.batch.run import BatchQuery, read_accessions

    if (accessions is None) == (study_date is None):
        raise _fail(ValueError("give exactly one of --accessions CSV or --study-date RANGE"))
    keys: list[tuple[str, str]] = []
    for item in query or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(ValueError(f"--query {item!r} is not KEY=VALUE"))
        keys.append((key.strip(), value))
    found = read_accessions(accessions) if accessions is not None else ()
    return BatchQuery(accessions=found, study_date=study_date, modality=modality,
                      keys=tuple(keys))


def _follow(runner: Any, batch_id: int, *, wait_processing: bool,
            timeout: float | None) -> Any:
    """Run a batch with a progress bar; Ctrl-C stops it resumably (within the command context:
    a DicomAIError is its error exit)."""
    import signal
    import threading

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    columns = (TextColumn("batch {task.fields[batch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("found {task.fields[found]} retrieved {task.fields[retrieved]} "
                          "processed {task.fields[processed]} failed {task.fields[failed]} "
                          "{task.fields[status]}"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("batch", total=None, batch=batch_id, found=0, retrieved=0,
                                processed=0, failed=0, status="")

            def show(counts: Any) -> None:
                done = counts.processed + counts.failed
                bar.update(task, total=counts.found or None, completed=done,
                           found=counts.found, retrieved=counts.retrieved,
                           processed=counts.processed, failed=counts.failed,
                           status=counts.status)

            counts = runner.run(batch_id, progress=show, stop=stop,
                                wait_processing=wait_processing, timeout=timeout)
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.is_set():
        console.print(f"interrupted: resume with `dicom-ai batch resume {batch_id}`")
    return counts


def _batch_runner(ctx: CommandContext, source: str) -> Any:
    from dicom_ai.batch.run import BatchRunner

    return BatchRunner(ctx.settings, ctx.db, source)


def _batch(ctx: CommandContext, batch_id: int) -> Any:
    """The batch row ``batch_id`` (read, then detached); a missing one is an error exit."""
    from storage import batches

    with ctx.db.sessions() as session:
        batch = batches.get_batch(session, batch_id)
    if batch is None:
        raise _fail(ValueError(f"no batch {batch_id}"))
    return batch


def _totals(batch_id: int, counts: Any) -> None:
    """Print a followed batch's totals (one JSON line); exit 1 unless it finished with no
    failure."""
    typer.echo(json.dumps({"batch": batch_id, "found": counts.found,
                           "retrieved": counts.retrieved, "processed": counts.processed,
                           "failed": counts.failed}))
    if not counts.finished or counts.failed:
        raise typer.Exit(1)


def batch_run(
    source: Annotated[str, typer.Option("--source", help="A [[sources]] name.")],
    config: ConfigOption = None,
    accessions: AccessionsOption = None,
    study_date: StudyDateOption = None,
    modality: ModalityOption = None,
    query: QueryOption = None,
    route: Annotated[str | None, typer.Option(help="Process with this route only.")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Stop waiting for processing after this many seconds.")] = None,
) -> None:
    """Find studies on a source, retrieve them into the running service and follow processing.

    Needs `dicom-ai serve` running with the same config (it receives C-MOVE and runs models).
    """
    with command_context(config) as ctx:
        runner = _batch_runner(ctx, source)
        batch_id = runner.create(_batch_query(accessions, study_date, modality, query),
                                 route=route)
        console.print(f"batch {batch_id} on {source}")
        counts = _follow(runner, batch_id, wait_processing=True, timeout=timeout)
    _totals(batch_id, counts)


def batch_resume(
    batch_id: Annotated[int, typer.Argument(help="The batch id.")],
    config: ConfigOption = None,
    timeout: Annotated[float | None, typer.Option(
        help="Stop waiting for processing after this many seconds.")] = None,
) -> None:
    """Continue an interrupted batch: what was retrieved is not fetched again."""
    with command_context(config) as ctx:
        batch = _batch(ctx, batch_id)
        counts = _follow(_batch_runner(ctx, batch.source), batch_id,
                         wait_processing=batch.kind == "run", timeout=timeout)
    _totals(batch_id, counts)


def batch_status(
    batch_id: Annotated[int, typer.Argument(help="The batch id.")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object (the API's "
                                          "batch detail, with the report's totals).")] = False,
) -> None:
    """A batch's state, its studies by retrieve state and the totals of its report."""
    from dicom_ai.batch.run import report_rows, summarize
    from dicom_ai.views import BatchStatusView, BatchTotalsView, batch_view
    from storage import batches

    with command_context(config) as ctx:
        batch = _batch(ctx, batch_id)
        totals = BatchTotalsView(**summarize(report_rows(ctx.db, batch_id)))
        with ctx.db.sessions() as session:
            counts = batches.batch_study_counts(session, batch_id)
    shown = BatchStatusView(**dict(batch_view(batch)), studies=counts, totals=totals)
    if as_json:
        _print_json(shown)
        return
    table = Table("batch", "kind", "source", "route", "state", "found", "retrieved",
                  "processed", "failed", "SR delivered")
    table.add_row(str(shown.id), shown.kind, shown.source, shown.route or "", shown.state,
                  str(totals.studies), str(totals.retrieved), str(totals.processed),
                  str(totals.failed), str(totals.sr_delivered))
    _emit(table)
    if shown.error:
        typer.echo(f"error: {shown.error}")


def batch_report(
    batch_id: Annotated[int, typer.Argument(help="The batch id.")],
    out: Annotated[Path, typer.Option("--out", help="report.csv or report.html")],
    config: ConfigOption = None,
) -> None:
    """Write a per-study report: retrieved instances, findings, SR delivered, errors."""
    from dicom_ai.batch.run import report_rows, write_report

    with command_context(config) as ctx:
        path = write_report(report_rows(ctx.db, batch_id), out)
    typer.echo(str(path))


def batch_list(
    config: ConfigOption = None,
    limit: LimitOption = 50,
    after: AfterOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (the API's batch "
                                          "objects).")] = False,
) -> None:
    """Batches, newest first (one page)."""
    from dicom_ai.views import batch_view
    from storage import batches

    with command_context(config) as ctx, ctx.db.sessions() as session:
        rows = [batch_view(b) for b in batches.list_batches(session, limit=limit, after=after)]
    if _page(rows, limit, as_json):
        return
    table = Table("batch", "kind", "source", "route", "state", "created (UTC)")
    for b in rows:
        table.add_row(str(b.id), b.kind, b.source, b.route or "", b.state,
                      b.created_at.isoformat() if b.created_at else "")
    _emit(table)


def batch_export(
    source: Annotated[str, typer.Option("--source", help="A [[sources]] name.")],
    labels: Annotated[Path, typer.Option("--labels", exists=True, help="CSV: label (0/1) "
                                         "and AccessionNumber or StudyInstanceUID.")],
    out: Annotated[Path, typer.Option("--out", help="Export folder (new or empty).")],
    config: ConfigOption = None,
    accessions: AccessionsOption = None,
    study_date: StudyDateOption = None,
    modality: ModalityOption = None,
    query: QueryOption = None,
    profile: Annotated[str, typer.Option(help="De-identification profile (basic: PS3.15 "
                                         "Basic Application Level Confidentiality).")]
    = "basic",
    mapping: Annotated[Path | None, typer.Option(
        "--mapping", help="Where the re-identification mapping goes (outside --out; default "
        "OUT.reidentify.json beside it).")] = None,
) -> None:
    """Retrieve studies and write a de-identified training set that `dicom-ai train` reads."""
    from dicom_ai.batch.export import export_training_set

    if profile != "basic":
        raise _fail(ValueError(f"unknown profile {profile!r}: only 'basic' exists"))
    with command_context(config) as ctx:
        runner = _batch_runner(ctx, source)
        batch_id = runner.create(_batch_query(accessions, study_date, modality, query),
                                 kind="export")
        console.print(f"export batch {batch_id} on {source}")
        counts = _follow(runner, batch_id, wait_processing=False, timeout=None)
        if counts.retrieved == 0:
            raise _fail(ValueError(f"nothing retrieved ({counts.found} found, "
                                   f"{counts.failed} failed)"))
        target = mapping or out.resolve().parent / f"{out.resolve().name}.reidentify.json"
        report = export_training_set(ctx.db, ctx.settings.storage.file_store(), batch_id,
                                     labels, out, target)
    typer.echo(json.dumps({"batch": batch_id, "out": str(report.out),
                           "studies": report.studies, "instances": report.instances,
                           "excluded": dict(report.excluded),
                           "unlabelled_studies": report.unlabelled_studies,
                           "mapping": str(report.mapping)}, indent=2))

