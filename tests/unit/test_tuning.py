"""pynetdicom tuning (dicom_ai.network.tuning): the same behaviour, without polling."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, _config
from pynetdicom.transport import AssociationSocket

from dicom_ai.network import tuning
from dicom_ai.network.contexts import VERIFICATION
from tests.conftest import TUNE_NETWORK
from tests.peers import free_port

tuned = pytest.mark.skipif(not TUNE_NETWORK, reason="tests the pynetdicom tuning: "
                           "DICOM_AI_DICOM__TUNE_NETWORK=false runs stock pynetdicom")


@pytest.fixture(autouse=True)
def _install() -> None:
    """With the tuning on, it is installed, as the service's entry points install it."""
    if TUNE_NETWORK:
        assert tuning.install()


def test_upstream_functions_unchanged() -> None:
    """Each pynetdicom function the tuning replaces, wraps or relies on is the one it was
    written against. On failure: re-read the changed function, re-check the patch that uses it
    (see tuning.py's docstring for which), then update tuning.UPSTREAM_DIGESTS."""
    changed = [name for name, function in tuning.UPSTREAM.items()
               if tuning.upstream_digest(function) != tuning.UPSTREAM_DIGESTS[name]]
    assert not changed, f"pynetdicom changed {changed}: re-check their patches in tuning.py"
    assert set(tuning.UPSTREAM) == set(tuning.UPSTREAM_DIGESTS)


