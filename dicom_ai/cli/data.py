"""What the index holds: ``studies``, ``jobs``, ``findings`` (the API's views,
:mod:`dicom_ai.views`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from dicom_ai.cli._common import (
    AfterOption,
    ConfigOption,
    LimitOption,
    _emit,
    _more,
    _page,
    _print_json,
    command_context,
)


def studies(
    config: ConfigOption = None,
    limit: LimitOption = 50,
    after: AfterOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (the API's "
                                          "study objects).")] = False,
) -> None:
    """List received studies with their completion state, newest first (one page)."""
    from dicom_ai.views import study_view
    from storage import studies as study_rows

    with command_context(config) as ctx, ctx.db.sessions() as session:
        rows = [study_view(r) for r in study_rows.list_studies(session, after=after,
                                                                limit=limit)]
    if _page(rows, limit, as_json):
        return
    table = Table("StudyInstanceUID", "Accession", "Modalities", "Series", "Instances", "State",
                  "Last received")
    for s in rows:
        table.add_row(s.study_instance_uid, s.accession_number, ",".join(s.modalities),
                      str(s.series), str(s.instances), s.state,
                      s.last_received_at.strftime("%Y-%m-%d %H:%M:%S") if s.last_received_at
                      else "")
    _emit(table)


def jobs(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state (pending, waiting, "
                                              "running, done, failed).")] = None,
    limit: LimitOption = 50,
    after: AfterOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (the API's job "
                                          "objects).")] = False,
) -> None:
    """List jobs with their state, attempts and last error, newest first (one page)."""
    from dicom_ai.views import job_view
    from storage import jobs as job_rows

    with command_context(config) as ctx, ctx.db.sessions() as session:
        rows = [job_view(j) for j in job_rows.list_jobs(session, state=state, limit=limit,
                                                        after=after)]
    if _page(rows, limit, as_json):
        return
    table = Table("id", "study", "route", "model", "state", "attempts", "error")
    for j in rows:
        table.add_row(str(j.id), j.study_instance_uid, j.route,
                      f"{j.model} {j.model_version or ''}", j.state,
                      f"{j.attempts}/{j.max_attempts}", j.error or "")
    _emit(table)


def findings(
    study: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    config: ConfigOption = None,
    all_versions: Annotated[bool, typer.Option("--all", help="Include superseded findings.")]
    = False,
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many findings "
                                       "(oldest first; at most 500).")] = 500,
    after: Annotated[int | None, typer.Option(min=0, help="The last finding id of the "
                                              "previous page.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object: findings, "
                                          "routing, jobs (the API's objects).")] = False,
) -> None:
    """The findings of a study (current ones unless --all), how routing decided, and why a
    job gave no (or fewer) findings."""
    from dicom_ai.views import StudyFindingsView, finding_view, job_view, routing_view
    from storage import jobs as job_rows

    with command_context(config) as ctx, ctx.db.sessions() as session:
        shown = StudyFindingsView(
            findings=[finding_view(f) for f in job_rows.list_findings(
                session, study_instance_uid=study, current_only=not all_versions,
                order="asc", limit=limit, after=after)],
            routing=[routing_view(d) for d in job_rows.decisions_of_study(session, study)],
            # Why a study has no (or fewer) findings: its jobs' state and note (failed, not
            # applicable, series skipped by the model's scope).
            jobs=[job_view(j) for j in job_rows.list_jobs(
                session, study_instance_uid=study, order="asc", limit=100)])
    _more(shown.findings, limit)
    if as_json:
        _print_json(shown)
        return
    table = Table("job", "image", "model", "finding", "probability", "decision", "location")
    for f in shown.findings:
        table.add_row(str(f.job_id), f.sop_instance_uid or "(study or series)",
                      f"{f.model} {f.model_version}", f.finding.code_meaning,
                      f"{f.probability:.3f}", f.decision
                      + (" (input outside training data)" if f.out_of_distribution else ""),
                      json.dumps(f.location) if f.location else "")
    _emit(table)
    # Part of the answer (stdout, whole lines): how routing decided, and the state of every
    # job that gave no (or fewer) findings.
    for d in shown.routing:
        typer.echo(f"series {d.series_instance_uid}: "
                   f"{'route ' + d.route if d.route else 'unrouted'} - {d.reason}")
    for j in shown.jobs:
        if j.error or j.state != "done":
            typer.echo(f"job {j.id} ({j.route}): {j.state}"
                       f"{' - ' + j.error if j.error else ''}")

