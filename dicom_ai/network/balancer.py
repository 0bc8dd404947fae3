"""Spreading associations over receiver processes: least-busy hand-off of accepted sockets.

One Python process cannot receive faster than its GIL allows (pynetdicom runs two polling
threads per association), so ``dicom-ai serve`` with ``[dicom] receivers = N`` runs N receiver
processes. The serve process owns the listening socket and is itself receiver 0 (so it answers
at once while the others start); for each new connection it picks the receiver with the fewest
open connections, and passes the socket to a receiver process over a Unix pipe (``SCM_RIGHTS``).
Kernel ``SO_REUSEPORT`` hashing was tried first: on loopback it put all four of four parallel
senders on one process, run after run.

The parent never speaks DICOM: TLS and the association happen in the receiver. It does cap
the connections each remote host holds open at once (:class:`HostLimit`, ``[dicom]
max_connections_per_host``), over all receivers: each receiver reports every connection's end
with the address the parent handed it, and a receiver process that dies takes its connections'
share with it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

from dicom_ai.network.counters import ReceiverCounters

__all__ = ["CLOSED", "ConnectionBalancer", "HostLimit", "listen", "report_closed",
           "serve_handoffs"]

LOGGER = logging.getLogger(__name__)
CLOSED = b"c"  # a receiver tells the parent that one of its connections ended (+ its host)
#: A host refused again within this many seconds is logged once, with the count, not each time.
REFUSAL_LOG_SECONDS = 10.0

#: The remote address of an accepted connection, as ``socket.accept`` gives it.
Address = tuple[Any, ...]


def listen(host: str, port: int, backlog: int = 256) -> socket.socket:
    """A listening TCP socket; ``::`` (or ``""``) accepts IPv4 and IPv6 alike where supported.

    Python's ``create_server`` makes an IPv6 socket IPv6-only unless asked for both families,
    so ``host = "::"`` would not be reachable at an IPv4 address.
    """
    if _is_any_ipv6(host) and socket.has_dualstack_ipv6():
        return socket.create_server((host, port), family=socket.AF_INET6, backlog=backlog,
                                    dualstack_ipv6=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


def _is_any_ipv6(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 6 and address.is_unspecified


def host_key(host: str) -> str:
    """The remote host a connection counts against: an IPv4 client of a dual-stack listener
    (``::ffff:a.b.c.d``) is the same host as ``a.b.c.d``; an IPv6 zone is dropped."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class HostLimit:
    """At most `limit` open connections per remote host; the rest are refused, logged, counted.

    A refusal is logged with the address only (at most once per host every
    :data:`REFUSAL_LOG_SECONDS`, with the number refused meanwhile) and counted as
    ``dicom_ai_connections_refused_total{reason="per-host limit"}``. Thread-safe.

    Parameters
    ----------
    limit : int
        ``[dicom] max_connections_per_host``.
    counters : ReceiverCounters, optional
        Where refusals are counted.
    """

    def __init__(self, limit: int, counters: ReceiverCounters | None = None) -> None:
        self.limit = limit
        self.counters = counters
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._logged: dict[str, tuple[float, int]] = {}  # host: (last logged, refused since)

    def admit(self, host: str) -> bool:
        """Count a new connection from `host`; False (counted as refused) if it is at its limit."""
        key = host_key(host)
        with self._lock:
            if self._open[key] < self.limit:
                self._open[key] += 1
                return True
            now = time.monotonic()
            last, quiet = self._logged.get(key, (float("-inf"), 0))
            log = now - last >= REFUSAL_LOG_SECONDS
            self._logged[key] = (now, 0) if log else (last, quiet + 1)
            if len(self._logged) > 4096:  # forget hosts not refused lately
                self._logged = {h: v for h, v in self._logged.items()
                                if now - v[0] < REFUSAL_LOG_SECONDS}
        if log:
            LOGGER.warning("connection from %s refused: it has %d open, the most one host may "
                           "hold (max_connections_per_host)%s", key, self.limit,
                           f"; {quiet} more refused since the last report" if quiet else "")
        if self.counters is not None:
            self.counters.refusal("per-host limit")
        return False

    def release(self, host: str, count: int = 1) -> None:
        """`count` connections from `host` ended."""
        key = host_key(host)
        with self._lock:
            left = self._open[key] - count
            if left > 0:
                self._open[key] = left
            else:
                del self._open[key]

    def open_from(self, host: str) -> int:
        """Connections from `host` open now."""
        with self._lock:
            return self._open.get(host_key(host), 0)


@dataclass
class _Worker:
    # Takes ownership of the socket (accepted from the address), or raises OSError.
    deliver: Callable[[socket.socket, Address], None]
    local: bool = False  # the serve process itself, which also runs the monitor and this loop
    active: int = 0
    alive: bool = True
    hosts: Counter[str] = field(default_factory=Counter)  # its open connections by host


