"""The ``dicom-ai`` command line (typer): one module per command group.

The commands live in :mod:`~dicom_ai.cli.service` (serve, worker, version),
:mod:`~dicom_ai.cli.data` (studies, jobs, findings), :mod:`~dicom_ai.cli.db` (db, purge),
:mod:`~dicom_ai.cli.models`, :mod:`~dicom_ai.cli.ml` (train, evaluate, synth, preview, demo),
:mod:`~dicom_ai.cli.batch`, :mod:`~dicom_ai.cli.routes`, :mod:`~dicom_ai.cli.apikeys`,
:mod:`~dicom_ai.cli.audit` and :mod:`~dicom_ai.cli.dimse` (echo, send); what they share
(``with command_context(config) as ctx:``: settings and database set-up, errors as exit
codes; output) is :mod:`~dicom_ai.cli._common`.
They are registered here, in the order ``--help`` lists them. ``python -m dicom_ai.cli`` runs
:mod:`dicom_ai.cli.__main__`; the console script is ``dicom_ai.cli:app``.
"""

from __future__ import annotations

import typer

from dicom_ai.cli import (
    apikeys,
    audit,
    batch,
    data,
    db,
    dimse,
    ml,
    models,
    routes,
    service,
)

__all__ = ["app"]

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

app.command()(service.version)
app.command()(service.serve)
app.command()(data.studies)
app.command()(dimse.echo)
app.command()(dimse.send)
app.command()(ml.preview)
app.command()(ml.synth)
db_app.command("upgrade")(db.db_upgrade)
db_app.command("reconcile")(db.db_reconcile)
app.command()(db.purge)
models_app.command("list")(models.models_list)
models_app.command("add")(models.models_add)
models_app.command("activate")(models.models_activate)
models_app.command("show")(models.models_show)
app.command()(ml.train)
app.command()(ml.evaluate)
app.command()(service.worker)
routes_app.command("test")(routes.routes_test)
app.command()(data.jobs)
app.command()(data.findings)
app.command()(ml.demo)
batch_app.command("run")(batch.batch_run)
batch_app.command("resume")(batch.batch_resume)
batch_app.command("status")(batch.batch_status)
batch_app.command("report")(batch.batch_report)
batch_app.command("list")(batch.batch_list)
batch_app.command("export")(batch.batch_export)
app.command()(audit.audit)
apikeys_app.command("create")(apikeys.apikeys_create)
apikeys_app.command("list")(apikeys.apikeys_list)
apikeys_app.command("revoke")(apikeys.apikeys_revoke)
