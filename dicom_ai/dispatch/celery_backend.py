"""Scale-out: Celery carries job ids to ``dicom-ai worker`` processes over Redis or RabbitMQ.

The broker only carries ids; retries, attempts and leases live in the job rows (the same
policy as the local pool), so Celery's own retry machinery is not used. Messages are
acknowledged after the task ran (``acks_late``) and re-queued when a worker process dies
(``task_reject_on_worker_lost``); if a message is lost anyway, the schedulers re-dispatch the
job when its lease expires or it stays pending too long.

A job that meets a full disk or an unavailable index returns ``"waiting"``: a successful task
for Celery (never a Celery failure or retry); the job row is due again after
``workers.resource_wait_seconds`` and the schedulers publish it again then, like any due job.

Each worker process keeps one :class:`~dicom_ai.runner.run.JobRunner` (and so its models)
for its whole life. A prefork child loads its models in ``worker_process_init``, before it
reports itself up to the parent; Celery kills a child that is not up within
``worker_proc_alive_timeout`` (4 s by default, less than a TensorFlow model takes to load), so
that limit is set from ``workers.model_load_timeout_seconds``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from dicom_ai.config import Settings

LOGGER = logging.getLogger(__name__)

__all__ = ["TASK_NAME", "CeleryDispatcher", "make_app"]

TASK_NAME = "dicom_ai.run_job"


def make_app(settings: Settings) -> Celery:
    """A Celery app for `settings`: broker, queue, reliability options and the job task.

    Parameters
    ----------
    settings : Settings
        ``workers.broker_url`` (``redis://...`` or ``amqp://...``), ``workers.queue`` and
        ``workers.model_load_timeout_seconds`` (how long a child may take to load its models).

    Returns
    -------
    celery.Celery
    """
    app = Celery("dicom_ai", broker=settings.workers.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.workers.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # A child signals "up" only after worker_process_init (where it loads its models);
        # Celery's 4 s default would SIGKILL any child whose models load slower, forever.
        worker_proc_alive_timeout=settings.workers.model_load_timeout_seconds,
        # Redis re-delivers an unacknowledged message after this; a lease is the backstop.
        broker_transport_options={"visibility_timeout": max(3600.0,
                                                            settings.workers.lease_seconds * 2)},
    )
    state: dict[str, Any] = {}
    lock = threading.Lock()

    def runner() -> Any:
        with lock:
            if "runner" not in state:
                from dicom_ai.runner.run import JobRunner

                state["runner"] = JobRunner(settings)
                state["runner"].preload(sorted({r.model for r in settings.routes}))
            return state["runner"]

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _load_models(**_: Any) -> None:  # each prefork child loads its models before a task
        runner()

    @app.task(name=TASK_NAME, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_job(job_id: int) -> str:
        outcome: str = runner().run(int(job_id))
        return outcome

    return app


class CeleryDispatcher:
    """Publishes job ids to the broker (used by ``serve`` with ``workers.backend = "celery"``).

    Parameters
    ----------
    settings : Settings
        Broker and queue.
    """

    def __init__(self, settings: Settings) -> None:
        self.app = make_app(settings)
        self.queue = settings.workers.queue

    def submit(self, job_ids: list[int]) -> None:
        """Send one task per job id.

        Raises
        ------
        Exception
            The broker's own error when it cannot be reached (the scheduler retries).
        """
        with self.app.connection_for_write() as conn:
            for job_id in job_ids:
                self.app.send_task(TASK_NAME, args=[job_id], queue=self.queue,
                                   connection=conn, retry=False)

    def close(self) -> None:
        """Release the broker connections."""
        self.app.close()
