"""The receiver: a pynetdicom application entity answering C-ECHO, C-STORE, MPPS and Q/R.

One :class:`Receiver` serves associations in one process: either from its own listening
socket, or, in a receiver pool, from connections the serve process hands over (see
:mod:`dicom_ai.network.balancer`), which is how the service scales past one process's GIL.
"""

from __future__ import annotations

import logging
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from pydicom import config as pydicom_config
from pynetdicom import AE, _config
from pynetdicom import events as evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_ai.audit import Auditor
from dicom_ai.config import Destination, DicomSettings
from dicom_ai.ingest.completion import MppsService
from dicom_ai.ingest.spool import Ingestor
from dicom_ai.network import handlers
from dicom_ai.network.contexts import scp_contexts, supported_contexts
from dicom_ai.network.counters import ReceiverCounters
from dicom_ai.network.qr import QueryRetrieveSCP
from dicom_ai.network.tuning import install as tune_pynetdicom

LOGGER = logging.getLogger(__name__)

tune_pynetdicom()  # event-driven association threads, cached UID checks: see tuning.py


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved off the accept loop.

    The handshake runs in the connection's own thread with a timeout, so one silent TCP
    connection (a port scanner) cannot stall every new association.
    """

    # Called when a connection ends without an association (a failed TLS handshake).
    connection_dropped: Callable[[], None] | None = None

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

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Complete the TLS handshake (bounded by the network timeout), then serve."""
        if isinstance(request, ssl.SSLSocket):
            previous = request.gettimeout()
            try:
                request.settimeout(self.ae.network_timeout or 30.0)
                request.do_handshake()
                request.settimeout(previous)
            except (OSError, ValueError) as exc:
                LOGGER.warning("TLS handshake with %s failed: %s", client_address, exc)
                self.shutdown_request(request)
                if self.connection_dropped is not None:
                    self.connection_dropped()
                return
        super().process_request_thread(request, client_address)


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
        Called whenever a connection ends (the pool counts each receiver's open connections).
    destinations : sequence of Destination
        The ``[[destinations]]`` C-MOVE may send to (:mod:`dicom_ai.network.qr`).
    counters : ReceiverCounters, optional
        DIMSE traffic counters for ``/metrics`` (shared by the receivers of a serve process).
    """

    def __init__(
        self,
        settings: DicomSettings,
        ingestor: Ingestor,
        mpps: MppsService,
        *,
        handed: bool = False,
        on_connection_closed: Callable[[], None] | None = None,
        destinations: Sequence[Destination] = (),
        counters: ReceiverCounters | None = None,
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.ingestor = ingestor
        self.mpps = mpps
        self.handed = handed
        self.on_connection_closed = on_connection_closed
        self._server: _Server | None = None
        self._previous_tempdir: str | None = None
        # Audit rows are written by the auditor's own thread, never on an association's.
        self.auditor = Auditor(ingestor.db)
        self.audit = handlers.AssociationAudit(self.auditor, ingestor.db)
        self.qr = QueryRetrieveSCP(ingestor.store, ingestor.db, settings, destinations,
                                   audit=self.audit)

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        # Not add_supported_context (it revalidates every UID: with scp_contexts' own checks,
        # 158 ms of start-up, now 4 ms)
        # and not the `supported_contexts` setter (it drops the roles).
        ae._supported_contexts = supported_contexts(scp_contexts())
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.maximum_pdu_size
        ae.network_timeout = self.settings.network_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.acse_timeout = self.settings.network_timeout
        if self.settings.allowed_calling_aets:
            ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        return ae

    def _handlers(self) -> list[Any]:
        audit, counters = self.audit, self.counters
        return [
            (evt.EVT_C_ECHO, self._counted("echo", handlers.handle_echo)),
            (evt.EVT_C_STORE, handlers.handle_store, [self.ingestor, audit, counters]),
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
            (evt.EVT_CONN_CLOSE, self._connection_closed),
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

    def _connection_closed(self, event: evt.Event | None = None) -> None:
        """Report a finished connection (a notification handler: never raises)."""
        if self.on_connection_closed is not None:
            try:
                self.on_connection_closed()
            except Exception:
                LOGGER.exception("connection-closed callback failed")

    def handoff(self, client: socket.socket) -> None:
        """Serve a connection accepted elsewhere (the pool's balancer); takes ownership."""
        assert self._server is not None, "start() first"
        try:
            address = client.getpeername()
        except OSError:  # the peer left before we got to it
            client.close()
            self._connection_closed()
            return
        self._server.process_request(self._server.wrap(client), address)

    def start(self) -> tuple[str, int]:
        """Start listening in background threads.

        Returns
        -------
        tuple of (str, int)
            The bound address and port (useful when the configured port is 0).
        """
        # Stream each dataset to a file in the store's incoming/ folder, so accepting it is a
        # rename on the same filesystem (see DICOM-NOTES: pynetdicom deletes what we leave).
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Q/R identifiers hold patient names and IDs: pynetdicom must not log them.
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
        # We validate what we use ourselves; pydicom's per-value regex checks on read only
        # cost time on the ingest path (and log vendor quirks we tolerate anyway).
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.ingestor.store.incoming)
        ae = self._make_ae()
        # In a pool the balancer listens; this server's own socket is an unused loopback one.
        address = ("127.0.0.1", 0) if self.handed else (self.settings.host, self.settings.port)
        server = cast(_Server, ae.make_server(
            address,
            ae_title=self.settings.ae_title,
            ssl_context=server_ssl_context(self.settings),
            evt_handlers=self._handlers(),
            server_class=_Server,
        ))
        server.connection_dropped = self._connection_closed
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
            tempfile.tempdir = self._previous_tempdir
        self.audit.close()
        self.auditor.close()
