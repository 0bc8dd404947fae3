"""pynetdicom's per-association costs, measured and replaced: reactor polling, UID checks.

Every pynetdicom association runs two threads that poll: the association reactor sleeps 1 ms
before each look at its queues, the DUL reactor sleeps 1 ms whenever it found nothing to do.
Measured on the 2-core machine, each open association costs the receiver about 9% of a core
even when idle (4 idle associations: 38% of a core, none: 2%), and under load the wake-ups
contend for the GIL with the threads that do the work: with 4 senders the receiver spent
17 ms of CPU per CT instance. :func:`install` replaces just those two sleeps:

- the DUL thread waits in ``select`` on its socket and on a wake-up socket pair that a put
  onto its queues from another thread (a primitive to send, an event) writes a byte to;
- the association thread waits on a ``threading.Event`` that a put onto its queues (a DIMSE
  message, an ACSE primitive) or a request to pause its reactor sets.

Both waits give up after a short bound, so the timers and kill flags pynetdicom checks in its
loops (ARTIM, network timeout, DUL death) keep working, only checked less often. pynetdicom's
code is not copied or changed: the two sleep calls are recognised by their caller's code
object, every other ``time.sleep`` in pynetdicom passes through untouched. The reactor's pause
checkpoint is replaced too, closing a race in pynetdicom's pause handshake (:class:`_Checkpoint`).

Negotiating an association that proposes a context per storage class (dcmtk ``storescu``'s
default) cost the receiver 79 ms of CPU against Orthanc's 16.5 ms; a bare pynetdicom acceptor
with our context table spent 41 ms, a quarter of it turning the same few hundred UID strings
into pydicom ``UID`` objects and checking them by regular expression (``set_uid``), again for
every association. :func:`install` remembers ``set_uid``'s result per value, its validators'
verdicts (``_config.VALIDATORS["UI"]`` and ``["AE"]``, the hook pynetdicom provides) per string,
and the regular-expression check a presentation context makes twice per transfer syntax it
adds (``UID.is_valid``, for the UIDs ``pynetdicom.presentation`` creates).

Receiving, pynetdicom reads each PDU in 4 KB ``recv`` calls appended to a growing buffer:
32 system calls for each 128 KB PDU ``storescu`` sends. :func:`install` reads straight into a
buffer of the PDU's size instead (up to :data:`READ_STEP`; a longer PDU grows its buffer by that
much at a time, so memory follows the bytes that arrived, never the length a peer declares), as
much as the kernel has ready per call. The same reads enforce what pynetdicom does not
(:func:`set_pdu_limits`, on by default): a PDU longer than we accept is aborted before it is
read, and a PDU must arrive within the association-request timer (ARTIM) before the association
and without a pause longer than the network timeout after. And for every
C-STORE it streams to disk, pynetdicom builds the file meta information as a pydicom dataset and
writes it through pydicom's file writer: a tenth of the receiving threads' Python time per
instance, for seven elements. :func:`install` encodes those bytes directly (the same bytes: a
test compares them with pydicom's). The DIMSE command sets of C-STORE went through pydicom too:
a C-STORE-RSP built as a dataset of nine elements and encoded twice (0.35 ms of CPU), a
C-STORE-RQ read element by element and converted through pydicom's hooks when pynetdicom reads
it (0.12 ms): with the file meta, 17-20% of the receiver's CPU per instance. :func:`install`
encodes a plain C-STORE-RSP (:func:`encode_store_response`) and decodes a plain C-STORE-RQ
(:func:`decode_store_request`) directly, the same bytes and the same dataset (tests compare
them with pynetdicom's), and leaves every other message, and any C-STORE with an element or
value out of the ordinary, to pynetdicom.

Nothing is changed on import: the entry points that talk DICOM (the receiver's start, the
requestor's associations in :mod:`~dicom_ai.network.scu`, the demo's stand-in PACS) call
:func:`install` with ``[dicom] tune_network``; it does nothing when that is false, nor, with
one warning, on a pynetdicom version other than :data:`TESTED_VERSIONS`. Each patch, the
upstream report it answers, and the upstream function it depends on (whose source is pinned
in :data:`UPSTREAM_DIGESTS`, so a test fails when pynetdicom changes it):

- reactor sleeps replaced by event-driven waits (``Association._run_reactor``,
  ``DULServiceProvider.run_reactor``): pynetdicom issues 60 and 650 / PR 651 and PR 139 (the
  loops' 1 ms sleeps; upstream change: wait on a condition and on ``select`` instead);
- the pause checkpoint (``Association._run_reactor``, ``release``, ``send_c_*``): pynetdicom
  issue 875 (upstream change: the reactor withdraws its "paused" before it goes on);
- ``set_uid``, ``_config.VALIDATORS["UI"/"AE"]`` and ``UID.is_valid`` remembered: pynetdicom
  issues 16 and 59 (negotiation cost; upstream change: an ``lru_cache`` on ``set_uid``);
- ``AssociationSocket.recv`` reading into one buffer, PDU limits and deadlines around
  ``DULServiceProvider._read_pdu_data``: no upstream issue found (nearest: issue 653, PDUs
  split across reads; upstream change: ``recv_into`` and a length check after the header);
- an acceptor whose connection closed before its A-ASSOCIATE-RQ ended at once
  (``DULServiceProvider.run_reactor``): no upstream issue found;
- the file meta of a streamed C-STORE encoded directly (``DIMSEMessage.decode_msg``'s
  ``create_file_meta`` and ``write_file_meta_info``): no upstream issue found;
- a plain C-STORE-RSP sent without pydicom (``DIMSEServiceProvider.send_msg``, replicating
  ``DIMSEMessage.primitive_to_message`` and ``encode_msg``, skipping an ``EVT_DIMSE_SENT``
  whose only handler is pynetdicom's ``_send_c_store_rsp``, which does nothing) and a plain
  C-STORE-RQ command set decoded without pydicom's reader (``dsutils.decode`` as
  ``DIMSEMessage.decode_msg`` calls it): no upstream issue found (nearest: pynetdicom issue
  59; upstream change: direct codecs for the fixed command sets in ``dimse_messages``);
- pynetdicom's logging handlers (``standard_dimse_*_handler``, ``standard_pdu_*_handler``) not
  triggered while their logger is quiet (``events.trigger``, :func:`_quiet_trigger`): no
  upstream issue found (upstream change: check ``LOGGER.isEnabledFor`` before formatting);
- C-STORE requests answered on the DUL thread that read them, and a C-GET's pending responses
  queued without waking the caller (per association, :func:`handle_stores_in_reader`: the
  receiver's associations and C-GET's; ``DIMSEServiceProvider.receive_primitive`` and
  ``get_msg``, ``Association._serve_request``, ``_c_store_scp`` and
  ``_wrap_get_move_responses``): no upstream issue found (upstream change: an option to serve
  C-STORE requests in the DUL thread when no asynchronous operations are negotiated).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, NamedTuple, cast

import pynetdicom
from pydicom import config as pydicom_config
from pydicom import hooks as _pydicom_hooks
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom import _handlers as _pynetdicom_handlers
from pynetdicom import association as _association
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dsutils as _dsutils
from pynetdicom import dul as _dul
from pynetdicom import events as _events
from pynetdicom import presentation as _presentation
from pynetdicom import utils as _utils
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_GET, C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

__all__ = ["MAX_ASSOCIATION_PDU", "READ_STEP", "TESTED_VERSIONS", "UPSTREAM", "UPSTREAM_DIGESTS",
           "decode_store_request", "encode_file_meta", "encode_store_response",
           "handle_stores_in_reader", "install", "installed", "is_tested_version",
           "set_pdu_limits", "upstream_digest"]

LOGGER = logging.getLogger(__name__)

#: Longest wait between the loops' own checks (timers, kill flags, the DUL thread's death).
DUL_WAIT = 0.02
ASSOCIATION_WAIT = 0.05

_WAKE_EVENT = "_dicom_ai_wake"  # Association: threading.Event for its reactor thread
_WAKE_PAIR = "_dicom_ai_wake_pair"  # DULServiceProvider: (read, write) sockets

#: The most one PDU read allocates ahead of the bytes that arrived. A PDU up to this long is
#: read into one buffer of its size (the single-PDU fast path: ``storescu`` sends 16 or 128 KB).
READ_STEP = 1 << 20
#: Longest PDU accepted other than P-DATA-TF (A-ASSOCIATE-RQ/AC/RJ, A-RELEASE-RQ/RP, A-ABORT).
#: The largest legitimate one, an A-ASSOCIATE-RQ of 128 presentation contexts (the most PS3.8
#: allows) each proposing all 39 transfer syntaxes pydicom knows, with a role selection item per
#: context, is 142 KB; user identity items add at most 128 KB more.
MAX_ASSOCIATION_PDU = 1 << 20

_P_DATA_TF = 0x04
_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
# A-ABORT (PS3.8 9.3.8): source 2, the UL service-provider; reason 6, invalid PDU parameter value.
_ABORT_SOURCE, _INVALID_PARAMETER = 0x02, 0x06
# States in which the DUL's ARTIM timer runs (PS3.8 9.2, table 9-10): awaiting the
# A-ASSOCIATE-RQ (Sta2) and awaiting the transport close (Sta13). And Sta1: pynetdicom reads a
# new connection's first bytes before it handles the connection's event (Evt5, which starts
# ARTIM and enters Sta2); the timer then reports its whole timeout as remaining.
_ARTIM_STATES = ("Sta1", "Sta2", "Sta13")
_PDU_READ = "_dicom_ai_pdu_read"  # AssociationSocket: the _PduRead of the PDU being read
_PDATA_LIMIT = "_dicom_ai_pdata_limit"  # AssociationSocket: our maximum P-DATA-TF length

#: pynetdicom versions (prefixes) the tuning was written for and tested with.
TESTED_VERSIONS = ("3.0.",)

_lock = threading.Lock()
_installed = False
_refused = False  # an untested pynetdicom was reported (once per process)
_pdu_limits = True
#: The upstream functions the tuning replaces, wraps or depends on, as pynetdicom defines them
#: (captured on import, before any :func:`install`; tests compare ours with some of them).
UPSTREAM: dict[str, Callable[..., Any]] = {
    "recv": AssociationSocket.recv,
    "read_pdu_data": DULServiceProvider._read_pdu_data,
    "dul_run_reactor": DULServiceProvider.run_reactor,
    "association_init": Association.__init__,
    "association_run_reactor": Association._run_reactor,
    "association_release": Association.release,
    "send_c_echo": Association.send_c_echo,
    "set_uid": _utils.set_uid,
    "decode_msg": _dimse_messages.DIMSEMessage.decode_msg,
    "send_msg": DIMSEServiceProvider.send_msg,
    "primitive_to_message": _dimse_messages.DIMSEMessage.primitive_to_message,
    "encode_msg": _dimse_messages.DIMSEMessage.encode_msg,
    "send_c_store_rsp_logged": _pynetdicom_handlers._send_c_store_rsp,
    "decode": _dsutils.decode,
    "trigger": _events.trigger,
    "standard_dimse_recv_handler": standard_dimse_recv_handler,
    "standard_dimse_sent_handler": standard_dimse_sent_handler,
    "standard_pdu_recv_handler": standard_pdu_recv_handler,
    "standard_pdu_sent_handler": standard_pdu_sent_handler,
    "receive_primitive": DIMSEServiceProvider.receive_primitive,
    "get_msg": DIMSEServiceProvider.get_msg,
    "wrap_get_move_responses": Association._wrap_get_move_responses,
    "c_store_scp": Association._c_store_scp,
    "serve_request": Association._serve_request,
}
#: SHA-256 of each :data:`UPSTREAM` function's source in pynetdicom 3.0.4 (see
#: :func:`upstream_digest`): a test fails when one changes, so its patch is re-checked.
UPSTREAM_DIGESTS = {
    "recv": "6bc20a33b1b7cfe76d4ad4407ca242563bc6206fde4b4e1cf7a2fbb1f11d621d",
    "read_pdu_data": "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    "dul_run_reactor": "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "association_init": "eb07516b8009ad8fa338201dea39578380fbf9f2c59fa5e368e20250eb97c4ea",
    "association_run_reactor":
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    "association_release": "c7d713502b77d70284320ac20245444b78f49a9d37b6a351d38e18344edaae43",
    "send_c_echo": "664d0e9b0ab20c53dc5acc3b71c25efb7124ba2d9636b95fcac0fce9ef2f2089",
    "set_uid": "f917a8035170f79262606ce81ff903350ae59d272c75d6d15684d9dcde3d178b",
    "decode_msg": "f51c777e841a76beeaadfe3015bd4f4a68387229a72f13f3a3b7846d01d72284",
    "send_msg": "a839cf2fb46976d9da29cf06fea41c04416b38d14fab612af12e5d869bd5b3f0",
    "primitive_to_message": "71fd61d5997f0f0c38abc2d383c4c6457f9c770468288aab04eb82a04d00ce00",
    "encode_msg": "73000c902c52832dab302ddb3bc274ea93d205a810a197225dd87d4c1212ba57",
    "send_c_store_rsp_logged":
        "87318c9364c686d4df91c158b30c62cc96fb0daca61252b5682bc0abc803a545",
    "decode": "33aaa74edebf31884a6626b1df7173cc52e9a26f7e00d78fe95247c9f8e24e49",
    "trigger": "b97f8a75e8affaa01693856a8cbeb7aea6d3b4641cec8ca1975c15b0eea76690",
    "standard_dimse_recv_handler":
        "cfacb737b7499b6f5e75f86e2a6cdc65d3148cdb199119092cfac1b66b752797",
    "standard_dimse_sent_handler":
        "5702b6a66a3f1acb24f4ca010a3c90efb82252d7cefe79ba4d0f6d866fb326e2",
    "standard_pdu_recv_handler":
        "916f709ee3e06a749b6d6586cfbb19f9af72915a71f549045825397d4873a0d2",
    "standard_pdu_sent_handler":
        "5193cd6183c0472958c6a62a1d50fadb3b30bedf46731e40662eb847a4b8d13a",
    "receive_primitive": "5f99c86b14a15cefa87d914cda3591ec4d636d4c53a982e945ec9c1828c6e43f",
    "get_msg": "890e3e04283f5aeb756236f1a4dd35d3a10bbdd52f3efa3f3950c01f47bd2b34",
    "wrap_get_move_responses":
        "d023a7bdadd24d59eb754f9d3d068b282311d32dcbb1f2a28b4cbe1bc76aafd9",
    "c_store_scp": "9361a649f8ef2b1def749e14aff4bbc35134c63677d265b16bab08f39ce6199a",
    "serve_request": "2f24c1759cdf6c8c433094f2a8dd8144f76f5547f03daed7b94e0f78bc12f877",
}


def upstream_digest(function: Callable[..., Any]) -> str:
    """SHA-256 of a function's source (what :data:`UPSTREAM_DIGESTS` records)."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def is_tested_version(version: str | None = None) -> bool:
    """Whether `version` (default: the installed pynetdicom's) is a tested one."""
    return (version or pynetdicom.__version__).startswith(TESTED_VERSIONS)


