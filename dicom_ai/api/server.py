"""Run the API with uvicorn in a thread of the serve process.

The socket is bound here (so ``port = 0`` works and the bound address is known before the
first request), then handed to uvicorn, which serves on its own event loop in a daemon thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from dicom_ai.api.app import Check, create_app
from dicom_ai.config import Settings
from dicom_ai.exceptions import ConfigError
from dicom_ai.network.counters import ReceiverCounters
from storage.db import Database

LOGGER = logging.getLogger(__name__)


def pool_check(pool: Any, expected: int) -> Check:
    """A readiness check that the local worker processes are alive."""

    def workers() -> str:
        alive = 0
        for pid in pool.pids():
            if pid is None:
                continue
            try:
                os.kill(pid, 0)
            except OSError:
                continue
            alive += 1
        if alive < expected:
            raise RuntimeError(f"{alive} of {expected} worker processes alive")
        return f"{alive} worker process(es)"

    return workers


def broker_check(celery_app: Any) -> Check:
    """A readiness check that the Celery broker accepts a connection (2 s timeout)."""

    def broker() -> str:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "connected"

    return broker


class ApiServer:
    """The HTTP API of ``dicom-ai serve``.

    Parameters
    ----------
    settings : Settings
        ``[api]`` host, port and options, plus what the endpoints show.
    db : Database
        The index.
    checks : dict, optional
        Extra readiness checks (workers, broker).
    on_jobs, on_outbox : callable, optional
        Wake the scheduler / the outbox sender after an operator action.
    counters : ReceiverCounters, optional
        The DIMSE traffic counters of this process's receivers, for ``/metrics``.
    """

    def __init__(self, settings: Settings, db: Database, *,
                 checks: dict[str, Check] | None = None,
                 on_jobs: Callable[[], None] | None = None,
                 on_outbox: Callable[[], None] | None = None,
                 counters: ReceiverCounters | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, db, checks=checks, on_jobs=on_jobs, on_outbox=on_outbox,
                              counters=counters)
        self.address: tuple[str, int] | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> tuple[str, int]:
        """Bind, start serving, and return the bound (host, port).

        Raises
        ------
        ConfigError
            The address cannot be bound (in use, not ours, bad host).
        """
        host, port = self.settings.api.host, self.settings.api.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"api.host/api.port: cannot listen on {host}:{port}: {exc}") \
                from None
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, server_header=False)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name="api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the HTTP API did not start on {host}:{port}")
            time.sleep(0.02)
        bound = sock.getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        LOGGER.info("HTTP API on http://%s:%d (docs at /docs)", *self.address)
        return self.address

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (requests in flight get a few seconds)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                LOGGER.warning("the HTTP API did not stop within %.0f s", timeout)
        self._server = None
        self._thread = None
