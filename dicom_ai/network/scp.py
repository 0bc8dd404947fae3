"""The receiver: a pynetdicom application entity answering C-ECHO, C-STORE, MPPS and Q/R,
and the Storage Commitment reports of destinations that ask for commitment.

One :class:`Receiver` serves associations in one process: either from its own listening
socket, or, in a receiver pool, from connections the serve process hands over (see
:mod:`dicom_ai.network.balancer`), which is how the service scales past one process's GIL.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import pynetdicom
from pydicom import config as pydicom_config
from pynetdicom import AE, _config
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import events as evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_ai.audit import Auditor
from dicom_ai.config import Destination, DicomSettings, QueryRetrieveSettings
from dicom_ai.dimse_status import Status
from dicom_ai.ingest.completion import MppsService
from dicom_ai.ingest.spool import Ingestor
from dicom_ai.network import handlers
from dicom_ai.network.balancer import Address, HostLimit
from dicom_ai.network.contexts import scp_contexts, supported_contexts
from dicom_ai.network.counters import ReceiverCounters
from dicom_ai.network.qr import QueryRetrieveSCP
from dicom_ai.network.tuning import handle_stores_in_reader, upstream_digest
from dicom_ai.network.tuning import install as tune_pynetdicom

LOGGER = logging.getLogger(__name__)

__all__ = ["SPOOL_GUARD_UPSTREAM", "Receiver", "guard_receive", "handle_store", "receive_error",
           "server_ssl_context", "upstream_digest"]

#: Errors that mean "no room": answered 0xA700 (Refused: Out of resources, PS3.4 B.2.3).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

#: The spool guard reads pynetdicom 3.0's private spool attributes: on that version only.
_SPOOL_GUARD = pynetdicom.__version__.startswith("3.0.")

#: SHA-256 of the pynetdicom functions the spool guard relies on (``DIMSEMessage.decode_msg``
#: creates the file by the name ``NamedTemporaryFile`` and writes each fragment to it,
#: ``DIMSEServiceProvider.receive_primitive`` feeds it), as :func:`upstream_digest` computes
#: it: a test fails when they change, so the guard is re-checked against a new pynetdicom.
SPOOL_GUARD_UPSTREAM = {
    "decode_msg": "f51c777e841a76beeaadfe3015bd4f4a68387229a72f13f3a3b7846d01d72284",
    "receive_primitive": "5f99c86b14a15cefa87d914cda3591ec4d636d4c53a982e945ec9c1828c6e43f",
}

# The folder the dataset being decoded on this thread (an association's DUL thread) streams
# into; set by _SpoolGuardDIMSE around each primitive, read by _spool_file.
_receiving = threading.local()
_hook_lock = threading.Lock()


def _spool_file(*args: Any, **kwargs: Any) -> Any:
    """``tempfile.NamedTemporaryFile``, in the receiving association's folder when it has one.

    pynetdicom (3.0.4, chunked receive, PR 526) creates each received dataset's file with
    ``NamedTemporaryFile`` in the process's temporary directory; no setting names another (a
    ``STORE_RECV_CHUNKED_DATASET_PATH`` was discussed in PR 526's review, not merged). This
    stands in for that one name in ``pynetdicom.dimse_messages`` (:func:`_hook_spool_files`),
    so each association's files go to its own folder (the store's incoming/, where accepting
    one is a rename) without changing ``tempfile.tempdir`` for the whole process. The upstream
    change would be a directory argument per association (an ``Association`` attribute).
    """
    folder = getattr(_receiving, "folder", None)
    if folder is not None:
        kwargs.setdefault("dir", folder)
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def _hook_spool_files() -> None:
    """Let :func:`_spool_file` create pynetdicom's received-dataset files (idempotent)."""
    with _hook_lock:
        if _dimse_messages.NamedTemporaryFile is not _spool_file:  # type: ignore[attr-defined]
            _dimse_messages.NamedTemporaryFile = _spool_file  # type: ignore[attr-defined]