def installed() -> bool:
    """Whether :func:`install` has replaced the reactors' polling in this process."""
    return _installed


def install(enabled: bool = True) -> bool:
    """Apply the tuning of this module's docstring to pynetdicom, process-wide (idempotent).

    Event-driven waits for both reactor threads and a race-free pause checkpoint, remembered UID
    conversions and checks, PDUs read with ``recv_into`` in bounded steps and checked against
    our limits (:func:`set_pdu_limits`), an acceptor whose connection closed before its
    A-ASSOCIATE-RQ ended at once, file meta and plain C-STORE command sets encoded and decoded
    directly; for every association of the process, acceptor and requestor alike, created after
    the call.

    Parameters
    ----------
    enabled : bool
        ``[dicom] tune_network``: false leaves pynetdicom as it is (a tuning installed earlier
        in the process stays: it cannot be taken back).

    Returns
    -------
    bool
        Whether the tuning is installed in this process after the call. On a pynetdicom
        version not in :data:`TESTED_VERSIONS` nothing is installed, with one warning per
        process.
    """
    global _installed, _refused
    if not enabled:
        return _installed
    with _lock:
        if _installed:
            return True
        if not is_tested_version():
            if not _refused:
                _refused = True
                LOGGER.warning("pynetdicom %s: network tuning not installed (tested with %s); "
                               "running stock pynetdicom", pynetdicom.__version__,
                               ", ".join(f"{v}x" for v in TESTED_VERSIONS))
            return False
        dul_code = DULServiceProvider.run_reactor.__code__
        association_code = Association._run_reactor.__code__
        _association.time = _SleepHook(association_code, _association_wait)  # type: ignore[attr-defined,assignment]
        _dul.time = _SleepHook(dul_code, _dul_wait)  # type: ignore[attr-defined,assignment]
        original_init = Association.__init__
        original_dul_run = DULServiceProvider.run_reactor

        def wired_init(self: Association, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            _wire(self)

        def run_reactor(self: DULServiceProvider) -> None:
            read, write = socket.socketpair()
            read.setblocking(False)
            write.setblocking(False)
            setattr(self, _WAKE_PAIR, (read, write))
            try:
                original_dul_run(self)
            finally:
                setattr(self, _WAKE_PAIR, None)
                read.close()
                write.close()
                assoc = self.assoc
                if (assoc.is_acceptor and assoc.requestor.primitive is None
                        and self.to_user_queue.empty()):
                    # The connection ended before an A-ASSOCIATE-RQ: without this the acceptor's
                    # thread (a slot of maximum_associations) waits for one until acse_timeout.
                    self.to_user_queue.put(cast(Any, None))  # its "no request"
                # The association reactor checks whether its DUL thread is still alive.
                _wake_association(assoc)

        Association.__init__ = wired_init  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = run_reactor  # type: ignore[method-assign]
        for vr in ("UI", "AE"):
            _config.VALIDATORS[vr] = _cached_check(_config.VALIDATORS[vr])
        original_set_uid = _utils.set_uid
        cached_set_uid = _cached_set_uid(original_set_uid)
        for name, module in list(sys.modules.items()):  # each module imported it by name
            if name.startswith("pynetdicom") and getattr(module, "set_uid", None) is (
                    original_set_uid):
                module.set_uid = cached_set_uid  # type: ignore[attr-defined]
        _presentation.UID = _CheckedUID  # type: ignore[attr-defined]
        AssociationSocket.recv = _recv_bounded  # type: ignore[method-assign]
        # The PDU checks rely on how 3.0's _read_pdu_data calls recv (header, then body).
        DULServiceProvider._read_pdu_data = _pdu_read(  # type: ignore[method-assign,assignment]
            DULServiceProvider._read_pdu_data)
        _dimse_messages.create_file_meta = _FileMeta  # type: ignore[attr-defined,assignment]
        _dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[attr-defined]
        DIMSEServiceProvider.send_msg = _send_msg(  # type: ignore[method-assign,assignment]
            DIMSEServiceProvider.send_msg)
        _dimse_messages.decode = _decode_command  # type: ignore[attr-defined]
        _events.trigger = _quiet_trigger(_events.trigger)
        _installed = True
        return True


class _FileMeta(NamedTuple):
    """What pynetdicom's ``create_file_meta`` is given, kept as plain values."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION


def _write_file_meta(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """pydicom's ``write_file_meta_info``, encoding a :class:`_FileMeta` directly."""
    if isinstance(file_meta, _FileMeta):
        encoded = encode_file_meta(file_meta)
        if encoded is not None:
            fp.write(encoded)
            return
        file_meta = create_file_meta(**file_meta._asdict())
    write_file_meta_info(fp, file_meta, enforce_standard)


def encode_file_meta(meta: _FileMeta) -> bytes | None:
    """The File Meta Information group (PS3.10 7.1) as pydicom writes it, or ``None``.

    Explicit VR Little Endian, in tag order, with its group length; UIDs padded with NUL, the
    version name with a space. ``None`` for a value this fast path does not cover (empty or
    not ASCII): the caller then uses pydicom.
    """
    values = [_even(meta.sop_class_uid, b"\0"), _even(meta.sop_instance_uid, b"\0"),
              _even(meta.transfer_syntax, b"\0"), _even(meta.implementation_uid, b"\0"),
              _even(meta.implementation_version, b" ")]
    if any(v is None for v in values):
        return None
    sop_class, sop_instance, syntax, implementation, version = cast(list[bytes], values)
    body = b"".join((
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _short(0x0002, b"UI", sop_class), _short(0x0003, b"UI", sop_instance),
        _short(0x0010, b"UI", syntax), _short(0x0012, b"UI", implementation),
        _short(0x0013, b"SH", version),
    ))
    return _short(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 element whose VR has a 2-byte length."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: str | None, pad: bytes) -> bytes | None:
    if not value or not value.isascii():
        return None
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


class _CheckedUID(UID):
    """pydicom's UID with ``is_valid`` remembered per string (it is a regular expression)."""

    @property
    def is_valid(self) -> bool:
        return _uid_is_valid(str(self))


@functools.lru_cache(maxsize=4096)
def _uid_is_valid(text: str) -> bool:
    return UID(text).is_valid


def set_pdu_limits(enabled: bool) -> None:
    """Switch the PDU length limits and read deadlines of :func:`install` on or off.

    On (the default), for every association of the process:

    - a P-DATA-TF PDU longer than our Maximum Length (PS3.8 D.1; ``maximum_pdu_size``, when not
      0) or any other PDU longer than :data:`MAX_ASSOCIATION_PDU` is answered with an A-ABORT
      (service provider, invalid PDU parameter value) and its connection closed, before
      anything is allocated for it;
    - a PDU must arrive whole before the ARTIM timer (PS3.8 9.1.5) expires in the states where
      it runs (awaiting the A-ASSOCIATE-RQ, awaiting the close), and with no pause longer than
      the network timeout: otherwise the connection is closed. (pynetdicom blocks in ``recv``
      until a PDU is complete, where neither timer is looked at: a peer that declares a length
      and stops sending held its thread and association slot for good.)

    Off, PDUs are read as pynetdicom reads them, still bounded by the bytes that arrived.
    pynetdicom 3.0.4 checks neither (no upstream issue found); the upstream change would be a
    length check in ``DULServiceProvider._read_pdu_data`` between its header and body reads.
    """
    global _pdu_limits
    _pdu_limits = enabled


class _PduRead:
    """The PDU being read on one connection: what its reads may wait, and which read is next."""

    __slots__ = ("deadline", "header", "idle")

    def __init__(self, deadline: float | None, idle: float | None) -> None:
        self.deadline = deadline  # time.monotonic() by which the whole PDU must have arrived
        self.idle = idle  # the longest pause allowed between two of its bytes
        self.header = True  # the next recv is the 6-byte PDU header

    def wait_seconds(self) -> float | None:
        """How long the next read may wait for bytes (None: for ever; <= 0: no longer)."""
        if self.deadline is None:
            return self.idle
        left = self.deadline - time.monotonic()
        return left if self.idle is None else min(left, self.idle)


def _pdu_read(original: Callable[[DULServiceProvider], None]
              ) -> Callable[[DULServiceProvider], None]:
    """``DULServiceProvider._read_pdu_data``, its two socket reads bounded (see set_pdu_limits)."""

    def read_pdu_data(self: DULServiceProvider) -> None:
        transport = self.socket
        if transport is None or not _pdu_limits:
            original(self)
            return
        deadline = None
        artim = self.artim_timer
        if self.state_machine.current_state in _ARTIM_STATES and artim.timeout is not None:
            deadline = time.monotonic() + max(0.0, artim.remaining)
        setattr(transport, _PDU_READ, _PduRead(deadline, self.network_timeout))
        try:
            original(self)
        finally:
            setattr(transport, _PDU_READ, None)

    return read_pdu_data


def _recv_bounded(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """`nr_bytes` from the peer, fewer only if the connection broke (what pynetdicom expects).

    Memory grows with the bytes that arrive (:data:`READ_STEP` at most ahead of them), whatever
    length is asked for. Within ``_read_pdu_data`` (see :func:`set_pdu_limits`) the PDU header is
    checked against our limits (an oversized PDU is aborted and reads as a closed connection)
    and the reads give up at the PDU's deadline (returning what arrived: a closed connection to
    pynetdicom). Otherwise it blocks until all have arrived; socket errors propagate as before.
    """
    sock = cast(socket.socket, self.socket)
    pdu: _PduRead | None = getattr(self, _PDU_READ, None)
    data = _read(sock, nr_bytes, pdu)
    if pdu is None:
        return data
    left = pdu.wait_seconds() if len(data) < nr_bytes else None
    if left is not None and left <= 0:
        LOGGER.warning("no complete PDU from %s in time (%s): connection closed", _peer(sock),
                       "association request timeout" if pdu.deadline is not None
                       and pdu.deadline <= time.monotonic() else "network timeout")
    if pdu.header:
        pdu.header = False
        if len(data) == nr_bytes == 6 and _oversized(self, sock, data):
            return bytearray()  # reads as a connection closed before the header: Evt17
    return data


def _read(sock: socket.socket, nr_bytes: int, pdu: _PduRead | None) -> bytearray:
    """Up to `nr_bytes`, in buffers of at most READ_STEP more than has arrived."""
    buffer = bytearray(min(nr_bytes, READ_STEP))
    view = memoryview(buffer)
    received = 0
    try:
        while received < nr_bytes:
            if received == len(buffer):  # a PDU longer than READ_STEP: one more step
                view.release()
                buffer += bytes(min(nr_bytes - received, READ_STEP))
                view = memoryview(buffer)
            count = _recv_into(sock, view[received:], pdu)
            if not count:  # closed by the peer, or out of time: what arrived
                break
            received += count
    finally:
        view.release()
    if received < len(buffer):
        del buffer[received:]
    return buffer


def _recv_into(sock: socket.socket, view: memoryview, pdu: _PduRead | None) -> int:
    """One ``recv_into``; with `pdu`, waiting no longer than it allows (0: out of time)."""
    if pdu is None:
        return sock.recv_into(view)
    if isinstance(sock, ssl.SSLSocket):  # no MSG_DONTWAIT: a socket timeout for this read
        timeout = pdu.wait_seconds()
        if timeout is not None and timeout <= 0:
            return 0
        previous = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            return sock.recv_into(view)
        except TimeoutError:
            return 0
        finally:
            sock.settimeout(previous)
    while True:
        try:  # the fast path: the bytes are there (one system call, as before)
            return sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        timeout = pdu.wait_seconds()
        if timeout is not None and timeout <= 0:
            return 0
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(None if timeout is None else max(1, int(timeout * 1000))):
            return 0


def _oversized(transport: AssociationSocket, sock: socket.socket, header: bytearray) -> bool:
    """Whether the PDU `header` announces is longer than we accept; if so, abort it."""
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type == _P_DATA_TF:
        limit = getattr(transport, _PDATA_LIMIT, None)
        if limit is None:  # fixed before negotiation; looked up once per connection
            assoc = transport.assoc
            local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
            limit = local.maximum_length or 0
            setattr(transport, _PDATA_LIMIT, limit)
        if not limit or length <= limit:
            return False
    elif pdu_type not in _PDU_TYPES or length <= MAX_ASSOCIATION_PDU:
        return False  # an unknown type has no body read: pynetdicom reports it
    else:
        limit = MAX_ASSOCIATION_PDU
    LOGGER.warning("PDU of type 0x%02X from %s declares %d bytes, more than the %d accepted: "
                   "aborted", pdu_type, _peer(sock), length, limit)
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = _ABORT_SOURCE, _INVALID_PARAMETER
    with contextlib.suppress(OSError, ValueError):
        sock.settimeout(1.0)  # the connection is closed next: never block on a full buffer
        sock.sendall(abort.encode())
    return True


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError):
        return "a closed connection"


def _cached_check(check: Callable[[Any], tuple[bool, str]]
                  ) -> Callable[[Any], tuple[bool, str]]:
    """`check` (a validator: value -> (valid, reason)) remembered per string."""
    remembered = functools.lru_cache(maxsize=4096)(check)

    def cached(value: Any) -> tuple[bool, str]:
        # Only strings: the verdict depends on nothing but the text (and a setting,
        # ENFORCE_UID_CONFORMANCE, fixed before the first association).
        if isinstance(value, str):
            return remembered(str(value))
        return check(value)

    return cached


def _cached_set_uid(set_uid: Callable[..., UID | None]) -> Callable[..., UID | None]:
    """pynetdicom's ``set_uid`` (value -> validated UID) remembered per value and options.

    A refused value raises every time (nothing is cached for it); a non-conformant one is
    logged once. A UID that carries a private transfer syntax's encoding is not cached.
    """
    remembered = functools.lru_cache(maxsize=4096)(set_uid)

    def cached(value: Any, *args: Any, **kwargs: Any) -> UID | None:
        if type(value) in (str, bytes) or (
                type(value) is UID and not hasattr(value, "_PRIVATE_TS_ENCODING")):
            return remembered(value, *args, **kwargs)
        return set_uid(value, *args, **kwargs)

    return cached


class _SleepHook:
    """Stands in for the ``time`` module inside one pynetdicom module.

    ``sleep`` called from the reactor loop whose code object is `code` becomes `wait(owner,
    seconds)`, where the owner is the loop's thread object (both reactors run in their own
    thread); every other attribute and call is the real ``time`` module's.
    """

    def __init__(self, code: Any, wait: Callable[[Any, float], None]) -> None:
        self._code = code
        self._wait = wait

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if sys._getframe(1).f_code is self._code:
            self._wait(threading.current_thread(), seconds)
        else:
            time.sleep(seconds)


class _Checkpoint(threading.Event):
    """The association reactor's pause checkpoint, with pynetdicom's pause race closed.

    ``send_c_*`` (and ``release``) clear the checkpoint, then spin until the reactor sets
    ``_is_paused``; the reactor sets it just before waiting on the checkpoint and resets it
    after. A reactor released by one request's resume had already said "paused", so when the
    caller sent its next request at once, it read that stale flag, went ahead, and the reactor
    (about to take one message off the queue) could take the response meant for the caller:
    "Received unexpected C-ECHO service message", then a DIMSE timeout (pynetdicom issue 875;
    seen here with pynetdicom alone once in about 4000 back-to-back C-ECHOs on a loaded
    machine, and in every run of 2000 while the reactor was woken at each resume). Here the
    released reactor first withdraws its "paused" and only goes on if no pause was asked for
    meanwhile; otherwise it pauses again. A pause request (``clear``) also wakes a reactor
    waiting for work.
    """

    def __init__(self, assoc: Association, wake: threading.Event) -> None:
        super().__init__()
        self._assoc = assoc
        self._wake = wake

    def clear(self) -> None:
        if threading.current_thread() is self._assoc:
            # The reactor pausing itself (its network-timeout A-RELEASE) is paused by
            # definition, and it is the one that would have to say so to its own spin.
            self._assoc._is_paused = True
        super().clear()
        self._wake.set()

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread() is not self._assoc:
            return super().wait(timeout)
        while True:
            if not super().wait(timeout):
                return False
            self._assoc._is_paused = False  # a caller that looks now waits for the next pause
            if self.is_set():  # and no pause was asked for before that
                return True
            self._assoc._is_paused = True


def _wire(assoc: Association) -> None:
    """Make the puts that concern each reactor wake it."""
    wake = threading.Event()
    setattr(assoc, _WAKE_EVENT, wake)
    checkpoint = _Checkpoint(assoc, wake)
    if assoc._reactor_checkpoint.is_set():
        checkpoint.set()
    assoc._reactor_checkpoint = checkpoint
    dul = assoc.dul
    # The association thread reads DIMSE messages and ACSE primitives the DUL thread queues.
    _on_put(assoc.dimse.msg_queue, wake.set)
    _on_put(dul.to_user_queue, wake.set)
    # The DUL thread sends what other threads queue, and handles their transport events.
    _on_put(dul.to_provider_queue, lambda: _wake_dul(dul))
    _on_put(dul.event_queue, lambda: _wake_dul(dul))


def _on_put(q: queue.Queue[Any], wake: Callable[[], None]) -> None:
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    q.put = put_and_wake  # type: ignore[method-assign]


def _wake_association(assoc: Association) -> None:
    wake = getattr(assoc, _WAKE_EVENT, None)
    if wake is not None:
        wake.set()


def _wake_dul(dul: DULServiceProvider) -> None:
    if threading.current_thread() is dul:
        return  # its own puts: it looks at its queues before it waits again
    pair = getattr(dul, _WAKE_PAIR, None)
    if pair is not None:
        # Full buffer: bytes are already waiting, it will wake. Closed: it has stopped.
        with contextlib.suppress(OSError):
            pair[1].send(b"\0")


def _association_wait(assoc: Any, seconds: float) -> None:
    """The association reactor's pause: until something to do arrives, or the bound."""
    wake: threading.Event | None = getattr(assoc, _WAKE_EVENT, None)
    if wake is None:  # an association created before install()
        time.sleep(seconds)
        return
    # Clear first, then look: a put after the look sets the event again, so nothing is missed.
    wake.clear()
    if (assoc.dimse.msg_queue.empty() and assoc.dul.to_user_queue.empty()
            and assoc._reactor_checkpoint.is_set() and not assoc._kill):
        wake.wait(ASSOCIATION_WAIT)


def _dul_wait(dul: Any, seconds: float) -> None:
    """The DUL reactor's pause: until data arrives, another thread queues work, or the bound."""
    pair = getattr(dul, _WAKE_PAIR, None)
    transport = dul.socket
    sock = getattr(transport, "socket", None)
    if pair is None or sock is None:  # not connected yet, or already closed
        time.sleep(seconds)
        return
    if not (dul.to_provider_queue.empty() and dul.event_queue.empty()) or dul._kill_thread:
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes select cannot see
    try:
        ready, _, _ = select.select([sock, pair[0]], [], [], DUL_WAIT)
    except (OSError, ValueError):  # the socket was closed meanwhile
        time.sleep(seconds)
        return
    if pair[0] in ready:
        with contextlib.suppress(OSError):
            while pair[0].recv(4096):
                pass


# --- DIMSE command sets of C-STORE without pydicom datasets -----------------------------------

_TAG_COMMAND_FIELD = 0x0100
_C_STORE_RQ, _C_STORE_RSP, _NO_DATA_SET = 0x0001, 0x8001, 0x0101
_UID_CHARACTERS = "0123456789."
#: The elements a C-STORE-RQ command set may hold (PS3.7 9.3.1.1), by element number of group
#: 0000, with their VR; the last two are optional (a C-MOVE's sub-operation).
_STORE_RQ_VRS = {0x0000: "UL", 0x0002: "UI", 0x0100: "US", 0x0110: "US", 0x0700: "US",
                 0x0800: "US", 0x1000: "UI", 0x1030: "AE", 0x1031: "US"}
_STORE_RQ_REQUIRED = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000))
_STORE_RQ_TAGS = {element: BaseTag(element) for element in _STORE_RQ_VRS}
# pydicom's own conversion hooks: with any other in place, pydicom decodes (what they expect).
_default_raw_element_vr = _pydicom_hooks.raw_element_vr
_default_raw_element_value = _pydicom_hooks.raw_element_value
_hooks = _pydicom_hooks.hooks


