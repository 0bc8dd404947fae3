"""The ``dicom-ai`` command line."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.errors import MarkupError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from dicom_ai import __version__
from dicom_ai.config import Settings, load_settings
from dicom_ai.exceptions import DicomAIError
from dicom_ai.logs import setup_logging

if TYPE_CHECKING:  # the index is opened lazily: `version` and `--help` stay fast
    from storage.db import Database

app = typer.Typer(help="dicom-ai: a DICOM-native PACS integration service for imaging AI.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Index database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
models_app = typer.Typer(help="The model registry: list, add, activate, show.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
batch_app = typer.Typer(help="Query/retrieve batch jobs over an archive: run, resume, status, "
                        "report, list, export.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")
routes_app = typer.Typer(help="Routing rules: see which routes a file matches and why.",
                         no_args_is_help=True)
app.add_typer(routes_app, name="routes")
apikeys_app = typer.Typer(help="API keys of the HTTP API: create, list, revoke.",
                          no_args_is_help=True)
app.add_typer(apikeys_app, name="apikeys")
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


def _database(settings: Settings) -> Database:
    """The index database of `settings`, migrated to the current schema."""
    from storage.db import Database

    db = Database(settings.storage.url)
    db.upgrade()
    return db


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
    no_workers: Annotated[bool, typer.Option("--no-workers", help="Run no local worker "
                                             "processes (jobs wait for `dicom-ai worker`).")]
    = False,
) -> None:
    """Run the service: receiver, completion, routing, workers, result outbox, until stopped."""
    from dicom_ai.service import Service

    settings = _settings(config)
    if receivers is not None:
        settings = settings.model_copy(
            update={"dicom": settings.dicom.model_copy(update={"receivers": receivers})}
        )
    if no_workers:
        settings = settings.model_copy(
            update={"workers": settings.workers.model_copy(update={"processes": 0})}
        )
    try:
        Service(settings).run_forever()
    except DicomAIError as exc:
        raise _fail(exc) from None


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _cell_text(cell: Any) -> str:
    """A table cell's plain text (its markup removed)."""
    if isinstance(cell, Text):
        return cell.plain
    try:
        return Text.from_markup(str(cell)).plain
    except MarkupError:
        return str(cell)


def _emit(table: Table) -> None:
    """Print a listing on stdout, never truncated.

    On a terminal: the rich table, long values folded onto more lines instead of cut with an
    ellipsis. Otherwise (piped, redirected, captured): a header line and one line per row,
    tab-separated, full values (tabs and line breaks inside a value become spaces).
    """
    out = Console()
    if out.is_terminal:
        for column in table.columns:
            column.overflow, column.no_wrap = "fold", False
        out.print(table)
        return
    columns = table.columns
    lines = ["\t".join(_cell_text(c.header) for c in columns)]
    cells = [list(c.cells) for c in columns]
    for row in range(table.row_count):
        lines.append("\t".join(
            " ".join(_cell_text(col[row]).split()) if row < len(col) else "" for col in cells))
    typer.echo("\n".join(lines))


