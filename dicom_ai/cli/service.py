"""Running the service: ``serve`` (receiver, completion, routing, workers, outbox, API), ``worker``
(Celery), ``version``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dicom_ai import __version__
from dicom_ai.cli._common import (
    ConfigOption,
    command_context,
    console,
)


def version() -> None:
    """Print the version."""
    typer.echo(__version__)


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

    with command_context(config) as ctx:
        settings = ctx.settings
        if receivers is not None:
            settings = settings.model_copy(
                update={"dicom": settings.dicom.model_copy(update={"receivers": receivers})}
            )
        if no_workers:
            settings = settings.model_copy(
                update={"workers": settings.workers.model_copy(update={"processes": 0})}
            )
        Service(settings).run_forever()


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

    with command_context(config) as ctx:
        settings, db = ctx.settings, ctx.db
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