def encode_store_response(primitive: Any) -> bytes | None:
    """The command set of a C-STORE-RSP, as pynetdicom encodes it, or ``None``.

    The seven elements PS3.7 9.3.1.2 lists for a response without an Error Comment or
    Offending Element: Command Group Length, Affected SOP Class UID, Command Field (0x8001),
    Message ID Being Responded To, Command Data Set Type (0x0101, none), Status and Affected
    SOP Instance UID, Implicit VR Little Endian, UIDs padded to even length with NUL: the bytes
    ``DIMSEMessage.primitive_to_message`` then ``encode_msg`` produce through pydicom (a test
    compares them). ``None`` for anything else (not a C-STORE response, an Error Comment or
    Offending Element, a UID missing or not digits and dots, a status outside 0..0xFFFF, a data
    set attached): the caller then uses pynetdicom's own encoding.

    Parameters
    ----------
    primitive : Any
        The DIMSE primitive to send (pynetdicom's ``C_STORE`` for a C-STORE response).

    Returns
    -------
    bytes or None
        The encoded command set, or ``None`` when this fast path does not cover `primitive`.
    """
    if (type(primitive) is not C_STORE or primitive.OffendingElement is not None
            or primitive.ErrorComment is not None or primitive._dataset_path is not None):
        return None
    message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    # An int or an IntEnum (a status enum's member) in range: struct packs them as pydicom does.
    if (not isinstance(message_id, int) or not isinstance(status, int)
            or not 0 <= status <= 0xFFFF):
        return None
    sop_class = _uid_bytes(primitive.AffectedSOPClassUID)
    sop_instance = _uid_bytes(primitive.AffectedSOPInstanceUID)
    if sop_class is None or sop_instance is None:
        return None
    body = b"".join((
        struct.pack("<HHI", 0x0000, 0x0002, len(sop_class)), sop_class,
        struct.pack("<HHIHHHIHHHIHHHIH", 0x0000, 0x0100, 2, _C_STORE_RSP,
                    0x0000, 0x0120, 2, message_id, 0x0000, 0x0800, 2, _NO_DATA_SET,
                    0x0000, 0x0900, 2, status),
        struct.pack("<HHI", 0x0000, 0x1000, len(sop_instance)), sop_instance,
    ))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _uid_bytes(value: Any) -> bytes | None:
    """A UID's value field (NUL-padded to even length), or None unless digits and dots."""
    if not isinstance(value, str) or not value or value.strip(_UID_CHARACTERS):
        return None
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _only_standard_handlers(assoc: Association, event: Any, standard: Any) -> bool:
    """Whether `event` has no handler bound on `assoc` other than pynetdicom's logging one."""
    handlers = cast(list[tuple[Any, Any]], assoc.get_handlers(event))
    return all(handler is standard for handler, _ in handlers)