@app.command()
def studies(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List received studies with their completion state."""
    from storage import repository

    settings = _settings(config)
    db = _database(settings)
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
    _emit(table)


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as a JSON "
                                          "object.")] = False,
) -> None:
    """C-STORE files and folders, each in its own transfer syntax, with a status summary.

    The request names each dataset's SOP Class and Instance UIDs (as dcmtk does); a file whose
    meta header names others is sent with a warning. The summary goes to stdout; warnings,
    failures and progress to stderr.
    """
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


@app.command()
def preview(
    target: Annotated[Path, typer.Argument(help="A DICOM file or a series folder.",
                                           exists=True)],
    model: Annotated[str, typer.Option("--model", help="A registered model name (NAME or "
                                       "NAME@VERSION), a model folder, or a preprocessing spec "
                                       "file (TOML or JSON).")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")],
    config: ConfigOption = None,
) -> None:
    """Write the exact preprocessed input a model would get (a montage for volumes)."""
    from dicom_ai.inference.spec import read_spec
    from dicom_ai.pipeline.preview import load_spec
    from dicom_ai.pipeline.preview import preview as make_preview

    try:
        candidate = Path(model)
        if candidate.is_dir():
            spec = read_spec(candidate).preprocessing
        elif candidate.is_file():
            spec = load_spec(candidate)
        else:
            spec = _model_folder(model, config)[1].preprocessing
        steps = make_preview(target, spec, out, limits=_settings(config).limits)
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

    settings = _settings(config)
    db = _database(settings)
    indexed, removed, quarantined = reconcile(
        settings.storage.file_store(), db,
        max_inflated_bytes=settings.limits.max_inflated_bytes)
    db.dispose()
    typer.echo(f"indexed {indexed} file(s), removed {removed} row(s), "
               f"quarantined {quarantined} file(s)")


@app.command()
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

    settings = _settings(config)
    if not settings.retention.enabled:
        console.print("no \\[retention] policy is set (instances_days, results_days, "
                      "max_store_bytes): nothing to remove")
    db = _database(settings)
    try:
        outcome = retention.plan(db, settings.retention)
        if not dry_run:
            outcome = retention.apply(outcome, settings.storage.file_store(), db)
    finally:
        db.dispose()
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


# -- models -------------------------------------------------------------------------------------
def _registry(config: Path | None) -> Any:
    from dicom_ai.inference.registry import Registry

    return Registry(_settings(config).storage.root / "models")


def _model_folder(model: str, config: Path | None) -> tuple[Path, Any]:
    """A model folder and its spec from a folder path or a registered NAME[@VERSION]."""
    from dicom_ai.inference.spec import read_spec

    candidate = Path(model)
    if candidate.is_dir():
        return candidate, read_spec(candidate)
    name, _, version = model.partition("@")
    entry = _registry(config).get(name, version or None)
    return entry.path, entry.spec


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List every model version (the bundled default first) and which one is active."""
    try:
        entries = _registry(config).entries()
    except DicomAIError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps([e.summary() for e in entries], indent=2))
        return
    table = Table("name", "version", "task", "active", "backend", "applies to", "source")
    for e in entries:
        applies = "/".join(e.spec.modalities) or "any"
        if e.spec.body_parts:
            applies += " " + "/".join(e.spec.body_parts)
        table.add_row(e.name, e.version, e.spec.task, "yes" if e.active else "", e.spec.backend,
                      applies, "bundled" if e.bundled else "registry")
    _emit(table)


@models_app.command("add")
def models_add(
    path: Annotated[Path, typer.Argument(help="A model folder (spec.json + network).",
                                         exists=True, file_okay=False)],
    activate: Annotated[bool | None, typer.Option(
        "--activate/--no-activate", help="Make it active (default: only if none is).")] = None,
    config: ConfigOption = None,
) -> None:
    """Copy a model folder into the registry as NAME/VERSION."""
    try:
        entry = _registry(config).add(path, activate=activate)
    except DicomAIError as exc:
        raise _fail(exc) from None
    state = "active" if entry.active else "not active"
    typer.echo(f"added {entry.name} {entry.version} ({state})")


@models_app.command("activate")
def models_activate(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version to make active.")],
    config: ConfigOption = None,
) -> None:
    """Make VERSION the active version of NAME (what routes to NAME run)."""
    try:
        entry = _registry(config).activate(name, version)
    except DicomAIError as exc:
        raise _fail(exc) from None
    typer.echo(f"{entry.name} {entry.version} is active")


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="Model name (NAME or NAME@VERSION).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Show a model's spec (the active version unless one is named) and its versions."""
    from dicom_ai.inference.registry import network_sha256

    base, _, version = name.partition("@")
    try:
        registry = _registry(config)
        entry = registry.get(base, version or None)
        versions = registry.versions(base)
    except DicomAIError as exc:
        raise _fail(exc) from None
    shown = {
        **entry.summary(),
        "network_sha256": network_sha256(entry),
        "versions": [{"version": v.version, "active": v.active, "bundled": v.bundled}
                     for v in versions],
        "spec": json.loads(entry.spec.model_dump_json()),
    }
    typer.echo(json.dumps(shown, indent=2) if as_json else _describe_model(shown))