class ConnectionBalancer:
    """Accepts TCP connections and hands each to the least-busy receiver process.

    Parameters
    ----------
    host, port : str, int
        The address to listen on (port 0 picks a free one; see :attr:`address`); ``::``
        listens on IPv6 and IPv4.
    max_per_host : int, optional
        Open connections one remote host may hold at once over all receivers
        (``[dicom] max_connections_per_host``); more are closed at once. None: no cap.
    counters : ReceiverCounters, optional
        Where refused connections are counted.
    """

    def __init__(self, host: str, port: int, max_per_host: int | None = None,
                 counters: ReceiverCounters | None = None) -> None:
        self._listener = listen(host, port)
        self._listener.settimeout(0.5)
        self.limit = HostLimit(max_per_host, counters) if max_per_host is not None else None
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _attach(self, slot: int, worker: _Worker) -> None:
        with self._lock:
            old = self._workers.get(slot)
            self._workers[slot] = worker
        if old is not None:
            self._retire(old)

    def _retire(self, worker: _Worker) -> None:
        """A receiver is gone: its connections went with it."""
        with self._lock:
            if not worker.alive:
                return
            worker.alive = False
            hosts, worker.hosts = worker.hosts, Counter()
        if self.limit is not None:
            for host, count in hosts.items():
                self.limit.release(host, count)

    def attach_local(self, slot: int, handoff: Callable[[socket.socket, Address], None]
                     ) -> None:
        """Use an in-process receiver in `slot`; call :meth:`release` as its connections end."""
        self._attach(slot, _Worker(handoff, local=True))

    def release(self, slot: int, host: str) -> None:
        """A connection of the receiver in `slot` ended; `host` is its address as handed over."""
        with self._lock:
            worker = self._workers.get(slot)
        if worker is not None:
            self._release(worker, host)

    def _release(self, worker: _Worker, host: str) -> None:
        with self._lock:
            worker.active = max(0, worker.active - 1)
            counted = _take(worker.hosts, host)  # not if the worker was retired meanwhile
        if counted and self.limit is not None:
            self.limit.release(host)

    def attach_process(self, slot: int, channel: Connection, pid: int) -> None:
        """Use receiver process `pid`, reached through `channel`, in `slot` (replacing any)."""

        def deliver(client: socket.socket, address: Address) -> None:
            send_handle(channel, client.fileno(), pid)
            channel.send(address)  # the receiver reports the connection's end with its host
            client.close()  # the receiver holds its own descriptor now

        worker = _Worker(deliver)
        self._attach(slot, worker)
        threading.Thread(target=self._watch, args=(slot, worker, channel),
                         name=f"balancer-{slot}", daemon=True).start()

    def _watch(self, slot: int, worker: _Worker, channel: Connection) -> None:
        """Count the process's finished connections; stop using it when its pipe closes."""
        while True:
            try:
                message = channel.recv_bytes()
            except (EOFError, OSError):
                self._retire(worker)
                return
            self._release(worker, message[len(CLOSED):].decode("utf-8", "replace"))

    def _pick(self, host: str) -> _Worker | None:
        with self._lock:
            alive = [w for w in self._workers.values() if w.alive]
            if not alive:
                return None
            # Fewest open connections; on a tie prefer a receiver process to the serve process.
            worker = min(alive, key=lambda w: (w.active, w.local))
            worker.active += 1
            worker.hosts[host] += 1
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
            host = str(address[0])
            if self.limit is not None and not self.limit.admit(host):
                client.close()
                continue
            while True:
                worker = self._pick(host)
                if worker is None:
                    LOGGER.error("no receiver alive: closed the connection from %s", host)
                    client.close()
                    if self.limit is not None:
                        self.limit.release(host)
                    break
                try:
                    worker.deliver(client, address)
                    break
                except OSError:  # the receiver died since it was picked: try another
                    with self._lock:
                        worker.active = max(0, worker.active - 1)
                        _take(worker.hosts, host)  # this connection goes to the next one
                    self._retire(worker)

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


def _take(hosts: Counter[str], host: str) -> bool:
    """Take one connection of `host` off `hosts`; False if it had none."""
    if hosts[host] <= 0:
        hosts.pop(host, None)
        return False
    hosts[host] -= 1
    if not hosts[host]:
        del hosts[host]
    return True


def serve_handoffs(channel: Connection,
                   handoff: Callable[[socket.socket, Address], None]) -> None:
    """In a receiver process: serve each socket the parent sends, until the parent is gone."""
    while True:
        try:
            fd = recv_handle(channel)
            address = channel.recv()
        except (EOFError, OSError):
            return
        handoff(socket.socket(fileno=fd), tuple(address))


def report_closed(channel: Connection, lock: threading.Lock) -> Callable[[str], None]:
    """A callback that tells the parent one of this process's connections (from a host) ended."""

    def closed(host: str) -> None:
        try:
            with lock:
                channel.send_bytes(CLOSED + host.encode("utf-8"))
        except OSError:
            pass  # the parent is gone; serve_handoffs returns and the process stops

    return closed