def _send_msg(original: Callable[[DIMSEServiceProvider, Any, int], None]
              ) -> Callable[[DIMSEServiceProvider, Any, int], None]:
    """``DIMSEServiceProvider.send_msg``, sending a plain C-STORE-RSP without pydicom.

    pynetdicom builds every outgoing message's command set as a pydicom dataset (a dataset of
    nine empty elements, filled from the primitive, encoded twice: once to compute the group
    length, once to send): 0.35 ms of CPU per C-STORE response here, 4 us encoded directly.
    A response that :func:`encode_store_response` covers, whose command set fits one PDV, on an
    association where ``EVT_DIMSE_SENT`` has no handler but pynetdicom's own logging one (which
    does nothing for a C-STORE-RSP: ``_handlers._send_c_store_rsp``), is sent as the same P-DATA
    with its bytes encoded directly; anything else goes through `original`. No upstream issue found
    (nearest: pynetdicom issue 59, transfers slower than 0.8.1, which its maintainer found slower
    in the transfer itself, not only in negotiation); the upstream change would be a direct
    encoder for fixed command sets in ``DIMSEMessage``.
    """

    def send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        command = None
        if primitive.MessageIDBeingRespondedTo is not None:
            command = encode_store_response(primitive)
        if command is not None and _only_standard_handlers(
                self.assoc, evt.EVT_DIMSE_SENT, standard_dimse_sent_handler):
            limit = self.maximum_pdu_size
            if not limit or len(command) <= limit - 6:  # one PDV, as encode_msg splits it
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        original(self, primitive, context_id)

    return send_msg


