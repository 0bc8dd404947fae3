"""Spreading associations over receiver processes: least-busy hand-off of accepted sockets.

One Python process cannot receive faster than its GIL allows (pynetdicom runs two polling
threads per association), so ``dicom-ai serve`` with ``[dicom] receivers = N`` runs N receiver
processes. The serve process owns the listening socket and is itself receiver 0 (so it answers
at once while the others start); for each new connection it picks the receiver with the fewest
open connections, and passes the socket to a receiver process over a Unix pipe (``SCM_RIGHTS``).
Kernel ``SO_REUSEPORT`` hashing was tried first: on loopback it put all four of four parallel
senders on one process, run after run.

The parent never speaks DICOM: TLS and the association happen in the receiver.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

LOGGER = logging.getLogger(__name__)
CLOSED = b"c"  # a receiver tells the parent that one of its connections ended


@dataclass
class _Worker:
    deliver: Callable[[socket.socket], None]  # takes ownership of the socket, or raises OSError
    local: bool = False  # the serve process itself, which also runs the monitor and this loop
    active: int = 0
    alive: bool = True


class ConnectionBalancer:
    """Accepts TCP connections and hands each to the least-busy receiver process.

    Parameters
    ----------
    host, port : str, int
        The address to listen on (port 0 picks a free one; see :attr:`address`).
    """

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=256)
        self._listener.settimeout(0.5)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _attach(self, slot: int, worker: _Worker) -> None:
        with self._lock:
            old = self._workers.get(slot)
            if old is not None:
                old.alive = False
            self._workers[slot] = worker

    def attach_local(self, slot: int, handoff: Callable[[socket.socket], None]) -> None:
        """Use an in-process receiver in `slot`; call :meth:`release` as its connections end."""
        self._attach(slot, _Worker(handoff, local=True))

    def release(self, slot: int) -> None:
        """One connection of the receiver in `slot` ended."""
        with self._lock:
            worker = self._workers.get(slot)
            if worker is not None:
                worker.active = max(0, worker.active - 1)

    def attach_process(self, slot: int, channel: Connection, pid: int) -> None:
        """Use receiver process `pid`, reached through `channel`, in `slot` (replacing any)."""

        def deliver(client: socket.socket) -> None:
            send_handle(channel, client.fileno(), pid)
            client.close()  # the receiver holds its own descriptor now

        worker = _Worker(deliver)
        self._attach(slot, worker)
        threading.Thread(target=self._watch, args=(slot, worker, channel),
                         name=f"balancer-{slot}", daemon=True).start()

    def _watch(self, slot: int, worker: _Worker, channel: Connection) -> None:
        """Count the process's finished connections; stop using it when its pipe closes."""
        while True:
            try:
                channel.recv_bytes()
            except (EOFError, OSError):
                worker.alive = False
                return
            with self._lock:
                worker.active = max(0, worker.active - 1)

    def _pick(self) -> _Worker | None:
        with self._lock:
            alive = [w for w in self._workers.values() if w.alive]
            if not alive:
                return None
            # Fewest open connections; on a tie prefer a receiver process to the serve process.
            worker = min(alive, key=lambda w: (w.active, w.local))
            worker.active += 1
            return worker

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                LOGGER.exception("accept failed")
                continue
            while True:
                worker = self._pick()
                if worker is None:
                    LOGGER.error("no receiver alive: closed the connection from %s", address[0])
                    client.close()
                    break
                try:
                    worker.deliver(client)
                    break
                except OSError:  # the receiver died since it was picked: try another
                    worker.alive = False

    def start(self) -> None:
        """Accept connections in a background thread."""
        self._thread = threading.Thread(target=self._accept_loop, name="balancer",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and close the listening socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._listener.close()


def serve_handoffs(channel: Connection, handoff: Callable[[socket.socket], None]) -> None:
    """In a receiver process: serve each socket the parent sends, until the parent is gone."""
    while True:
        try:
            fd = recv_handle(channel)
        except (EOFError, OSError):
            return
        handoff(socket.socket(fileno=fd))


def report_closed(channel: Connection, lock: threading.Lock) -> Callable[[], None]:
    """A callback that tells the parent one of this process's connections ended."""

    def closed() -> None:
        try:
            with lock:
                channel.send_bytes(CLOSED)
        except OSError:
            pass  # the parent is gone; serve_handoffs returns and the process stops

    return closed