def test_importing_the_network_modules_installs_nothing() -> None:
    """The tuning is installed by the entry points (receiver start, association, stand-in),
    not as a side effect of importing the modules that use pynetdicom."""
    import subprocess
    import sys

    from tests.peers import REPO

    code = ("import dicom_ai.network.scp, dicom_ai.network.scu, dicom_ai.network.qr_scu, "
            "dicom_ai.network.standin, dicom_ai.service; "
            "from dicom_ai.network import tuning; "
            "from pynetdicom import dimse_messages; from pynetdicom.dimse import "
            "DIMSEServiceProvider as P; print(tuning.installed(), "
            "P.send_msg is tuning.UPSTREAM['send_msg'], "
            "dimse_messages.decode is tuning.UPSTREAM['decode'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False True True"


def test_off_or_untested_version_installs_nothing(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """``tune_network = false`` leaves pynetdicom alone; an untested version warns once."""
    import pynetdicom
    from pynetdicom.transport import AssociationSocket

    monkeypatch.setattr(tuning, "_installed", False)
    monkeypatch.setattr(tuning, "_refused", False)
    from pynetdicom import dimse_messages
    from pynetdicom.dimse import DIMSEServiceProvider

    recv = AssociationSocket.recv
    send_msg, decode = DIMSEServiceProvider.send_msg, dimse_messages.decode  # type: ignore[attr-defined]
    assert tuning.install(False) is False
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with caplog.at_level("WARNING", logger=tuning.__name__):
        assert tuning.install() is False
        assert tuning.install() is False
    assert [r.getMessage() for r in caplog.records].count(
        "pynetdicom 3.1.0: network tuning not installed (tested with 3.0.x); running stock "
        "pynetdicom") == 1
    assert AssociationSocket.recv is recv
    assert DIMSEServiceProvider.send_msg is send_msg
    assert dimse_messages.decode is decode  # type: ignore[attr-defined]
    assert not tuning.installed()
    assert tuning.is_tested_version("3.0.4")
    assert not tuning.is_tested_version("3.1.0")


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A pynetdicom Verification SCP in this process (its associations are tuned too)."""
    ae = AE(ae_title="TUNED")
    ae.add_supported_context(VERIFICATION)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        yield port
    finally:
        server.shutdown()


def _requestor() -> AE:
    ae = AE(ae_title="CALLER")
    ae.add_requested_context(VERIFICATION)
    return ae


@tuned
def test_installed_once() -> None:
    validator = _config.VALIDATORS["UI"]
    tuning.install()
    assert tuning.installed()
    assert _config.VALIDATORS["UI"] is validator  # not wrapped twice


@tuned
def test_idle_associations_do_not_poll(echo_server: int) -> None:
    # Untuned, each side of an idle association polls every millisecond: 3 associations
    # (6 reactor pairs in this process) took 0.84 s of CPU in 2 s of waiting.
    associations = [_requestor().associate("127.0.0.1", echo_server, ae_title="TUNED")
                    for _ in range(3)]
    try:
        assert all(a.is_established for a in associations)
        time.sleep(0.3)
        before = os.times()
        time.sleep(2.0)
        after = os.times()
        cpu = (after.user - before.user) + (after.system - before.system)
        assert cpu < 0.15, f"{cpu:.2f} s of CPU in 2 s with idle associations"
        assert all(a.send_c_echo().Status == 0 for a in associations)  # still answering
    finally:
        for a in associations:
            a.release()


@tuned
def test_messages_wake_the_reactors_at_once(echo_server: int) -> None:
    # A lost wake-up costs a reactor its whole bound (20-50 ms) on both sides, per message.
    assoc = _requestor().associate("127.0.0.1", echo_server, ae_title="TUNED")
    try:
        started = time.perf_counter()
        statuses = [assoc.send_c_echo().Status for _ in range(50)]
        elapsed = time.perf_counter() - started
    finally:
        assoc.release()
    assert statuses == [0] * 50
    assert elapsed < 50 * tuning.ASSOCIATION_WAIT / 2, f"50 C-ECHO took {elapsed:.2f} s"
    assert assoc.is_released


@tuned
def test_back_to_back_requests_get_their_own_responses(echo_server: int) -> None:
    # pynetdicom's pause handshake let the reactor take a response meant for the caller
    # ("Received unexpected C-ECHO service message", then a DIMSE timeout): see _Checkpoint.
    caller = _requestor()
    caller.dimse_timeout = 5
    for _ in range(10):
        assoc = caller.associate("127.0.0.1", echo_server, ae_title="TUNED")
        try:
            statuses = [assoc.send_c_echo().get("Status") for _ in range(100)]
        finally:
            assoc.release()
        assert statuses == [0] * 100


@tuned
def test_network_timeout_releases_an_idle_association() -> None:
    # The reactor's own A-RELEASE on network timeout pauses its reactor from that thread.
    from pynetdicom import evt

    def release_on_timeout(event: evt.Event) -> None:
        event.assoc.network_timeout_response = "A-RELEASE"

    ae = AE(ae_title="TUNED")
    ae.add_supported_context(VERIFICATION)
    ae.network_timeout = 0.5
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_ESTABLISHED, release_on_timeout)])
    assert server is not None
    try:
        assoc = _requestor().associate("127.0.0.1", port, ae_title="TUNED")
        assert assoc.is_established
        assoc.join(timeout=10)
        assert not assoc.is_alive()
        assert assoc.is_released
        deadline = time.monotonic() + 10
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.active_associations
    finally:
        # A regression spins the acceptor's release forever, and shutdown() would wait for it:
        # shut down from a daemon thread so the test fails instead of hanging the run.
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout=15)
        assert not stopper.is_alive(), "server.shutdown() hung: an association never ended"


@tuned
def test_release_and_abort_end_both_threads(echo_server: int) -> None:
    for end in ("release", "abort"):
        assoc = _requestor().associate("127.0.0.1", echo_server, ae_title="TUNED")
        assert assoc.is_established
        getattr(assoc, end)()
        assoc.join(timeout=5)
        assoc.dul.join(timeout=5)
        assert not assoc.is_alive()
        assert not assoc.dul.is_alive()


class _Transport:
    """What ``AssociationSocket.recv`` uses of itself: the connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


@tuned
def test_recv_reassembles_a_pdu_sent_in_pieces() -> None:
    reader, writer = socket.socketpair()
    payload = os.urandom(300_000)

    def trickle() -> None:
        for start in range(0, len(payload), 7_000):
            writer.sendall(payload[start:start + 7_000])
            time.sleep(0.001)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        data = AssociationSocket.recv(_Transport(reader), len(payload))  # type: ignore[arg-type]
    finally:
        sender.join()
        reader.close()
        writer.close()
    assert isinstance(data, bytearray)
    assert bytes(data) == payload


@tuned
def test_recv_returns_what_arrived_when_the_peer_closes() -> None:
    reader, writer = socket.socketpair()
    writer.sendall(b"0123456789")
    writer.close()
    try:
        data = AssociationSocket.recv(_Transport(reader), 100)  # type: ignore[arg-type]
    finally:
        reader.close()
    assert data == bytearray(b"0123456789")


@tuned
def test_recv_allocates_only_what_arrived() -> None:
    """A peer that declares 256 MiB and sends 10 bytes costs about a read step, not 256 MiB."""
    reader, writer = socket.socketpair()
    writer.sendall(b"0123456789")
    writer.close()
    tracemalloc.start()
    try:
        data = AssociationSocket.recv(_Transport(reader), 256 << 20)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        reader.close()
    assert data == bytearray(b"0123456789")
    assert peak < 2 * tuning.READ_STEP, peak


@tuned
def test_recv_of_a_long_pdu_grows_in_steps_and_matches_upstream() -> None:
    """A PDU longer than a read step arrives whole, as pynetdicom's own recv returns it."""
    payload = os.urandom(3 * tuning.READ_STEP + 12_345)
    results = []
    for recv in (AssociationSocket.recv, tuning.UPSTREAM["recv"]):
        reader, writer = socket.socketpair()
        sender = threading.Thread(target=lambda w=writer: (w.sendall(payload), w.close()))
        sender.start()
        try:
            results.append(recv(_Transport(reader), len(payload) + 1))  # type: ignore[arg-type]
        finally:
            sender.join()
            reader.close()
    assert results[0] == results[1] == bytearray(payload)


class _FakeAcceptor:
    """A TCP peer that answers an A-ASSOCIATE-RQ with an A-ASSOCIATE-AC header declaring
    `declared` bytes, sends 100 of them, then waits; it records what it receives after."""

    def __init__(self, declared: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.declared = declared
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        with client:
            client.settimeout(10)
            client.recv(65536)  # the A-ASSOCIATE-RQ
            client.sendall(struct.pack(">BBL", 0x02, 0, self.declared) + bytes(100))
            with contextlib.suppress(OSError):
                while chunk := client.recv(65536):
                    self.received += chunk

    def close(self) -> None:
        self.thread.join(timeout=15)
        self.listener.close()


@tuned
@pytest.mark.parametrize("limits", [True, False])
def test_requestor_aborts_an_oversized_associate_ac(limits: bool) -> None:
    """The sending side reads with the same code: a 256 MiB A-ASSOCIATE-AC is aborted at once
    (A-ABORT, service provider, invalid PDU parameter value) without being allocated. With the
    limits switched off it is read as it arrives: no memory, but no abort until the ACSE timeout.
    """
    peer = _FakeAcceptor(256 << 20)
    ae = _requestor()
    ae.acse_timeout = 2
    tuning.set_pdu_limits(limits)
    tracemalloc.start()
    try:
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", peer.port, ae_title="FAKE")
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        tuning.set_pdu_limits(True)
        peer.close()
    assert not assoc.is_established
    assert peak < 16 << 20, peak
    if limits:
        assert elapsed < 1.5, elapsed
        assert peer.received == struct.pack(">BBLHBB", 0x07, 0, 4, 0, 2, 6)
    else:
        assert elapsed >= 2, elapsed


@tuned
@pytest.mark.filterwarnings("ignore:The value length")
def test_uid_checks_keep_their_verdicts() -> None:
    check = _config.VALIDATORS["UI"]
    for _ in range(2):  # the second answer comes from the cache
        assert check("1.2.840.10008.1.2.1") == (True, "")
        valid, reason = check("1." * 40)
        assert not valid
        assert "64" in reason
        valid, _ = check("")
        assert not valid
    assert check(12345) == (False, "must be pydicom.uid.UID")


@tuned
@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd, odd, odd
    ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.44", "1.2.840.10008.1.2"),  # odd, even, odd
    ("1.2.840.10008.5.1.4.1.1.7", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.90"),  # 64 chars
    ("1.2.840.10008.5.1.4.1.1.4", "1.2", "1.2.840.10008.1.2.5"),
])
def test_file_meta_bytes_are_pydicoms(sop_class: str, sop_instance: str, syntax: str) -> None:
    """The file meta pynetdicom writes before a streamed C-STORE data set, byte for byte."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID
    from pynetdicom import dimse_messages
    from pynetdicom.dsutils import create_file_meta

    uids = {"sop_class_uid": UID(sop_class), "sop_instance_uid": UID(sop_instance),
            "transfer_syntax": UID(syntax)}
    reference = DicomBytesIO()
    write_file_meta_info(reference, create_file_meta(**uids))
    fast = DicomBytesIO()
    decoder: Any = dimse_messages  # the two names its C-STORE decoder calls, called as it does
    decoder.write_file_meta_info(fast, decoder.create_file_meta(**uids))
    assert fast.getvalue() == reference.getvalue()
    assert tuning.encode_file_meta(decoder.create_file_meta(**{**uids, "sop_instance_uid": ""})
                                   ) is None


@tuned
def test_quiet_logging_handlers_are_not_run(echo_server: int,
                                            caplog: pytest.LogCaptureFixture) -> None:
    # A message the standard handler cannot format makes it raise, which trigger logs: run,
    # it leaves an error; skipped (pynetdicom's logger above INFO, as dicom_ai.logs sets it),
    # nothing. With the logger at INFO it runs again, as pynetdicom runs it.
    from pynetdicom import evt
    from pynetdicom._handlers import LOGGER as HANDLERS_LOGGER

    assoc = _requestor().associate("127.0.0.1", echo_server, ae_title="TUNED")
    try:
        assert assoc.is_established
        caplog.set_level("WARNING", logger="pynetdicom")
        assert not HANDLERS_LOGGER.isEnabledFor(20)
        caplog.clear()
        assert evt.trigger(assoc, evt.EVT_DIMSE_RECV, {"message": object()}) is None
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        caplog.set_level("INFO", logger="pynetdicom")
        evt.trigger(assoc, evt.EVT_DIMSE_RECV, {"message": object()})
        assert any("evt.EVT_DIMSE_RECV" in r.getMessage() for r in caplog.records)
        caplog.set_level("WARNING", logger="pynetdicom")
        assert assoc.send_c_echo().Status == 0  # messages still flow with it quiet
    finally:
        assoc.release()


@tuned
def test_other_handlers_of_logging_events_still_run(echo_server: int) -> None:
    # Only pynetdicom's own logging handlers are skipped: one an application binds runs,
    # for every PDU and message, with the logger quiet.
    from pynetdicom import evt

    seen: list[str] = []
    handlers: list[Any] = [(evt.EVT_PDU_RECV, lambda e: seen.append("pdu")),
                (evt.EVT_DIMSE_RECV, lambda e: seen.append("dimse"))]
    assoc = _requestor().associate("127.0.0.1", echo_server, ae_title="TUNED",
                                   evt_handlers=handlers)
    try:
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    # A-ASSOCIATE-AC, the C-ECHO-RSP's P-DATA and A-RELEASE-RP; the C-ECHO-RSP message.
    assert seen.count("pdu") >= 3
    assert seen.count("dimse") == 1


# Tuned only in a tuned run: the service would install the tuning for the whole process.
@pytest.mark.parametrize("tune", [pytest.param(True, marks=tuned, id="tuned"),
                                  pytest.param(False, id="untuned")])
def test_receiver_answers_each_store_on_the_reading_thread(
        tmp_path: Path, make_settings: Callable[..., Any],
        start_service: Callable[[Any], Any], tune: bool) -> None:
    # Tuned, each C-STORE is handled by the association's DUL thread that read it, not
    # handed to the association's reactor thread and back (tuning.handle_stores_in_reader);
    # with [dicom] tune_network off, by the reactor, as pynetdicom does. Stored, indexed and
    # answered success either way.
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from tests.peers import make_ct_series

    threads: list[threading.Thread] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("stored "):
                threads.append(threading.current_thread())

    spool = logging.getLogger("dicom_ai.ingest.spool")
    seen = Seen(logging.DEBUG)
    service = start_service(make_settings(dicom={"tune_network": tune}))
    spool.addHandler(seen)  # after the service configured logging
    spool.setLevel(logging.DEBUG)
    try:
        files = make_ct_series(tmp_path / "ct", 3, size=32, seed=3)
        ae = AE(ae_title="CALLER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", service.address[1], ae_title="DICOM_AI")
        assert assoc.is_established
        try:
            statuses = [assoc.send_c_store(p).Status for p in files]
        finally:
            assoc.release()
    finally:
        spool.removeHandler(seen)
    assert statuses == [0, 0, 0]
    assert len(threads) == 3
    expected = DULServiceProvider if tune else Association
    assert all(isinstance(t, expected) for t in threads), threads