def decode_store_request(encoded: bytes) -> Dataset | None:
    """A C-STORE-RQ command set decoded directly, as pydicom would present it, or ``None``.

    The dataset holds the same elements pynetdicom's ``decode`` (pydicom's ``read_dataset``)
    gives once each element has been read: the values pydicom's conversion produces (``UID``
    for UI, ``int`` for US/UL, a stripped ``str`` for AE), each a ``DataElement`` at the same
    file position, with the same original encoding. Only for a command set of the expected
    elements (group length, Affected SOP Class UID, Command Field 0x0001, Message ID, Priority,
    Command Data Set Type, Affected SOP Instance UID, optional Move Originator AE Title and
    Message ID), each once, in ascending order, with a value of the expected length, UIDs of
    digits and dots, an ASCII AE title; and only with pydicom's own conversion hooks in place.
    ``None`` otherwise: the caller then uses pydicom.

    Parameters
    ----------
    encoded : bytes
        The command set, Implicit VR Little Endian.

    Returns
    -------
    pydicom.dataset.Dataset or None
        The command set, or ``None`` when this fast path does not cover it.
    """
    if (pydicom_config.data_element_callback is not None or _hooks.raw_element_kwargs
            or _hooks.raw_element_vr is not _default_raw_element_vr
            or _hooks.raw_element_value is not _default_raw_element_value):
        return None
    elements: dict[BaseTag, Any] = {}
    offset, end, previous = 0, len(encoded), -1
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", encoded, offset)
        vr = _STORE_RQ_VRS.get(element) if group == 0 else None
        start = offset + 8
        offset = start + length
        if vr is None or element <= previous or not length or offset > end:
            return None
        previous = element
        value: Any
        if vr == "US":
            if length != 2:
                return None
            value = struct.unpack_from("<H", encoded, start)[0]
        elif vr == "UL":
            if length != 4:
                return None
            value = struct.unpack_from("<I", encoded, start)[0]
        else:
            text = encoded[start:offset].decode("latin-1")
            if not text.isascii():
                return None
            if vr == "UI":
                text = text.rstrip("\0 ")
                if not text or text.strip(_UID_CHARACTERS):
                    return None
                value = UID(text)
            else:  # AE: pydicom strips its non-significant spaces
                if "\\" in text:
                    return None
                value = text.strip()
        tag = _STORE_RQ_TAGS[element]
        # What pydicom's convert_raw_data_element constructs for each element it reads.
        elements[tag] = DataElement(tag, vr, value, start, False, already_converted=True)
    if not _STORE_RQ_REQUIRED.issubset(tag.element for tag in elements) or (
            elements[_STORE_RQ_TAGS[_TAG_COMMAND_FIELD]].value != _C_STORE_RQ):
        return None
    dataset = Dataset(elements, parent_encoding=default_encoding)
    dataset.set_original_encoding(True, True, default_encoding)
    return dataset