def _describe_model(shown: dict[str, Any]) -> str:
    spec = shown["spec"]
    prep = spec["preprocessing"]
    lines = [
        f"{shown['name']} {shown['version']} ({shown['task']}, {shown['backend']}"
        f"{', bundled' if shown['bundled'] else ''}{', active' if shown['active'] else ''})",
        f"  {spec['description']}" if spec["description"] else "",
        f"  input: {prep['input_shape'][0]}x{prep['input_shape'][1]}x{prep['channels']}, "
        f"window {prep['window'] or 'from the file'}, {prep['normalization']} normalisation",
        f"  applies to: {'/'.join(spec['modalities']) or 'any modality'}, "
        f"{'/'.join(spec['body_parts']) or 'any body part'}",
    ]
    for output in spec["outputs"]:
        finding = output["finding"]
        lines.append(f"  output {output['name']}: ({finding['value']}, {finding['scheme']}, "
                     f"\"{finding['meaning']}\") threshold {output['threshold']:.3f} "
                     f"({output['threshold_method']})")
    provenance = spec["provenance"]
    lines.append(f"  trained: {provenance['created']} by {provenance['code_version'] or '?'} on "
                 f"{provenance['training_data'] or '?'}")
    if provenance["metrics"]:
        lines.append("  metrics: " + ", ".join(f"{k} {v:.3f}"
                                               for k, v in provenance["metrics"].items()))
    lines.append(f"  network sha256: {shown['network_sha256']}")
    lines.append("  versions: " + ", ".join(
        v["version"] + (" (active)" if v["active"] else "") for v in shown["versions"]))
    return "\n".join(line for line in lines if line)


# -- training and evaluation --------------------------------------------------------------------
@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Folder of DICOM files.", exists=True,
                                       file_okay=False)],
    labels: Annotated[Path, typer.Option("--labels", help="Labels CSV (SOPInstanceUID, label, "
                                         "optional mask_path).", exists=True, dir_okay=False)],
    arch: Annotated[str, typer.Option("--arch", help="seed-cnn, synth-backbone, mobilenetv2, "
                                      "efficientnetb0, densenet121 or unet.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write.")],
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 10,
    augment: Annotated[str, typer.Option(help="'default', 'none' or key=value,... (rotation, "
                                         "width_shift, height_shift, shear, zoom, "
                                         "horizontal_flip, fill_mode).")] = "default",
    weights: Annotated[Path | None, typer.Option(
        "--weights", help="Backbone weights file (e.g. ImageNet weights you have, or the "
        "bundled synth-backbone weights).", exists=True, dir_okay=False)] = None,
    seed: Annotated[int, typer.Option(help="Random seed (split, initialisation, "
                                      "augmentation).")] = 0,
    name: Annotated[str | None, typer.Option(help="Model name (default: the --out folder's "
                                             "name).")] = None,
    model_version: Annotated[str | None, typer.Option("--version", help="Model version "
                                                      "(default: date-based).")] = None,
    input_size: Annotated[int, typer.Option("--input-size", min=16, help="Square input "
                                            "side.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    learning_rate: Annotated[float, typer.Option("--learning-rate", min=0.0)] = 1e-3,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.05, max=0.5)] = 0.2,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints.")] = False,
) -> None:
    """Train a model on labelled DICOM and write a registered-ready model folder."""
    from dicom_ai.training.augment import parse_augment
    from dicom_ai.training.train import TrainOptions
    from dicom_ai.training.train import train as run_training

    try:
        augmentation = parse_augment(augment)
    except ValueError as exc:
        raise _fail(exc) from None
    options = TrainOptions(
        data=data, labels=labels, arch=arch, out=out, name=name, version=model_version,
        epochs=epochs, batch_size=batch_size, augment=augmentation, backbone_weights=weights,
        seed=seed, val_fraction=val_fraction, input_size=input_size,
        learning_rate=learning_rate, resume=resume)
    try:
        result = run_training(options, say=typer.echo)
    except DicomAIError as exc:
        raise _fail(exc) from None
    typer.echo(f"done in {result.seconds:.0f} s; register it with: dicom-ai models add {out}")