class _SpoolFile:
    """The file pynetdicom streams one received dataset into, failing softly.

    pynetdicom (3.0.4, chunked receive) writes each P-DATA fragment in its DUL thread, outside
    any handler: an ``OSError`` there (ENOSPC, EDQUOT, EIO) escapes the DUL's state machine,
    which kills the DUL thread without an A-ABORT (issue 19: a fault run saw the sender wait
    for its timeout; here the connection was dropped unanswered) and leaves the partial file
    in ``incoming/``, holding the space until the next start. Wrapped in this, the first
    failed write closes and deletes the partial file and
    every later fragment of the message is read and dropped, so the request completes and the
    C-STORE handler answers it (:func:`receive_error`).
    """

    def __init__(self, raw: Any, name: str) -> None:
        self._raw = raw
        self.name = name  # pynetdicom unlinks this after the handler (gone already: ignored)
        self.error: OSError | None = None

    @property
    def file(self) -> _SpoolFile:
        """What pynetdicom flushes after each fragment (``NamedTemporaryFile.file``)."""
        return self

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                return int(self._raw.write(data))
            except OSError as exc:
                self.fail(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._raw.flush()
            except OSError as exc:
                self.fail(exc)

    def close(self) -> None:
        if self._raw is not None:
            raw, self._raw = self._raw, None
            raw.close()

    def fail(self, exc: OSError) -> None:
        """Give up on this dataset: remove what was written; drop the rest as it arrives."""
        self.error = exc
        if self._raw is not None:
            raw, self._raw = self._raw, None
            with contextlib.suppress(OSError):  # its buffer cannot be written either
                raw.close()
        if self.name:
            with contextlib.suppress(OSError):
                os.unlink(self.name)


class _SpoolGuardDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, each received dataset file wrapped in :class:`_SpoolFile`.

    Installed per accepted association (:class:`_RequestHandler`, switch
    ``_Server.guard_spool_writes``; pynetdicom 3.0 only). A P-DATA primitive of several PDVs
    is fed one PDV at a time, so a failure creating the file (on the command's last fragment)
    cannot lose the data fragments that follow it in the same primitive. No upstream issue
    found; the upstream change would be catching ``OSError`` around the file writes of
    ``DIMSEMessage.decode_msg`` (chunked receive came with pynetdicom PR 526). With
    :attr:`spool_folder` set, the association's received datasets are created in that folder
    (:func:`_spool_file`).
    """

    #: Where this association's received datasets are streamed (None: the temporary directory).
    spool_folder: str | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Process one P-DATA primitive (see the class docstring)."""
        _receiving.folder = self.spool_folder
        try:
            items = primitive.presentation_data_value_list
            if len(items) <= 1:
                self._receive_one(primitive)
                return
            for item in items:
                single = P_DATA()
                single.presentation_data_value_list = [item]
                self._receive_one(single)
        finally:
            _receiving.folder = None

    def _receive_one(self, primitive: P_DATA) -> None:
        try:
            super().receive_primitive(primitive)
        except OSError as exc:  # creating the file or writing its file meta
            if not isinstance(self.message, C_STORE_RQ):
                raise
            _spool_of(self.message).fail(exc)
            return
        message = self.message
        if message is not None and message._data_set_file is not None:
            _spool_of(message)


def _spool_of(message: DIMSEMessage) -> _SpoolFile:
    """The message's dataset file, wrapped in a :class:`_SpoolFile` (once)."""
    current: Any = message._data_set_file
    if isinstance(current, _SpoolFile):
        return current
    path = message._data_set_path
    spool = _SpoolFile(current, str(path) if isinstance(path, os.PathLike) else "")
    message._data_set_file = spool  # type: ignore[assignment]
    return spool


def guard_receive(assoc: Association, folder: str | os.PathLike[str] | None = None) -> None:
    """Answer a C-STORE whose dataset cannot be written (a full disk) with 0xA700 on `assoc`.

    For associations we request and receive on (C-GET); the server's own associations get
    the same guard from ``_Server``. Call before the first C-STORE can arrive; pynetdicom 3.0
    only (the guard reads its private spool attributes), a no-op elsewhere. With `folder`,
    the datasets received on `assoc` are streamed into it (with chunked receive on).
    """
    if _SPOOL_GUARD:
        _guard(assoc, None if folder is None else os.fspath(folder))
    elif folder is not None:
        LOGGER.warning("pynetdicom %s: received datasets are streamed to the temporary "
                       "directory, not %s", pynetdicom.__version__, folder)


def _guard(assoc: Association, folder: str | None) -> None:
    """Swap :class:`_SpoolGuardDIMSE` in as `assoc`'s provider (its queues kept)."""
    if folder is not None:
        _hook_spool_files()
    assoc.dimse.__class__ = _SpoolGuardDIMSE
    cast(_SpoolGuardDIMSE, assoc.dimse).spool_folder = folder


def receive_error(event: evt.Event) -> OSError | None:
    """The error that stopped writing this C-STORE request's dataset to disk, if any."""
    spool = getattr(event.request, "_dataset_file", None)
    return spool.error if isinstance(spool, _SpoolFile) else None


def handle_store(event: evt.Event, ingestor: Ingestor,
                 audit: handlers.AssociationAudit | None = None,
                 counters: ReceiverCounters | None = None) -> int:
    """C-STORE (PS3.4 B.2.2): 0xA700 if the dataset could not be written, else the handler's.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The EVT_C_STORE event.
    ingestor : Ingestor
        Passed to :func:`dicom_ai.network.handlers.handle_store`.
    audit : AssociationAudit, optional
        Counts the store for the association's audit rows.
    counters : ReceiverCounters, optional
        Counts the answer.

    Returns
    -------
    int
        ``0xA700`` (Refused: Out of resources; the partial file is already deleted) when
        writing the received dataset failed, else what ``handlers.handle_store`` answers.
    """
    error = receive_error(event)
    if error is None:
        return handlers.handle_store(event, ingestor, audit, counters)
    uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    # A full disk or quota is an operating condition; any other write error (EIO) is a fault.
    LOGGER.log(
        logging.WARNING if error.errno in _NO_SPACE else logging.ERROR,
        "%s while receiving %s from %s: partial file removed, answered 0x%04X (out of "
        "resources)", errno.errorcode.get(error.errno or 0, "write error"), uid,
        event.assoc.requestor.ae_title, Status.OUT_OF_RESOURCES)
    if audit is not None:
        audit.stored(event, uid, Status.OUT_OF_RESOURCES)
    if counters is not None:
        counters.store(Status.OUT_OF_RESOURCES, 0)
    return Status.OUT_OF_RESOURCES


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, with its transport bounded.

    - The TLS handshake runs in the connection's own thread, not the accept loop, and must end
      within ``handshake_timeout`` (the association request timeout) in all, so neither one
      silent TCP connection (a port scanner) nor a slow one stalls anyone else.
    - At most ``host_limit`` connections per remote host (with one receiver; a pool's balancer
      applies it for all receivers): more are closed at once, before any DICOM.
    - ``::`` listens on IPv6 and IPv4 alike.
    - Every connection it serves is counted when it opens and, exactly once, when it ends:
      when its association's thread ends, or when it ended before having one.
    """

    handshake_timeout: float = 10.0
    host_limit: HostLimit | None = None
    # Received datasets that cannot be written (a full disk) are answered, not hung on
    # (_SpoolGuardDIMSE); pynetdicom 3.0 only.
    guard_spool_writes: bool = _SPOOL_GUARD
    # C-STOREs handled on each association's reading thread ([dicom] tune_network).
    stores_in_reader: bool = False
    # Where received datasets are streamed (the store's incoming/); None: the temp directory.
    spool_folder: str | None = None
    counters: ReceiverCounters | None = None
    # Called with the remote host (as given to process_request) when a connection ended.
    on_connection_ended: Callable[[str], None] | None = None

    def server_bind(self) -> None:
        """Bind; an IPv6 wildcard address accepts IPv4 connections too (PS3.8 is silent)."""
        host = str(self.server_address[0])
        if self.address_family == socket.AF_INET6 and host in ("::", "") and hasattr(
                socket, "IPV6_V6ONLY"):
            assert self.socket is not None
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; wrap it for TLS without handshaking yet."""
        assert self.socket is not None
        client, address = self.socket.accept()
        return self.wrap(client), address

    def wrap(self, client: socket.socket) -> socket.socket:
        """Wrap a connected socket for TLS (handshake deferred) when TLS is configured."""
        if self.ssl_context:
            return self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook: refuse a host that holds its limit of connections already."""
        return self.host_limit is None or self.host_limit.admit(str(client_address[0]))

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve a connection (in a thread of its own); it is counted until it ends."""
        if self.counters is not None:
            self.counters.connection("opened")
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: socketserver closes it, it never served
            self.connection_ended(client_address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Complete the TLS handshake (bounded in time), then start the association."""
        try:
            if isinstance(request, ssl.SSLSocket) and not self._handshake(request,
                                                                          client_address):
                self.shutdown_request(request)
                self.connection_ended(client_address)
                return
            # Starts the association's thread, which reports the end (_RequestHandler).
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
            self.connection_ended(client_address)

    def _handshake(self, request: ssl.SSLSocket, client_address: Any) -> bool:
        """The TLS handshake, all of it within ``handshake_timeout``; False if it failed."""
        deadline = time.monotonic() + self.handshake_timeout
        previous = request.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("handshake not complete in time")
                request.settimeout(left)  # one read or write at a time: the deadline for all
                try:
                    request.do_handshake()
                    break
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
            request.settimeout(previous)
            return True
        except (OSError, ValueError) as exc:
            LOGGER.warning("TLS handshake with %s failed: %s", client_address[0], exc)
            return False

    def connection_ended(self, client_address: Any) -> None:
        """A connection this server took has ended (called once per connection; never raises)."""
        host = str(client_address[0])
        try:
            if self.host_limit is not None:
                self.host_limit.release(host)
            if self.counters is not None:
                self.counters.connection("closed")
            if self.on_connection_ended is not None:
                self.on_connection_ended(host)
        except Exception:
            LOGGER.exception("connection-closed accounting failed")


class _RequestHandler(RequestHandler):
    """pynetdicom's request handler; the association's thread reports its connection's end.

    The association thread ends after its connection closed, whatever ended it (release,
    abort, the ARTIM timer, a reactor failure); EVT_CONN_CLOSE is not raised on every path.
    """

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = cast(_Server, self.server)
        if server.guard_spool_writes:
            # The provider the association made, its queues kept; only receive_primitive differs.
            _guard(assoc, server.spool_folder)
        if server.stores_in_reader:
            # Each C-STORE answered on the thread that read it (tuning.handle_stores_in_reader).
            handle_stores_in_reader(assoc)
        address = self.client_address
        run = assoc.run

        def run_then_report() -> None:
            try:
                run()
            finally:
                server.connection_ended(address)

        assoc.run = run_then_report  # type: ignore[method-assign]
        return assoc


def server_ssl_context(settings: DicomSettings) -> ssl.SSLContext | None:
    """The TLS context of the receiver (PS3.15 annex B.1), or None without TLS.

    With ``tls_ca`` set, callers must present a certificate signed by that CA.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=settings.tls_cert, keyfile=settings.tls_key)
    if settings.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=settings.tls_ca)
    return context


class Receiver:
    """A Storage/Verification/MPPS SCP bound to ``[dicom] host:port``.

    Parameters
    ----------
    settings : DicomSettings
        AE title, address, allow-lists, TLS, limits.
    ingestor : Ingestor
        Accepts received files.
    mpps : MppsService
        Keeps MPPS state.
    handed : bool
        In a receiver pool: do not listen; serve the connections given to :meth:`handoff` (see
        :mod:`dicom_ai.network.balancer`).
    on_connection_closed : callable, optional
        Called with the remote host (the address :meth:`handoff` was given) whenever a
        connection ends, exactly once per connection (the pool counts each receiver's open
        connections, and each host's).
    destinations : sequence of Destination
        The ``[[destinations]]`` C-MOVE may send to (:mod:`dicom_ai.network.qr`).
    counters : ReceiverCounters, optional
        DIMSE traffic counters for ``/metrics`` (shared by the receivers of a serve process).
    query_retrieve : QueryRetrieveSettings, optional
        Who may query and retrieve (``[query_retrieve]``); the default refuses everyone.
    """

    def __init__(
        self,
        settings: DicomSettings,
        ingestor: Ingestor,
        mpps: MppsService,
        *,
        handed: bool = False,
        on_connection_closed: Callable[[str], None] | None = None,
        destinations: Sequence[Destination] = (),
        counters: ReceiverCounters | None = None,
        query_retrieve: QueryRetrieveSettings | None = None,
    ) -> None:
        self.settings = settings
        self.query_retrieve = query_retrieve or QueryRetrieveSettings()
        self.counters = counters
        self.ingestor = ingestor
        self.mpps = mpps
        self.handed = handed
        self.on_connection_closed = on_connection_closed
        self._server: _Server | None = None
        # Audit rows are written by the auditor's own thread, never on an association's.
        self.auditor = Auditor(ingestor.db)
        self.audit = handlers.AssociationAudit(self.auditor, ingestor.db)
        self.qr = QueryRetrieveSCP(ingestor.store, ingestor.db, settings, destinations,
                                   audit=self.audit, access=self.query_retrieve,
                                   max_inflated_bytes=ingestor.max_inflated_bytes)
        # Storage Commitment reports (PS3.4 J.3.3) are accepted only when some destination
        # asks for commitment (closed by default), and only from that destination's AE title.
        self.storage_commitment = any(d.storage_commitment for d in destinations)
        allowed = {a.strip() for a in settings.allowed_calling_aets}
        unheard = [d.ae_title for d in destinations if d.storage_commitment and allowed
                   and d.ae_title.strip() not in allowed]
        if unheard:  # their reports would be rejected with the association
            LOGGER.warning("destination(s) %s ask for storage commitment but are not in "
                           "[dicom] allowed_calling_aets: their reports will be refused",
                           ", ".join(unheard))
        self.commitment = handlers.CommitmentReports(ingestor.db, destinations, self.auditor)

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        # Not add_supported_context (it revalidates every UID: with scp_contexts' own checks,
        # 158 ms of start-up, now 4 ms)
        # and not the `supported_contexts` setter (it drops the roles).
        ae._supported_contexts = supported_contexts(
            scp_contexts(self.settings.extra_storage_classes,
                         storage_commitment=self.storage_commitment))
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.maximum_pdu_size
        ae.network_timeout = self.settings.network_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        # pynetdicom's ARTIM timer (PS3.8 9.1.5) and its wait for the A-ASSOCIATE-RQ: a
        # connection that sends none is closed after this (and a release, or the close after
        # an abort, must complete within it).
        ae.acse_timeout = self.settings.association_request_timeout
        if self.settings.allowed_calling_aets:
            ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        # pynetdicom's own switch: rejects (permanent, service user, reason 7) an association
        # whose called AE title is not ours.
        ae.require_called_aet = self.settings.check_called_aet
        return ae

    def _handlers(self) -> list[Any]:
        audit, counters = self.audit, self.counters
        commitment: list[Any] = [(evt.EVT_N_EVENT_REPORT, handlers.handle_n_event_report,
                                  [self.commitment])] if self.storage_commitment else []
        return [
            *commitment,
            (evt.EVT_C_ECHO, self._counted("echo", handlers.handle_echo)),
            (evt.EVT_C_STORE, handle_store, [self.ingestor, audit, counters]),
            (evt.EVT_N_CREATE, self._counted("mpps", handlers.handle_n_create), [self.mpps]),
            (evt.EVT_N_SET, self._counted("mpps", handlers.handle_n_set), [self.mpps]),
            (evt.EVT_C_FIND, self._counted("find", self.qr.handle_find)),
            (evt.EVT_C_MOVE, self._counted("move", self.qr.handle_move)),
            (evt.EVT_C_GET, self._counted("get", self.qr.handle_get)),
            (evt.EVT_REQUESTED, handlers.handle_requested,
             [list(self.settings.allowed_hosts), audit, counters]),
            (evt.EVT_ACCEPTED, handlers.handle_accepted, [audit, counters]),
            (evt.EVT_REJECTED, handlers.handle_rejected,
             [list(self.settings.allowed_calling_aets), audit, counters]),
            (evt.EVT_RELEASED, handlers.handle_released, [audit, counters]),
            (evt.EVT_ABORTED, handlers.handle_aborted, [audit, counters]),
        ]

    def _counted(self, service: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """`handler`, counting each request in :attr:`counters` first."""
        counters = self.counters
        if counters is None:
            return handler

        def counted(event: evt.Event, *args: Any) -> Any:
            counters.request(service)
            return handler(event, *args)

        return counted

    def handoff(self, client: socket.socket, address: Address) -> None:
        """Serve a connection the pool's balancer accepted from `address`; takes ownership."""
        assert self._server is not None, "start() first"
        try:
            request = self._server.wrap(client)
        except (OSError, ValueError) as exc:  # gone before it was served: it still ended
            LOGGER.warning("connection from %s lost before it was served: %s", address[0], exc)
            client.close()
            if self.on_connection_closed is not None:
                self.on_connection_closed(str(address[0]))
            return
        self._server.process_request(request, address)

    def start(self) -> tuple[str, int]:
        """Start listening in background threads.

        Returns
        -------
        tuple of (str, int)
            The bound address and port (useful when the configured port is 0).
        """
        # Event-driven association threads, cached UID checks, bounded PDU reads (tuning.py);
        # in each receiver process, the pool's children included (they call start too).
        tune_pynetdicom(self.settings.tune_network)
        # Stream each dataset to a file in the store's incoming/ folder (the server's
        # spool_folder, below), so accepting it is a rename on the same filesystem (see
        # docs/notes.md: pynetdicom deletes what we leave). pynetdicom's own switch, read per
        # message; process-wide, as every receiving path of ours wants it.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Q/R identifiers hold patient names and IDs: pynetdicom must not log them.
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
        # We validate what we use ourselves; pydicom's per-value regex checks on read only
        # cost time on the ingest path (and log vendor quirks we tolerate anyway). Process-wide
        # because pydicom has no per-read seam: dcmread takes no validation argument and
        # reading_validation_mode is only read from the global settings object (pydicom 3.0).
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        ae = self._make_ae()
        # In a pool the balancer listens; this server's own socket is an unused loopback one.
        address = ("127.0.0.1", 0) if self.handed else (self.settings.host, self.settings.port)
        server = cast(_Server, ae.make_server(
            address,
            ae_title=self.settings.ae_title,
            ssl_context=server_ssl_context(self.settings),
            evt_handlers=self._handlers(),
            server_class=_Server,
            request_handler=_RequestHandler,
        ))
        server.handshake_timeout = self.settings.association_request_timeout
        server.spool_folder = str(self.ingestor.store.incoming)
        server.stores_in_reader = self.settings.tune_network
        if not server.guard_spool_writes:  # the folder is set through the guard's provider
            LOGGER.warning("pynetdicom %s: received datasets are streamed to the temporary "
                           "directory, not the store's incoming/", pynetdicom.__version__)
        server.counters = self.counters
        server.on_connection_ended = self.on_connection_closed
        if not self.handed:  # in a pool the balancer holds each host to its limit
            server.host_limit = HostLimit(self.settings.max_connections_per_host, self.counters)
        thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor",
                                  daemon=True)
        thread.start()
        ae._servers.append(server)  # as AE.start_server does, so server.shutdown() works
        self._server = server
        if self.handed:
            return self.settings.host, self.settings.port
        host, port = server.server_address[:2]
        LOGGER.info("receiver %s listening on %s:%s%s", self.settings.ae_title, host, port,
                    " (TLS)" if self.settings.tls_cert else "")
        return str(host), int(port)

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, give running associations `grace_seconds` to end, abort the rest.

        A C-STORE in progress when the grace period ends is aborted before its answer, so the
        sender knows to re-send it; nothing acknowledged depends on this.
        """
        if self._server is not None:
            ae = self._server.ae
            self._server.shutdown()
            deadline = time.monotonic() + grace_seconds
            for assoc in list(ae.active_associations):
                assoc.join(timeout=max(0.0, deadline - time.monotonic()))
            for assoc in list(ae.active_associations):
                LOGGER.warning("aborting association from %s at shutdown",
                               assoc.requestor.ae_title)
                assoc.abort()
            self._server = None
        self.audit.close()
        self.auditor.close()