def _decode_command(bytestring: BytesIO, is_implicit_vr: bool, is_little_endian: bool,
                    deflated: bool = False) -> Dataset:
    """pynetdicom's ``dsutils.decode`` as ``DIMSEMessage.decode_msg`` calls it for a command set.

    A C-STORE-RQ command set that :func:`decode_store_request` covers is decoded directly
    (pydicom reads each element through its generic reader, then converts it through its hooks
    when first accessed, which pynetdicom's message handling does for all: 120 us here, against
    65 us for the direct decoding and the same accesses); anything else by pynetdicom's
    ``decode``. No upstream issue found (nearest: pynetdicom issue
    59); the upstream change would be a direct decoder for the C-STORE-RQ command set in
    ``DIMSEMessage.decode_msg``.
    """
    if is_implicit_vr and is_little_endian and not deflated:
        dataset = decode_store_request(bytestring.getvalue())
        if dataset is not None:
            bytestring.seek(0, 2)  # where pydicom's reader leaves it
            return dataset
    return cast(Dataset, UPSTREAM["decode"](bytestring, is_implicit_vr, is_little_endian,
                                             deflated))


# --- pynetdicom's logging handlers, skipped while their logger is quiet ------------------------

#: The events pynetdicom binds its own logging handlers to on every association
#: (``Association._bind_defaults`` with ``_config.LOG_HANDLER_LEVEL = "standard"``).
_LOGGING_EVENTS = frozenset((evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV,
                             evt.EVT_PDU_SENT))
