"""The connection balancer's per-host cap (dicom_ai.network.balancer), over real sockets.

Receiver processes are stood in for by threads at the other end of real pipes: the parent's
side (SCM_RIGHTS hand-off, close reports, a pipe that closes when a receiver dies) is the code
under test.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle

import pytest

from dicom_ai.network.balancer import ConnectionBalancer, HostLimit, host_key, report_closed
from dicom_ai.network.counters import ReceiverCounters


def test_host_key_folds_ipv4_clients_of_a_dual_stack_listener() -> None:
    assert host_key("::ffff:10.1.2.3") == host_key("10.1.2.3") == "10.1.2.3"
    assert host_key("fe80::1%eth0") == host_key("FE80:0::1") == "fe80::1"
    assert host_key("not an address") == "not an address"


def test_host_limit_counts_and_releases() -> None:
    counters = ReceiverCounters(1)
    limit = HostLimit(2, counters)
    assert limit.admit("10.0.0.1")
    assert limit.admit("::ffff:10.0.0.1")  # the same host
    assert not limit.admit("10.0.0.1")
    assert limit.admit("10.0.0.2")
    limit.release("10.0.0.1")
    assert limit.open_from("10.0.0.1") == 1
    assert limit.admit("10.0.0.1")
    assert counters.snapshot()["refusal"]["per-host limit"] == 1


class _Receiver:
    """A receiver process stood in for by a thread: keeps what it is handed, reports closes."""

    def __init__(self, channel: Connection) -> None:
        self.channel = channel
        self.sockets: list[tuple[socket.socket, tuple[object, ...]]] = []
        self.report = report_closed(channel, threading.Lock())
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:  # serve_handoffs, with a way to stop without the parent
        while not self.stopped.is_set():
            if self.channel.poll(0.05):
                fd = recv_handle(self.channel)
                address = self.channel.recv()
                self.sockets.append((socket.socket(fileno=fd), tuple(address)))

    def close_one(self) -> None:
        client, address = self.sockets.pop(0)
        client.close()
        self.report(str(address[0]))

    def die(self) -> None:
        """The process ends: its connections and its end of the pipe close."""
        self.stopped.set()
        self.thread.join(5)
        for client, _ in self.sockets:
            client.close()
        self.channel.close()


@pytest.fixture
def balancer() -> Iterator[ConnectionBalancer]:
    pool = ConnectionBalancer("127.0.0.1", 0, max_per_host=3, counters=ReceiverCounters(2))
    pool.start()
    yield pool
    pool.stop()


def _connect(pool: ConnectionBalancer) -> socket.socket:
    sock = socket.create_connection(pool.address, timeout=5)
    return sock


def _closed_at_once(sock: socket.socket) -> bool:
    sock.settimeout(1.0)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_cap_holds_over_receivers_and_a_dead_receiver_gives_its_share_back(
        balancer: ConnectionBalancer) -> None:
    local: list[tuple[socket.socket, tuple[object, ...]]] = []
    balancer.attach_local(0, lambda client, address: local.append((client, address)))
    ours, theirs = mp.Pipe(duplex=True)
    child = _Receiver(theirs)
    balancer.attach_process(1, ours, 0)
    clients = [_connect(balancer) for _ in range(3)]
    _until(lambda: len(local) + len(child.sockets) == 3)
    assert len(child.sockets) >= 1  # spread: ties go to the receiver process
    extra = _connect(balancer)
    assert _closed_at_once(extra)  # the fourth from 127.0.0.1
    assert balancer.limit is not None

    # A connection that ends, reported by its receiver, gives its place back.
    child.close_one()
    _until(lambda: balancer.limit is not None and balancer.limit.open_from("127.0.0.1") == 2)
    clients.append(_connect(balancer))
    _until(lambda: balancer.limit is not None and balancer.limit.open_from("127.0.0.1") == 3)

    # A receiver that dies takes its connections' share with it (its pipe closes).
    held_by_child = len(child.sockets)
    child.die()
    _until(lambda: balancer.limit is not None
           and balancer.limit.open_from("127.0.0.1") == 3 - held_by_child)
    for sock in [*clients, extra]:
        sock.close()
    for client, _ in local:
        client.close()