@app.command()
def evaluate(
    model: Annotated[str, typer.Option("--model", help="A registered model (NAME or "
                                       "NAME@VERSION) or a model folder.")],
    data: Annotated[Path, typer.Option("--data", help="Folder of DICOM files.", exists=True,
                                       file_okay=False)],
    labels: Annotated[Path, typer.Option("--labels", help="Labels CSV.", exists=True,
                                         dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder: plots, "
                                             "metrics.json, model_card.md.")] = None,
    target_sensitivity: Annotated[float, typer.Option(
        "--target-sensitivity", min=0.0, max=1.0)] = 0.9,
    bootstrap: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the "
                                           "AUC CI.")] = 1000,
    config: ConfigOption = None,
) -> None:
    """Evaluate a model on labelled DICOM through the serving path."""
    from dicom_ai.training.evaluate import evaluate_model

    try:
        folder, _ = _model_folder(model, config)
        result = evaluate_model(folder, data, labels, out=out,
                                target_sensitivity=target_sensitivity, n_bootstrap=bootstrap,
                                say=None if as_json else typer.echo)
    except DicomAIError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(result, default=float))
        return
    for key, value in result.items():
        if isinstance(value, float):
            typer.echo(f"{key:34s} {value:.4f}")
        else:
            typer.echo(f"{key:34s} {value}")
    if out is not None:
        typer.echo(f"report: {out}")



@app.command()
def worker(
    config: ConfigOption = None,
    concurrency: Annotated[int | None, typer.Option(help="Worker processes (default "
                                                    "workers.processes).")] = None,
) -> None:
    """Run jobs from the Celery broker (workers.broker_url), keeping models loaded.

    On start, jobs left pending or whose worker's lease expired are dispatched again.
    """
    import os
    import socket

    from dicom_ai.dispatch.celery_backend import CeleryDispatcher
    from dicom_ai.dispatch.scheduler import Scheduler

    settings = _settings(config)
    db = _database(settings)
    dispatcher = CeleryDispatcher(settings)
    scheduler = Scheduler(settings, db, dispatcher)
    try:
        scheduler.tick()  # what was pending or orphaned before this worker started
    except Exception as exc:  # the broker may come up later: the loop keeps trying
        console.print(f"[yellow]warning:[/yellow] first dispatch failed: {exc}")
    scheduler.start()
    processes = concurrency or max(1, settings.workers.processes)
    dispatcher.app.worker_main([
        "worker", f"--concurrency={processes}", "--pool=prefork",
        f"--queues={settings.workers.queue}", f"--loglevel={settings.logging.level}",
        f"--hostname=dicom-ai-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip", "--without-mingle",
    ])
    scheduler.stop()
    db.dispose()


@routes_app.command("test")
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

    settings = _settings(config)
    routes = [(r.name, dict(r.match)) for r in settings.routes]
    models = {r.name: r.model for r in settings.routes}
    seen: set[str] = set()
    report: list[dict[str, Any]] = []
    for path in iter_files([target]):
        if inspect(path) is None:  # not DICOM: skipped like `send` does
            continue
        series = str(dcmread(path, stop_before_pixels=True, specific_tags=[
            "SeriesInstanceUID"]).get("SeriesInstanceUID", path))
        if series in seen:
            continue
        seen.add(series)
        try:
            results = evaluate_file(routes, path, [calling_aet] if calling_aet else [])
        except DicomAIError as exc:
            raise _fail(exc) from None
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