_LOGGING_HANDLERS = frozenset((standard_dimse_recv_handler, standard_dimse_sent_handler,
                               standard_pdu_recv_handler, standard_pdu_sent_handler))
#: The logger those handlers write to (at DEBUG, and INFO for "Received Store Request").
_HANDLERS_LOGGER = _pynetdicom_handlers.LOGGER


def _quiet_trigger(original: Callable[..., Any]) -> Callable[..., Any]:
    """``events.trigger``, skipping pynetdicom's logging handlers when they would log nothing.

    pynetdicom triggers ``EVT_PDU_RECV`` for every PDU it reads, ``EVT_PDU_SENT`` for every one
    it sends, ``EVT_DIMSE_RECV``/``SENT`` for every message, and binds to each a handler that
    formats the PDU or message into lines (f-strings, UID names, pydicom attribute reads, under
    the association's lock) and hands them to ``LOGGER.debug``/``info``: 14% of the reading
    thread's time on a C-GET from Orthanc (11 PDUs of 16 KB per CT slice). dicom-ai keeps the
    ``pynetdicom`` logger at WARNING or above (:mod:`dicom_ai.logs`), where every line is
    dropped. An event whose only handlers are those four, while their logger is not enabled for
    INFO, is not triggered: the same log output, no event object, no formatting. Any other
    handler bound (a test's, an application's) and the event is triggered as before. No
    upstream issue found; the upstream change would be checking ``LOGGER.isEnabledFor`` in
    ``standard_*_handler`` (or ``_config.LOG_HANDLER_LEVEL = "none"``, which dicom-ai does not
    set because it is decided once per association and reads no logger).
    """

    def trigger(assoc: Association, event: Any, attrs: dict[str, Any] | None = None) -> Any:
        if event in _LOGGING_EVENTS and not _HANDLERS_LOGGER.isEnabledFor(logging.INFO):
            handlers = cast(list[tuple[Any, Any]], assoc.get_handlers(event))
            if all(handler in _LOGGING_HANDLERS for handler, _ in handlers):
                return None  # what trigger returns for a notification event
        return original(assoc, event, attrs)

    return trigger


