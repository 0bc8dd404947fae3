"""The ``serve`` process: recovery, receivers, completion, routing, workers, outbox, shutdown.

With ``[dicom] receivers = 1`` the receiver runs in this process. With more, this process
listens and hands each new connection to the least-busy of N receiver processes
(:mod:`dicom_ai.network.balancer`), which it supervises and restarts if one dies; it also runs
the completion monitor. Completed studies are routed into jobs (:mod:`dicom_ai.dispatch.scheduler`)
that run in a local pool of worker processes or on Celery workers, and results leave through
the outbox (:mod:`dicom_ai.dispatch.delivery`). TensorFlow is never imported here.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.synchronize
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any, Protocol

from dicom_ai.audit import Auditor
from dicom_ai.config import Settings
from dicom_ai.dispatch.delivery import OutboxSender, release_previous_claims
from dicom_ai.dispatch.local import LocalPool, new_incarnation
from dicom_ai.dispatch.scheduler import Dispatcher, Scheduler
from dicom_ai.ingest.completion import CompletionEvent, CompletionMonitor, MppsService
from dicom_ai.ingest.recovery import RecoveryReport, mark_clean_shutdown, recover
from dicom_ai.ingest.spool import Ingestor, request_reconcile
from dicom_ai.logs import setup_logging
from dicom_ai.network.balancer import ConnectionBalancer, report_closed, serve_handoffs
from dicom_ai.network.counters import ReceiverCounters
from dicom_ai.network.scp import Receiver
from dicom_ai.retention import RetentionRunner
from storage import jobs
from storage.db import Database
from storage.filestore import FileStore

LOGGER = logging.getLogger(__name__)


class _Stoppable(Protocol):
    def stop(self) -> object: ...


def _stop_each(*parts: _Stoppable | None) -> None:
    """Stop each part that was started, in the order given (the order of the shutdown)."""
    for part in parts:
        if part is not None:
            part.stop()


@dataclass
class Components:
    """What one process needs to receive: store, index sessions, ingestor, MPPS state."""

    store: FileStore
    db: Database
    ingestor: Ingestor
    mpps: MppsService


def build_components(settings: Settings) -> Components:
    """Open the store and the index of `settings` (no migration, no recovery)."""
    store = settings.storage.file_store()
    db = Database(settings.storage.url)
    return Components(
        store=store,
        db=db,
        ingestor=Ingestor(store, db, settings.storage, settings.limits),
        mpps=MppsService(db),
    )


def _redact(url: str) -> str:
    """A broker URL without its password, for logs."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


class _TerminatedError(Exception):
    """SIGTERM reached a receiver process."""


def _receiver_process(
    settings_data: dict[str, Any], channel: Connection, ready: mp.synchronize.Event,
    counters: ReceiverCounters,
) -> None:
    """Entry point of one receiver child process (spawned, so it imports afresh)."""
    settings = Settings.model_validate(settings_data)
    setup_logging(settings.logging)
    counters.settle()  # what a receiver that died in this slot counted open ended with it
    parts = build_components(settings)
    receiver = Receiver(settings.dicom, parts.ingestor, parts.mpps, handed=True,
                        destinations=settings.destinations, counters=counters,
                        query_retrieve=settings.query_retrieve,
                        on_connection_closed=report_closed(channel, threading.Lock()))

    def terminate(*_: object) -> None:
        raise _TerminatedError  # interrupts the blocking wait for the next connection

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    receiver.start()
    ready.set()
    try:
        serve_handoffs(channel, receiver.handoff)
        LOGGER.warning("the serve process is gone: this receiver stops")
    except _TerminatedError:
        pass
    receiver.stop()


