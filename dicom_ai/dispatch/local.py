"""The embedded default: a supervised pool of worker processes inside ``dicom-ai serve``.

Each worker is a separate (spawned) process that imports TensorFlow, keeps its models loaded
and runs :class:`~dicom_ai.runner.run.JobRunner` on the job ids it takes from a queue. The
serve process never imports TensorFlow, so a model that crashes its process cannot take the
receiver down: the pool notices the dead worker, ends its lease at once (its job becomes due
again, counted as a failed attempt) and starts a new one.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.queues
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from dicom_ai.config import Settings
from dicom_ai.logs import setup_logging
from storage import jobs
from storage.db import Database
from storage.filestore import default_node

LOGGER = logging.getLogger(__name__)

__all__ = ["LocalPool", "new_incarnation"]


def new_incarnation(node: str) -> str:
    """The lease-owner prefix of one ``serve`` start: ``<node>/<boot id>/``.

    The pool workers' job leases start with it, so the next start of the same node can tell
    its dead predecessor's leases (same node, another boot id) from live ones and end them at
    once (:func:`storage.jobs.release_previous_incarnations`). Node ids never hold ``/``.
    """
    return f"{node}/{uuid.uuid4().hex[:12]}/"


def _exit_with_parent(parent: int, period: float = 1.0) -> None:
    """End this worker within `period` seconds once `parent` (the serve process) is gone.

    After ``kill -9`` of ``serve`` its workers would live on as orphans, running (and
    finishing, with stale leases) jobs the next start has already handed out again. `parent`
    comes from the pool, not from ``os.getppid()`` here: serve may die before a spawned worker
    gets this far (its imports take a second or more), and then the orphan would watch its new
    parent. Checks the parent pid (portable, unlike ``PR_SET_PDEATHSIG``) on a daemon thread.
    """

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                LOGGER.warning("worker %d: its serve process %d is gone; exiting", os.getpid(),
                               parent)
                os._exit(3)
            time.sleep(period)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_main(settings_data: dict[str, Any], owner: str,
                 job_queue: mp.queues.Queue[int | None],
                 done_queue: mp.queues.Queue[tuple[int, str]], parent: int) -> None:
    """Entry point of one pool worker (spawned: imports afresh, TensorFlow only here)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool decides when to stop
    _exit_with_parent(parent)
    settings = Settings.model_validate(settings_data)
    setup_logging(settings.logging)
    from dicom_ai.runner.run import JobRunner

    runner = JobRunner(settings, owner=owner)
    runner.preload(sorted({r.model for r in settings.routes}))
    while True:
        job_id = job_queue.get()
        if job_id is None:
            return
        try:
            outcome = runner.run(job_id)
        except Exception:  # the runner records job failures itself; this is the database
            LOGGER.exception("job %d could not be run; it stays due", job_id)
            outcome = "error"
        done_queue.put((job_id, outcome))


class LocalPool:
    """``workers.processes`` worker processes fed by a queue, restarted when they die.

    Parameters
    ----------
    settings : Settings
        Passed to each worker.
    db : Database
        Used to end the leases of dead workers.
    on_done : callable, optional
        Called in the serve process with ``(job_id, outcome)`` after each job (e.g. to wake
        the outbox sender at once instead of at its next poll).
    incarnation : str, optional
        The serve start's lease-owner prefix (:func:`new_incarnation`); default a new one for
        ``storage.node``.
    """

    def __init__(self, settings: Settings, db: Database,
                 on_done: Callable[[int, str], None] | None = None,
                 incarnation: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.on_done = on_done
        self.incarnation = incarnation or new_incarnation(
            settings.storage.node or default_node())
        self._ctx = mp.get_context("spawn")
        self._queue: mp.queues.Queue[int | None] = self._ctx.Queue()
        self._done: mp.queues.Queue[tuple[int, str]] = self._ctx.Queue()
        self._listener: threading.Thread | None = None
        self._workers: list[tuple[mp.process.BaseProcess, str]] = []
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    def _spawn(self, slot: int) -> tuple[mp.process.BaseProcess, str]:
        owner = f"{self.incarnation}pool-{slot}/{os.getpid()}-{uuid.uuid4().hex[:6]}"
        process = self._ctx.Process(
            target=_worker_main,
            args=(self.settings.model_dump(mode="json"), owner, self._queue, self._done,
                  os.getpid()),
            name=f"dicom-ai-worker-{slot}", daemon=True,
        )
        process.start()
        LOGGER.info("worker %d started (pid %s)", slot, process.pid)
        return process, owner

    def start(self) -> None:
        """Start the workers and their supervisor."""
        self._workers = [self._spawn(slot) for slot in range(self.settings.workers.processes)]
        self._supervisor = threading.Thread(target=self._supervise, name="pool-supervisor",
                                            daemon=True)
        self._supervisor.start()
        self._listener = threading.Thread(target=self._listen, name="pool-done", daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        while True:
            item = self._done.get()
            if item is None:
                return
            if self.on_done is not None:
                try:
                    self.on_done(*item)
                except Exception:  # a callback bug must not stop the listener
                    LOGGER.exception("on_done callback failed for job %d", item[0])

    def submit(self, job_ids: list[int]) -> None:
        """Queue job ids for the workers."""
        for job_id in job_ids:
            self._queue.put(job_id)

    def pids(self) -> list[int | None]:
        """The worker processes' ids (for tests and status)."""
        return [process.pid for process, _ in self._workers]

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            for slot, (process, owner) in enumerate(self._workers):
                if process.is_alive() or self._stop.is_set():
                    continue
                LOGGER.error("worker %d (pid %s) died with exit code %s; restarting", slot,
                             process.pid, process.exitcode)
                try:
                    with self.db.write_session() as session:
                        ended = jobs.expire_leases(session, owner, now=datetime.now(UTC))
                    if ended:
                        LOGGER.warning("the dead worker held %d job(s); they are due again",
                                       ended)
                except Exception:  # their leases then expire on their own
                    LOGGER.exception("cannot end the dead worker's leases")
                self._workers[slot] = self._spawn(slot)

    def stop(self, timeout: float = 30.0) -> None:
        """Let each worker finish its job, then stop (kill after `timeout`)."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        # Jobs still queued are not lost: their rows stay due and are dispatched after restart.
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        for _ in self._workers:
            self._queue.put(None)
        for process, _owner in self._workers:
            process.join(timeout=timeout)
            if process.is_alive():
                LOGGER.error("worker pid %s did not stop; killing it", process.pid)
                process.kill()
                process.join()
        self._done.put(None)  # type: ignore[arg-type]
        if self._listener is not None:
            self._listener.join(timeout=5)
        self._queue.close()