# --- C-STORE sub-operations of a C-GET handled on the reading thread --------------------------

#: C-GET pending statuses (PS3.4 C.4.3.1.4): sub-operations continuing.
_PENDING = frozenset((0xFF00, 0xFF01))


class _Activity:
    """When the reading thread last finished a C-STORE of this association, and whether it is
    in one now (the requestor's DIMSE timeout counts from there)."""

    __slots__ = ("busy", "last")

    def __init__(self) -> None:
        self.busy = False
        self.last = time.monotonic()


def handle_stores_in_reader(assoc: Association) -> bool:
    """Answer the C-STOREs received on `assoc` on its reading (DUL) thread.

    pynetdicom decodes each received message on the association's DUL thread, queues it, and
    another thread takes it off the queue and runs the ``EVT_C_STORE`` handler: the acceptor's
    reactor thread (``Association._serve_request``), or for a C-GET the thread that called
    ``send_c_get`` (``Association._c_store_scp``); that thread queues the response, which the
    DUL thread then sends. Two thread hand-offs per instance, each a wake-up the scheduler and
    the GIL must grant (on a C-GET from Orthanc, the queue's notify alone was a fifth of the
    reading thread's GIL time on the loaded 2-core machine). A peer sends its next request only
    after our response (no asynchronous operations are negotiated: pynetdicom proposes none and
    answers a proposed window with 1 and 1), so the DUL thread has nothing else to do meanwhile:
    here it runs the same pynetdicom function itself, the moment the request is complete, and
    sends the response on its next loop. Only C-STORE requests are handled so; anything else is
    queued as before. On a C-GET, the pending C-GET responses (one per sub-operation from
    Orthanc) are queued without waking the caller, which only needs them with the final response
    (whose put wakes it, in order), and the caller's wait (``get_msg``, the DIMSE timeout)
    counts from the last C-STORE or pending response (and never runs out while a C-STORE is
    being handled), as it did when the caller handled each. The handler, its arguments and the
    response are pynetdicom's own: only the thread differs. No upstream issue found (nearest:
    the N-EVENT-REPORT special case in ``DIMSEServiceProvider.receive_primitive``, which starts
    a thread so as not to block the DUL); the upstream change would be an option to serve
    C-STORE requests in the DUL thread.

    Parameters
    ----------
    assoc : Association
        An association, before its first request arrives (the receiver's, from its server's
        request handler) or is sent (a C-GET's).

    Returns
    -------
    bool
        Whether the C-STOREs will be handled on the DUL thread: only with :func:`install`'s
        tuning in place (and so only on a tested pynetdicom).
    """
    if not _installed:
        return False
    dul, dimse = assoc.dul, assoc.dimse
    activity = _Activity()
    acceptor = assoc.is_acceptor
    queue_put = dimse.msg_queue.put  # with its wake-up (_wire)

    def put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        primitive = item[1] if type(item) is tuple and len(item) == 2 else None
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is None
                and threading.current_thread() is dul):
            activity.busy = True
            try:
                if acceptor:  # what the association's reactor does with a request
                    assoc._serve_request(primitive, cast(int, item[0]))
                else:  # what send_c_get's loop does with one
                    assoc._c_store_scp(primitive)
            except Exception as exc:
                # Not an OSError to the spool guard around us (it would take it for a failed
                # write): the DUL aborts the association, as for any error in its loop.
                raise RuntimeError(f"C-STORE sub-operation failed: {exc!r}") from exc
            finally:
                activity.last = time.monotonic()
                activity.busy = False
            return
        if (type(primitive) is C_GET and primitive.Status in _PENDING
                and threading.current_thread() is dul):
            # Queued without waking the caller: it only needs them with the final response
            # (whose put wakes it), and it waits on the queue, so nothing is lost or reordered.
            with dimse.msg_queue.mutex:
                dimse.msg_queue._put(item)
                dimse.msg_queue.unfinished_tasks += 1
            activity.last = time.monotonic()
            return
        queue_put(item, block, timeout)

    def get_msg(block: bool = False) -> tuple[int | None, Any]:
        # DIMSEServiceProvider.get_msg, its timeout counted from the last C-STORE handled.
        timeout = dimse.dimse_timeout
        if not block or timeout is None:
            return cast(tuple[int | None, Any], UPSTREAM["get_msg"](dimse, block))
        started = time.monotonic()
        while True:
            left = max(started, activity.last) + timeout - time.monotonic()
            if left <= 0 and not activity.busy:
                return None, None
            try:
                return cast(tuple[int | None, Any],
                            dimse.msg_queue.get(True, max(left, ASSOCIATION_WAIT)))
            except queue.Empty:
                continue

    dimse.msg_queue.put = put  # type: ignore[method-assign]
    dimse.get_msg = get_msg  # type: ignore[method-assign,assignment]
    return True