@app.command()
def jobs(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state (pending, "
                                              "running, done, failed).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List jobs with their state, attempts and last error."""
    from storage import jobs as job_rows

    settings = _settings(config)
    db = _database(settings)
    with db.sessions() as session:
        rows = job_rows.list_jobs(session, state=state, limit=limit)
    db.dispose()
    data = [{"id": j.id, "study_instance_uid": j.study_instance_uid, "route": j.route,
             "model": j.model_name, "model_version": j.model_version, "state": j.state,
             "attempts": j.attempts, "max_attempts": j.max_attempts, "error": j.error,
             "created_at": _iso(j.created_at), "finished_at": _iso(j.finished_at),
             "supersedes_job_id": j.supersedes_job_id, "timings": json.loads(j.timings)}
            for j in rows]
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table("id", "study", "route", "model", "state", "attempts", "error")
    for j in data:
        table.add_row(str(j["id"]), j["study_instance_uid"], j["route"],
                      f"{j['model']} {j['model_version'] or ''}", j["state"],
                      f"{j['attempts']}/{j['max_attempts']}", j["error"] or "")
    _emit(table)


@app.command()
def findings(
    study: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    config: ConfigOption = None,
    all_versions: Annotated[bool, typer.Option("--all", help="Include superseded findings.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """The findings of a study (current ones unless --all), how routing decided, and why a
    job gave no (or fewer) findings."""
    from storage import api_queries
    from storage import jobs as job_rows

    settings = _settings(config)
    db = _database(settings)
    with db.sessions() as session:
        rows = job_rows.findings_of_study(session, study, current_only=not all_versions)
        decisions = job_rows.decisions_of_study(session, study)
        # Why a study has no (or fewer) findings: its jobs' state and note (failed, not
        # applicable, series skipped by the model's scope).
        study_jobs: list[dict[str, Any]] = [
            {"id": j.id, "route": j.route, "state": j.state, "error": j.error}
            for j in api_queries.list_jobs(session, study_instance_uid=study, order="asc",
                                           limit=100)]
    db.dispose()
    data: list[dict[str, Any]] = [{"job_id": f.job_id, "sop_instance_uid": f.sop_instance_uid,
             "model": f.model_name, "model_version": f.model_version, "label": f.label,
             "finding": [f.code_value, f.code_scheme, f.code_meaning],
             "probability": f.probability, "threshold": f.threshold, "present": f.present,
             "location_kind": f.location_kind,
             "location": json.loads(f.location) if f.location else None,
             "heatmap_path": f.heatmap_path, "superseded_by_job_id": f.superseded_by_job_id,
             "ood_score": f.ood_score, "out_of_distribution": f.out_of_distribution}
            for f in rows]
    if as_json:
        typer.echo(json.dumps({"findings": data, "routing": [
            {"series_instance_uid": d.series_instance_uid, "route": d.route,
             "job_id": d.job_id, "reason": d.reason} for d in decisions],
            "jobs": study_jobs}, indent=2))
        return
    table = Table("job", "image", "model", "finding", "probability", "decision", "location")
    for f in data:
        table.add_row(str(f["job_id"]), f["sop_instance_uid"] or "(study or series)",
                      f"{f['model']} {f['model_version']}", f["finding"][2],
                      f"{f['probability']:.3f}", ("present" if f["present"] else "absent")
                      + (" (input outside training data)" if f["out_of_distribution"] else ""),
                      json.dumps(f["location"]) if f["location"] else "")
    _emit(table)
    # Part of the answer (stdout, whole lines): how routing decided, and the state of every
    # job that gave no (or fewer) findings.
    for d in decisions:
        typer.echo(f"series {d.series_instance_uid}: "
                   f"{'route ' + d.route if d.route else 'unrouted'} - {d.reason}")
    for j in study_jobs:
        if j["error"] or j["state"] != "done":
            typer.echo(f"job {j['id']} ({j['route']}): {j['state']}"
                       f"{' - ' + j['error'] if j['error'] else ''}")


@app.command()
def demo(
    studies: Annotated[int, typer.Option(min=1, max=50, help="Synthetic CR studies to push.")]
    = 4,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic studies.")] = 7,
    work: Annotated[Path | None, typer.Option(help="Keep everything in this folder (default: "
                                              "a new folder under /tmp).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the results.")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as a JSON "
                                          "object.")] = False,
) -> None:
    """Push synthetic studies through the whole loop and show the results a PACS received."""
    import tempfile

    from dicom_ai.config import LoggingSettings
    from dicom_ai.demo import run_demo
    from dicom_ai.logs import setup_logging as _setup

    _setup(LoggingSettings(level="WARNING"))
    folder = work or Path(tempfile.mkdtemp(prefix="dicom-ai-demo-"))
    console.print(f"demo: {studies} synthetic chest radiographs, stand-in PACS and service on "
                  f"loopback, work folder {folder}")
    result = run_demo(folder, studies=studies, seed=seed, timeout=timeout)
    if as_json:
        typer.echo(json.dumps({
            "complete": result.complete, "seconds": result.seconds,
            "work": str(result.work), "pacs_folder": str(result.pacs_folder),
            "studies": [{"StudyInstanceUID": s.study_instance_uid, "truth": s.truth,
                         "probability": s.probability, "present": s.present,
                         "agrees": s.agrees, "sr_path": str(s.sr_path) if s.sr_path else None,
                         "heatmap_paths": [str(p) for p in s.heatmap_paths]}
                        for s in result.studies]}, indent=2))
        if not result.complete:
            raise typer.Exit(1)
        return
    table = Table("study", "truth", "probability", "decision", "agrees", "SR received",
                  "heat-map SC")
    for s in result.studies:
        table.add_row(
            s.study_instance_uid, "nodule" if s.truth else "none",
            "" if s.probability is None else f"{s.probability:.3f}",
            "" if s.present is None else ("present" if s.present else "absent"),
            "" if s.agrees is None else ("yes" if s.agrees else "[red]no[/red]"),
            str(s.sr_path) if s.sr_path else "[red]missing[/red]",
            " ".join(str(p) for p in s.heatmap_paths))
    _emit(table)
    typer.echo(f"{sum(1 for s in result.studies if s.sr_path)} of {len(result.studies)} SRs "
               f"received by the stand-in PACS in {result.seconds:.1f} s "
               f"(results in {result.pacs_folder})")
    if not result.complete:
        raise typer.Exit(1)


def _batch_query(accessions: Path | None, study_date: str | None, modality: str | None,
                 query: list[str] | None) -> Any:
    from dicom_ai.batch.run import BatchQuery, read_accessions

    if (accessions is None) == (study_date is None):
        raise _fail(ValueError("give exactly one of --accessions CSV or --study-date RANGE"))
    keys: list[tuple[str, str]] = []
    for item in query or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(ValueError(f"--query {item!r} is not KEY=VALUE"))
        keys.append((key.strip(), value))
    try:
        found = read_accessions(accessions) if accessions is not None else ()
    except DicomAIError as exc:
        raise _fail(exc) from None
    return BatchQuery(accessions=found, study_date=study_date, modality=modality,
                      keys=tuple(keys))


def _follow(runner: Any, batch_id: int, *, wait_processing: bool,
            timeout: float | None) -> Any:
    """Run a batch with a progress bar; Ctrl-C stops it resumably."""
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
    except DicomAIError as exc:
        raise _fail(exc) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.is_set():
        console.print(f"interrupted: resume with `dicom-ai batch resume {batch_id}`")
    return counts


def _batch_runner(config: Path | None, source: str) -> tuple[Any, Any, Settings]:
    from dicom_ai.batch.run import BatchRunner

    settings = _settings(config)
    db = _database(settings)
    try:
        return BatchRunner(settings, db, source), db, settings
    except DicomAIError as exc:
        raise _fail(exc) from None


@batch_app.command("run")
def batch_run(
    source: Annotated[str, typer.Option("--source", help="A [[sources]] name.")],
    config: ConfigOption = None,
    accessions: Annotated[Path | None, typer.Option(
        "--accessions", exists=True, help="CSV with an AccessionNumber column.")] = None,
    study_date: Annotated[str | None, typer.Option(
        "--study-date", help="YYYYMMDD-YYYYMMDD (or one day, or an open range).")] = None,
    modality: Annotated[str | None, typer.Option(help="ModalitiesInStudy to match.")] = None,
    query: Annotated[list[str] | None, typer.Option(
        "--query", help="Extra C-FIND key, KEY=VALUE (repeatable).")] = None,
    route: Annotated[str | None, typer.Option(help="Process with this route only.")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Stop waiting for processing after this many seconds.")] = None,
) -> None:
    """Find studies on a source, retrieve them into the running service and follow processing.

    Needs `dicom-ai serve` running with the same config (it receives C-MOVE and runs models).
    """
    runner, db, _ = _batch_runner(config, source)
    try:
        batch_id = runner.create(_batch_query(accessions, study_date, modality, query),
                                 route=route)
    except DicomAIError as exc:
        raise _fail(exc) from None
    console.print(f"batch {batch_id} on {source}")
    counts = _follow(runner, batch_id, wait_processing=True, timeout=timeout)
    db.dispose()
    typer.echo(json.dumps({"batch": batch_id, "found": counts.found,
                           "retrieved": counts.retrieved, "processed": counts.processed,
                           "failed": counts.failed}))
    if not counts.finished or counts.failed:
        raise typer.Exit(1)


@batch_app.command("resume")
def batch_resume(
    batch_id: Annotated[int, typer.Argument(help="The batch id.")],
    config: ConfigOption = None,
    timeout: Annotated[float | None, typer.Option(
        help="Stop waiting for processing after this many seconds.")] = None,
) -> None:
    """Continue an interrupted batch: what was retrieved is not fetched again."""
    from storage import batches

    settings = _settings(config)
    db = _database(settings)
    with db.sessions() as session:
        batch = batches.get_batch(session, batch_id)
    if batch is None:
        raise _fail(ValueError(f"no batch {batch_id}"))
    runner, _, _ = _batch_runner(config, batch.source)
    counts = _follow(runner, batch_id, wait_processing=batch.kind == "run", timeout=timeout)
    typer.echo(json.dumps({"batch": batch_id, "found": counts.found,
                           "retrieved": counts.retrieved, "processed": counts.processed,
                           "failed": counts.failed}))
    if not counts.finished or counts.failed:
        raise typer.Exit(1)


@batch_app.command("status")
def batch_status(
    batch_id: Annotated[int, typer.Argument(help="The batch id.")],
    config: ConfigOption = None,
) -> None:
    """A batch's state and totals as JSON."""
    from dicom_ai.batch.run import report_rows, summarize
    from storage import batches

    settings = _settings(config)
    db = _database(settings)
    with db.sessions() as session:
        batch = batches.get_batch(session, batch_id)
    if batch is None:
        raise _fail(ValueError(f"no batch {batch_id}"))
    typer.echo(json.dumps({"batch": batch_id, "kind": batch.kind, "source": batch.source,
                           "route": batch.route, "state": batch.state,
                           "query": json.loads(batch.query), "error": batch.error,
                           **summarize(report_rows(db, batch_id))}, indent=2))


@batch_app.command("report")
def batch_report(
    batch_id: Annotated[int, typer.Argument(help="The batch id.")],
    out: Annotated[Path, typer.Option("--out", help="report.csv or report.html")],
    config: ConfigOption = None,
) -> None:
    """Write a per-study report: retrieved instances, findings, SR delivered, errors."""
    from dicom_ai.batch.run import report_rows, write_report

    settings = _settings(config)
    db = _database(settings)
    try:
        path = write_report(report_rows(db, batch_id), out)
    except DicomAIError as exc:
        raise _fail(exc) from None
    typer.echo(str(path))


@batch_app.command("list")
def batch_list(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Batches, newest first."""
    from storage import batches

    settings = _settings(config)
    db = _database(settings)
    with db.sessions() as session:
        rows = batches.list_batches(session)
    data = [{"batch": b.id, "kind": b.kind, "source": b.source, "route": b.route,
             "state": b.state, "created_at": _iso(b.created_at)} for b in rows]
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table("batch", "kind", "source", "route", "state", "created (UTC)")
    for b in data:
        table.add_row(str(b["batch"]), str(b["kind"]), str(b["source"]), str(b["route"] or ""),
                      str(b["state"]), str(b["created_at"] or ""))
    _emit(table)


@batch_app.command("export")
def batch_export(
    source: Annotated[str, typer.Option("--source", help="A [[sources]] name.")],
    labels: Annotated[Path, typer.Option("--labels", exists=True, help="CSV: label (0/1) "
                                         "and AccessionNumber or StudyInstanceUID.")],
    out: Annotated[Path, typer.Option("--out", help="Export folder (new or empty).")],
    config: ConfigOption = None,
    accessions: Annotated[Path | None, typer.Option(
        "--accessions", exists=True, help="CSV with an AccessionNumber column.")] = None,
    study_date: Annotated[str | None, typer.Option(
        "--study-date", help="YYYYMMDD-YYYYMMDD (or one day, or an open range).")] = None,
    modality: Annotated[str | None, typer.Option(help="ModalitiesInStudy to match.")] = None,
    query: Annotated[list[str] | None, typer.Option(
        "--query", help="Extra C-FIND key, KEY=VALUE (repeatable).")] = None,
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
    runner, db, settings = _batch_runner(config, source)
    batch_id = runner.create(_batch_query(accessions, study_date, modality, query),
                             kind="export")
    console.print(f"export batch {batch_id} on {source}")
    counts = _follow(runner, batch_id, wait_processing=False, timeout=None)
    if counts.retrieved == 0:
        raise _fail(ValueError(f"nothing retrieved ({counts.found} found, "
                               f"{counts.failed} failed)"))
    target = mapping or out.resolve().parent / f"{out.resolve().name}.reidentify.json"
    try:
        report = export_training_set(db, settings.storage.file_store(), batch_id, labels,
                                     out, target)
    except DicomAIError as exc:
        raise _fail(exc) from None
    db.dispose()
    typer.echo(json.dumps({"batch": batch_id, "out": str(report.out),
                           "studies": report.studies, "instances": report.instances,
                           "excluded": dict(report.excluded),
                           "unlabelled_studies": report.unlabelled_studies,
                           "mapping": str(report.mapping)}, indent=2))


# -- audit trail --------------------------------------------------------------------------------
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


@app.command()
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

    settings = _settings(config)
    start = _since(since) if since else None
    db = _database(settings)
    events: list[Any] = []
    after = None
    try:
        with db.sessions() as session:
            while len(events) < limit:
                page = audit_rows.list_events(session, after=after, limit=min(500, limit),
                                              action=action, study_instance_uid=study,
                                              since=start)
                events.extend(page[:limit - len(events)])
                if len(page) < min(500, limit):
                    break
                after = page[-1].id
    finally:
        db.dispose()
    events.reverse()
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in events], indent=2))
        return
    table = Table("Time (UTC)", "Actor", "Peer", "Action", "StudyInstanceUID", "Detail")
    for e in events:
        table.add_row(e.at.strftime("%Y-%m-%d %H:%M:%S"), e.actor, e.peer or "", e.action,
                      e.study_instance_uid or "",
                      json.dumps(e.detail, sort_keys=True, separators=(",", ":")))
    _emit(table)



# -- API keys -----------------------------------------------------------------------------------
class KeyRole(StrEnum):
    """The role of an API key."""

    read = "read"
    operator = "operator"


@apikeys_app.command("create")
def apikeys_create(
    name: Annotated[str, typer.Argument(help="Who or what uses the key.")],
    role: Annotated[KeyRole, typer.Option(help="read: data endpoints; operator: also re-run, "
                                          "re-send, retry, cancel.")] = KeyRole.read,
    config: ConfigOption = None,
) -> None:
    """Create an API key and print its token (shown this once; only its hash is stored)."""
    from datetime import UTC, datetime

    from storage import apikeys

    settings = _settings(config)
    db = _database(settings)
    try:
        with db.write_session() as session:
            made = apikeys.create_key(session, name=name, role=role.value,
                                      now=datetime.now(UTC))
    except ValueError as exc:
        raise _fail(exc) from None
    finally:
        db.dispose()
    console.print(f"key {made.info.id} ({made.info.role}) created; the token below is shown "
                  "only now: Authorization: Bearer <token>")
    typer.echo(made.token)


@apikeys_app.command("list")
def apikeys_list(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """API keys: id, name, role, prefix, created/revoked/last used (never a hash)."""
    from storage import apikeys

    settings = _settings(config)
    db = _database(settings)
    with db.sessions() as session:
        rows = apikeys.list_keys(session)
    db.dispose()
    data = [{"id": k.id, "name": k.name, "role": k.role, "prefix": k.prefix,
             "created_at": _iso(k.created_at), "revoked_at": _iso(k.revoked_at),
             "last_used_at": _iso(k.last_used_at)} for k in rows]
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table("id", "name", "role", "prefix", "created", "revoked", "last used")
    for k in data:
        table.add_row(*(str(k[key] or "") for key in (
            "id", "name", "role", "prefix", "created_at", "revoked_at", "last_used_at")))
    _emit(table)


@apikeys_app.command("revoke")
def apikeys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key id (see `apikeys list`).")],
    config: ConfigOption = None,
) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from datetime import UTC, datetime

    from storage import apikeys

    settings = _settings(config)
    db = _database(settings)
    with db.write_session() as session:
        done = apikeys.revoke_key(session, key_id, now=datetime.now(UTC))
    db.dispose()
    if not done:
        raise _fail(ValueError(f"no live API key {key_id}"))
    typer.echo(f"revoked key {key_id}")


if __name__ == "__main__":  # pragma: no cover
    app()