class Service:
    """Everything ``dicom-ai serve`` runs.

    Parameters
    ----------
    settings : Settings
        The validated settings.
    on_event : callable, optional
        Called with each completion event (later stages subscribe here).
    """

    def __init__(
        self, settings: Settings, on_event: Callable[[CompletionEvent], None] | None = None
    ) -> None:
        self.settings = settings
        self.on_event = on_event
        self.recovery: RecoveryReport | None = None
        self.address: tuple[str, int] | None = None
        self._parts: Components | None = None
        self._receiver: Receiver | None = None
        self._children: list[tuple[mp.process.BaseProcess, mp.synchronize.Event]] = []
        self._balancer: ConnectionBalancer | None = None
        self._monitor: CompletionMonitor | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._scheduler: Scheduler | None = None
        self._sender: OutboxSender | None = None
        self._celery: Any = None
        self.pool: LocalPool | None = None
        self._api: Any = None  # dicom_ai.api.server.ApiServer, imported only when enabled
        self.api_address: tuple[str, int] | None = None
        self.retention: RetentionRunner | None = None
        #: DIMSE traffic of every receiver of this process, for /metrics.
        self.counters = ReceiverCounters(settings.dicom.receivers)

    def start(self) -> None:
        """Migrate, recover, start the receiver(s) and the completion monitor."""
        parts = build_components(self.settings)
        self._parts = parts
        parts.db.upgrade()
        self.recovery = recover(parts.store, parts.db,
                                max_inflated_bytes=self.settings.limits.max_inflated_bytes)
        # After an unclean stop the trail may miss the associations that were open (their rows
        # are written when they end): the start says so, with what recovery repaired.
        Auditor(parts.db).record("system", "serve", "service.started", detail={
            "node": parts.store.node, **asdict(self.recovery)})
        if self.settings.dicom.receivers == 1:
            self._receiver = Receiver(self.settings.dicom, parts.ingestor, parts.mpps,
                                      destinations=self.settings.destinations,
                                      counters=self.counters,
                                      query_retrieve=self.settings.query_retrieve)
            self.address = self._receiver.start()
        else:
            # This process is receiver 0 and answers at once; receivers 1..N-1 are processes
            # that join the balancer as each finishes starting.
            balancer = ConnectionBalancer(
                self.settings.dicom.host, self.settings.dicom.port,
                max_per_host=self.settings.dicom.max_connections_per_host,
                counters=self.counters)
            self._balancer = balancer
            self._receiver = Receiver(self.settings.dicom, parts.ingestor, parts.mpps,
                                      handed=True,
                                      on_connection_closed=lambda host: balancer.release(0, host),
                                      destinations=self.settings.destinations,
                                      counters=self.counters,
                                      query_retrieve=self.settings.query_retrieve)
            self._receiver.start()
            balancer.attach_local(0, self._receiver.handoff)
            balancer.start()
            self.address = balancer.address
            LOGGER.info("listening on %s:%s; %d receivers, the processes join as they start",
                        *self.address, self.settings.dicom.receivers)
        self._start_loop(parts)
        self._monitor = CompletionMonitor(parts.db, self.settings.completion,
                                          self._announce)
        self._monitor.start()
        if self.settings.api.enabled:
            self._start_api(parts)
        if self.settings.retention.enabled:  # at start, then every interval_seconds
            self.retention = RetentionRunner(self.settings, parts.store, parts.db)
            self.retention.start()
        if self._balancer is not None:
            # Receivers 1..N-1 last: their start-up (a Python interpreter each) would take the
            # CPU this process needs to finish its own start while receiver 0 already answers.
            for slot in range(1, self.settings.dicom.receivers):
                self._children.append(self._spawn(slot))
            self._supervisor = threading.Thread(target=self._supervise, name="supervisor",
                                                daemon=True)
            self._supervisor.start()

    def _start_loop(self, parts: Components) -> None:
        """Scheduler (routing, dispatch), the worker pool or Celery publisher, the outbox."""
        workers = self.settings.workers
        incarnation = new_incarnation(parts.store.node)
        self._reclaim(parts, incarnation)
        sender = OutboxSender(self.settings, parts.db)
        dispatcher: Dispatcher | None = None
        if workers.backend == "celery":
            from dicom_ai.dispatch.celery_backend import CeleryDispatcher

            self._celery = CeleryDispatcher(self.settings)
            dispatcher = self._celery
        elif workers.processes > 0 and self.settings.routes:  # no routes: nothing to run
            self.pool = LocalPool(self.settings, parts.db, on_done=lambda *_: sender.wake(),
                                  incarnation=incarnation)
            self.pool.start()
            dispatcher = self.pool
        self._scheduler = Scheduler(self.settings, parts.db, dispatcher)
        self._scheduler.start()
        self._sender = sender
        sender.start()
        self._scheduler.wake()  # re-dispatch what was pending before a restart, now
        LOGGER.info("workers: %s; %d route(s), %d destination(s)",
                    "celery via " + _redact(workers.broker_url) if workers.backend == "celery"
                    else f"{workers.processes} local process(es)" if self.pool is not None
                    else "none in this process",
                    len(self.settings.routes), len(self.settings.destinations))

    def _reclaim(self, parts: Components, incarnation: str) -> None:
        """Take back at once what this node's previous ``serve`` held when it died.

        Its workers' job leases (owners ``<node>/<old boot>/...``) end now instead of after
        ``workers.lease_seconds``, pending jobs it had queued are dispatched again now instead of
        after ``redispatch_seconds``, and the outbox rows its sender had claimed are released
        instead of waiting ``delivery.claim_seconds``. Other nodes' and Celery workers' leases
        are untouched.
        """
        node = parts.store.node
        with parts.db.write_session() as session:
            running = jobs.release_previous_incarnations(session, node=node,
                                                         current=incarnation,
                                                         now=datetime.now(UTC))
            pending = jobs.redispatch_pending(session)
        outbox = release_previous_claims(self.settings, parts.db)
        LOGGER.info("node %s boot %s: reclaimed %d running job(s) of the previous start, "
                    "%d dispatched pending job(s), %d claimed outbox row(s)", node,
                    incarnation.rstrip("/").rsplit("/", 1)[-1], running, pending, outbox)

    def _start_api(self, parts: Components) -> None:
        """The HTTP API (health, readiness, metrics, data, operator actions) in a thread."""
        from dicom_ai.api.server import ApiServer, broker_check, pool_check

        checks = {}
        if self.pool is not None:
            checks["workers"] = pool_check(self.pool, self.settings.workers.processes)
        if self._celery is not None:
            checks["broker"] = broker_check(self._celery.app)
        scheduler, sender = self._scheduler, self._sender
        self._api = ApiServer(self.settings, parts.db, checks=checks, counters=self.counters,
                              on_jobs=scheduler.wake if scheduler is not None else None,
                              on_outbox=sender.wake if sender is not None else None)
        self.api_address = self._api.start()

    def _announce(self, event: CompletionEvent) -> None:
        if self._scheduler is not None:
            self._scheduler.wake()
        if self.on_event is not None:
            self.on_event(event)

    def _spawn(self, slot: int) -> tuple[mp.process.BaseProcess, mp.synchronize.Event]:
        assert self._balancer is not None
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        ours, theirs = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=_receiver_process,
            args=(self.settings.model_dump(mode="json"), theirs, ready,
                  self.counters.for_slot(slot)),
            name=f"dicom-ai-receiver-{slot}",
            daemon=True,
        )
        process.start()
        theirs.close()
        pid = process.pid
        assert pid is not None
        balancer = self._balancer

        def attach_when_ready() -> None:
            if ready.wait(timeout=120):
                balancer.attach_process(slot, ours, pid)
                # Only once every slot is spawned (the list fills while children start).
                children = self._children
                if (len(children) == self.settings.dicom.receivers - 1
                        and all(r.is_set() for _, r in children)):
                    LOGGER.info("all %d receivers ready", self.settings.dicom.receivers)

        threading.Thread(target=attach_when_ready, name=f"attach-{slot}", daemon=True).start()
        return process, ready

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            for i, (process, _) in enumerate(self._children):
                if not process.is_alive() and not self._stopping.is_set():
                    LOGGER.error("receiver process %s exited with %s; restarting",
                                 process.pid, process.exitcode)
                    if self._parts is not None:  # it may have stored a file it never indexed
                        request_reconcile(self._parts.store)
                        # Its open associations and queued audit rows died with it.
                        Auditor(self._parts.db).record(
                            "system", "serve", "receiver.died", detail={
                                "node": self._parts.store.node, "receiver": i + 1,
                                "exit_code": process.exitcode})
                    self._children[i] = self._spawn(i + 1)

    def stop(self) -> None:
        """Stop receiving, the monitor, workers and outbox; leave the clean-shutdown marker.

        Calling it again does nothing.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        _stop_each(self._api, self._balancer, self._receiver)
        for process, _ in self._children:
            process.terminate()
        clean = True
        for process, _ in self._children:
            process.join(timeout=40)
            if process.is_alive():  # stuck: it may hold a stored but unindexed file
                LOGGER.error("receiver process %s did not stop; killing it", process.pid)
                process.kill()
                process.join()
                clean = False
        _stop_each(self.retention, self._monitor, self._scheduler, self.pool, self._sender)
        if self._celery is not None:
            self._celery.close()
        if self._parts is not None:
            self._parts.db.dispose()
            if clean:
                mark_clean_shutdown(self._parts.store)
        LOGGER.info("stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT, then stop cleanly."""
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        signal.signal(signal.SIGINT, lambda *_: done.set())
        started = time.monotonic()
        self.start()
        LOGGER.info("ready in %.2f s", time.monotonic() - started)
        done.wait()
        self.stop()
