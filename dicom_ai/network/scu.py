"""Sending: C-ECHO and C-STORE as a requestor (``dicom-ai send``, later the result outbox).

Each file is sent as it is stored, in its own transfer syntax, straight from disk (pynetdicom
streams a file path without decoding it). The contexts proposed are the (SOP class, transfer
syntax) pairs of the files; more than 128 pairs are spread over several associations.

With a :class:`Commitment`, the objects each association stored are then named in a Storage
Commitment Push Model N-ACTION on that association (PS3.4 J.3.2); a destination that answers
with its N-EVENT-REPORT on the same association (J.3.3) is heard for ``report_wait`` seconds,
others report on a new association to our receiver.

The C-STORE request names the dataset's SOP Class and Instance UIDs, as dcmtk does: a file
whose meta header says otherwise (PS3.10 7.1 requires them equal; some of pydicom's test files
and real exports differ) is sent through a temporary copy with its meta header corrected, the
dataset bytes unchanged, and a warning.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info, read_partial
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context
from pynetdicom import events as evt
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.status import STATUS_SUCCESS, STATUS_UNKNOWN, STATUS_WARNING, code_to_category

from dicom_ai.config import DicomSettings, Settings, validate_ae_title
from dicom_ai.dimse_status import Status
from dicom_ai.exceptions import ConfigError, NetworkError
from dicom_ai.network.contexts import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    VERIFICATION,
)
from dicom_ai.network.tuning import install as tune_pynetdicom

LOGGER = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255

_TARGET = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[0-9a-fA-F:]+\]|[^:]+):(?P<port>\d+)$")


@dataclass(frozen=True)
class Peer:
    """A remote application entity."""

    ae_title: str
    host: str
    port: int
    tls: bool = False


def resolve_peer(target: str, settings: Settings) -> Peer:
    """Turn ``NAME`` (a configured destination or source) or ``AET@HOST:PORT`` into a peer.

    Raises
    ------
    ConfigError
        If the name is unknown and the text is not ``AET@HOST:PORT``.
    """
    for dest in settings.destinations:
        if dest.name == target:
            return Peer(dest.ae_title, dest.host, dest.port, dest.tls)
    for source in settings.sources:
        if source.name == target:
            return Peer(source.ae_title, source.host, source.port)
    match = _TARGET.match(target)
    if match is None:
        known = sorted({d.name for d in settings.destinations} | {s.name for s in settings.sources})
        raise ConfigError(
            f"unknown target {target!r}: give AET@HOST:PORT or one of {known or 'no names'}"
        )
    try:
        aet = validate_ae_title(match["aet"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Peer(aet, match["host"].strip("[]"), int(match["port"]))


def client_ssl_context(settings: DicomSettings) -> ssl.SSLContext:
    """The TLS context for sending: verify the peer with ``tls_ca``; present our certificate."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca) if settings.tls_ca else None
    )
    context.check_hostname = False  # DICOM peers are addressed by IP; the CA check remains
    if settings.tls_cert is not None and settings.tls_key is not None:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def no_delay(assoc: Association) -> None:
    """Send each PDU at once (TCP_NODELAY).

    pynetdicom leaves Nagle's algorithm on: a small PDU written right after a large one (an SR
    after a heat-map image, a C-STORE response) then waits for the peer's delayed ACK, about
    40-50 ms each time on Linux.
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ConnectFailures(logging.Filter):
    """Takes pynetdicom's two ERROR lines about a TCP connection :func:`_associate` could not make.

    Every caller of :func:`_associate` reports a failed association itself, with the peer and
    what happens next (the outbox retries a PACS that is down forever, so pynetdicom's lines
    would repeat at every attempt). For associations of the AEs :func:`_associate` used, the
    operating system's reason is kept for the :class:`NetworkError` message (keyed by the
    association's DUL thread, which logs it) and the lines are dropped unless pynetdicom's
    logger is at DEBUG. Other associations (a C-MOVE sub-association pynetdicom makes for our
    Q/R SCP) keep pynetdicom's lines.
    """

    _LIMIT = 1000

    def __init__(self) -> None:
        super().__init__()
        self.reporting: weakref.WeakSet[AE] = weakref.WeakSet()
        self._reasons: dict[int | None, str] = {}
        self._lock = threading.Lock()

    def _ours(self, thread_id: int | None) -> bool:
        thread = next((t for t in threading.enumerate() if t.ident == thread_id), None)
        ae = getattr(getattr(thread, "assoc", None), "ae", None)
        return ae is not None and ae in self.reporting

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        failed = message.startswith("TCP Initialisation Error:")
        if not (failed or message.startswith("Association request failed: unable to connect")):
            return True
        if not self._ours(record.thread):
            return True
        if failed:
            with self._lock:
                if len(self._reasons) >= self._LIMIT:
                    self._reasons.clear()
                self._reasons[record.thread] = message.split(":", 1)[1].strip()
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)

    def reason(self, thread_id: int | None) -> str | None:
        """The connection error logged by `thread_id`, once."""
        with self._lock:
            return self._reasons.pop(thread_id, None)


_CONNECT_FAILURES = _ConnectFailures()
logging.getLogger("pynetdicom.transport").addFilter(_CONNECT_FAILURES)


def _associate(ae: AE, peer: Peer, settings: DicomSettings, **options: Any) -> Association:
    """Associate with `peer` (TLS when it says so, TCP_NODELAY); `options` go to pynetdicom
    (e.g. ``ext_neg`` role selection and ``evt_handlers`` for C-GET)."""
    tls_args = (client_ssl_context(settings), peer.host) if peer.tls else None
    # Event-driven association threads, cached UID checks, bounded PDU reads (tuning.py).
    tune_pynetdicom(settings.tune_network)
    _CONNECT_FAILURES.reporting.add(ae)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args,
                         **options)
    if not assoc.is_established:
        state = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        reason = _CONNECT_FAILURES.reason(getattr(assoc.dul, "ident", None))
        if reason is not None:
            raise NetworkError(f"cannot connect to {peer.ae_title}@{peer.host}:{peer.port}: "
                               f"{reason}")
        raise NetworkError(f"association with {peer.ae_title}@{peer.host}:{peer.port} {state}")
    no_delay(assoc)
    return assoc


def echo(peer: Peer, settings: DicomSettings) -> int:
    """Send a C-ECHO and return its status.

    Raises
    ------
    NetworkError
        If no association could be established or no response came.
    """
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(VERIFICATION)
    assoc = _associate(ae, peer, settings)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise NetworkError(f"no C-ECHO response from {peer.ae_title}")
    return int(status.Status)


@dataclass(frozen=True)
class FileToSend:
    """A DICOM file and the context it needs.

    ``sop_class_uid`` and ``sop_instance_uid`` are the dataset's (what the C-STORE request
    names); ``meta_differs`` is true when the file meta header names other UIDs.
    """

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    sop_instance_uid: str = ""
    meta_differs: bool = False


# -- Storage Commitment Push Model (PS3.4 annex J) ---------------------------------------------
#: N-ACTION Action Type ID "Request Storage Commitment" (PS3.4 J.3.2.1).
REQUEST_COMMITMENT = 1
#: N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3.1): all committed; some failed.
COMMITTED_ALL, COMMITTED_SOME_FAILED = 1, 2


@dataclass(frozen=True)
class CommitmentReport:
    """An N-EVENT-REPORT of the Storage Commitment Push Model, parsed (PS3.4 J.3.3.1)."""

    transaction_uid: str
    event_type: int
    committed: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int]]  # (SOP Class UID, SOP Instance UID, Failure Reason)


def commitment_request(transaction_uid: str, files: Iterable[FileToSend]) -> Dataset:
    """The N-ACTION Action Information: Transaction UID and Referenced SOP Sequence."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    references = []
    for item in files:
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.sop_class_uid
        ref.ReferencedSOPInstanceUID = item.sop_instance_uid
        references.append(ref)
    ds.ReferencedSOPSequence = references
    return ds


def parse_commitment_report(event_type: int, ds: Dataset | None) -> CommitmentReport:
    """Read an N-EVENT-REPORT's Event Information; ValueError if it is not a valid one."""
    if event_type not in (COMMITTED_ALL, COMMITTED_SOME_FAILED):
        raise ValueError(f"event type {event_type} is not a storage commitment result")
    if ds is None or not str(ds.get("TransactionUID", "") or ""):
        raise ValueError("no Transaction UID")
    committed = [(str(r.get("ReferencedSOPClassUID", "")),
                  str(r.get("ReferencedSOPInstanceUID", "")))
                 for r in ds.get("ReferencedSOPSequence", None) or []]
    failed = [(str(r.get("ReferencedSOPClassUID", "")), str(r.get("ReferencedSOPInstanceUID", "")),
               int(r.get("FailureReason", 0x0110) or 0x0110))
              for r in ds.get("FailedSOPSequence", None) or []]
    return CommitmentReport(str(ds.TransactionUID), event_type, committed, failed)


@dataclass
class Commitment:
    """Ask the destination to commit what each association stored.

    ``begin`` is called with a new Transaction UID and the files an association stored (success
    or warning) before the N-ACTION goes out, to record them (the report may reach another
    receiver first); if it raises, no N-ACTION is sent. ``report_wait`` is how long to stay on
    the association for an N-EVENT-REPORT sent on it.
    """

    begin: Callable[[str, list[FileToSend]], None]
    report_wait: float = 0.5


@dataclass
class CommitmentRequest:
    """One N-ACTION sent (or not): its transaction, the files named, and what came back."""

    transaction_uid: str
    files: list[FileToSend]
    error: str | None = None  # the N-ACTION failed (not sent, refused, no answer)
    report: CommitmentReport | None = None  # an N-EVENT-REPORT on the same association
    seconds_to_report: float | None = None


@dataclass
class SendReport:
    """Outcome of a send: counts by category and the files that did not succeed."""

    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    commitments: list[CommitmentRequest] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if every file was stored (success or warning)."""
        return not self.failures


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every file under `paths` (folders recursively, sorted)."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


_SOP_INSTANCE_UID_TAG = 0x00080018


def _past_sop_uids(tag: Any, vr: Any, length: Any) -> bool:
    return int(tag) > _SOP_INSTANCE_UID_TAG


def inspect(path: Path) -> FileToSend | None:
    """Read a file's meta header and its dataset's SOP UIDs; None if not a Part 10 file.

    The dataset is read only up to SOP Instance UID (0008,0018) (not at all when deflated).
    Where the dataset's SOP Class or Instance UID differs from the meta header's (PS3.10 7.1),
    the dataset's are sent, as dcmtk does, and a warning names both (UIDs only).
    """
    try:
        meta = read_file_meta_info(path)
        meta_class = str(meta.MediaStorageSOPClassUID)
        meta_instance = str(meta.MediaStorageSOPInstanceUID)
        transfer_syntax = str(meta.TransferSyntaxUID)
        sop_class, sop_instance = meta_class, meta_instance
        # pydicom inflates a deflated dataset whole before reading any of it: such a file
        # is sent under its meta header's UIDs, unread.
        if transfer_syntax != DeflatedExplicitVRLittleEndian:
            with path.open("rb") as fh:
                head = read_partial(fh, stop_when=_past_sop_uids)
            sop_class = str(head.get("SOPClassUID", "") or meta_class)
            sop_instance = str(head.get("SOPInstanceUID", "") or meta_instance)
    except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError):
        return None
    differs = (sop_class, sop_instance) != (meta_class, meta_instance)
    if differs:
        LOGGER.warning("file meta names SOP class %s instance %s, the dataset %s %s: "
                       "sending the dataset's", meta_class, meta_instance, sop_class,
                       sop_instance)
    return FileToSend(path, sop_class, transfer_syntax, sop_instance, differs)


def _corrected_copy(item: FileToSend, folder: Path) -> Path:
    """A copy of ``item.path`` whose meta header names the dataset's UIDs (dataset bytes as is).

    pynetdicom takes the C-STORE request's UIDs from the meta header of a streamed file.
    """
    header, offset = split_dataset(item.path)
    meta = FileMetaDataset(header)
    meta.MediaStorageSOPClassUID = UID(item.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(item.sop_instance_uid)
    target = folder / "send.dcm"
    with target.open("wb") as out, item.path.open("rb") as source:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
        source.seek(offset)
        shutil.copyfileobj(source, out)
    return target


def status_category(status: int) -> str:
    """A C-STORE or N-ACTION answer as ``success``, ``warning`` or ``failure`` (PS3.7 annex C).

    pynetdicom's ``code_to_category`` decides; every category but success and warning
    (pending, cancel, unknown) is a failure for a request that expects one final answer.
    """
    category = code_to_category(status) if status >= 0 else STATUS_UNKNOWN
    if category == STATUS_SUCCESS:
        return "success"
    if category == STATUS_WARNING:
        return "warning"
    return "failure"


def send_files(
    files: list[FileToSend],
    peer: Peer,
    settings: DicomSettings,
    progress: Callable[[FileToSend, str], None] | None = None,
    commitment: Commitment | None = None,
) -> SendReport:
    """C-STORE `files` to `peer`, each in its own transfer syntax.

    Parameters
    ----------
    files : list of FileToSend
        What to send (see :func:`inspect`).
    peer : Peer
        The receiver.
    settings : DicomSettings
        Our AE title and TLS material.
    progress : callable, optional
        Called after each file with the file and its status text (e.g. ``"0x0000"``).
    commitment : Commitment, optional
        Request Storage Commitment of what each association stored (PS3.4 J.3.2).

    Returns
    -------
    SendReport
        Counts by status; the report lists every file that failed and why, and the
        commitment requests made.
    """
    # Stream each file's dataset bytes as stored (no decode and re-encode, little memory).
    _config.STORE_SEND_CHUNKED_DATASET = True
    report = SendReport()
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files})
    per_association = MAX_CONTEXTS - (1 if commitment is not None else 0)
    for start in range(0, len(pairs), per_association):
        batch = set(pairs[start : start + per_association])
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = 0
        ae.requested_contexts = [build_context(c, [t]) for c, t in sorted(batch)]
        listener = _ReportListener()
        options: dict[str, Any] = {}
        if commitment is not None:
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
            options["evt_handlers"] = [(evt.EVT_N_EVENT_REPORT, listener.handle)]
        chunk = [f for f in files if (f.sop_class_uid, f.transfer_syntax_uid) in batch]
        try:
            assoc = _associate(ae, peer, settings, **options)
        except NetworkError as exc:
            for item in chunk:
                _record(report, item, "failure", str(exc), progress)
            continue
        try:
            failed_before = len(report.failures)
            for item in chunk:
                if not assoc.is_established:
                    _record(report, item, "failure", "association lost", progress)
                    continue
                try:
                    rsp = _send_one(assoc, item)
                except (ValueError, AttributeError) as exc:  # no accepted context for it
                    _record(report, item, "failure", str(exc), progress)
                    continue
                if "Status" not in rsp:
                    _record(report, item, "failure", "no response (timeout or abort)",
                            progress)
                    continue
                code = int(rsp.Status)
                _record(report, item, status_category(code), f"0x{code:04X}", progress)
            if commitment is not None:
                failed = {path for path, _ in report.failures[failed_before:]}
                stored = [item for item in chunk if str(item.path) not in failed]
                if stored:
                    report.commitments.append(
                        _request_commitment(assoc, stored, commitment, listener))
        finally:
            if assoc.is_established:
                assoc.release()
    return report


class _ReportListener:
    """Takes an N-EVENT-REPORT the destination sends on our own association (PS3.4 J.3.3)."""

    def __init__(self) -> None:
        self.expected: str | None = None
        self.report: CommitmentReport | None = None
        self.arrived = threading.Event()

    def handle(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """EVT_N_EVENT_REPORT on the requestor side: only the transaction just requested."""
        request = event.request
        try:
            parsed = parse_commitment_report(int(getattr(request, "EventTypeID", 0) or 0),
                                             event.event_information)
        except (ValueError, TypeError, AttributeError) as exc:
            LOGGER.warning("storage commitment report on our association refused: %s", exc)
            return (Status.NO_SUCH_EVENT_TYPE if "event type" in str(exc)
                    else Status.MISSING_ATTRIBUTE), None
        if parsed.transaction_uid != self.expected or self.arrived.is_set():
            LOGGER.warning("storage commitment report for transaction %.64r on our association "
                           "refused: not the one requested", parsed.transaction_uid)
            return Status.UNKNOWN_TRANSACTION, None
        self.report = parsed
        self.arrived.set()
        return Status.SUCCESS, None


def _request_commitment(assoc: Association, stored: list[FileToSend], commitment: Commitment,
                        listener: _ReportListener) -> CommitmentRequest:
    """N-ACTION "Request Storage Commitment" for `stored`, then a short wait for a report."""
    transaction_uid = str(generate_uid())
    request = CommitmentRequest(transaction_uid, stored)
    try:
        commitment.begin(transaction_uid, stored)
    except Exception as exc:  # e.g. the index is down: nothing requested, the sender retries
        request.error = f"cannot record the commitment transaction: {type(exc).__name__}"
        LOGGER.warning("storage commitment not requested: %s", request.error)
        return request
    listener.expected = transaction_uid
    if not assoc.is_established:
        request.error = "association lost before the storage commitment request"
        return request
    started = time.monotonic()
    try:
        status, _ = assoc.send_n_action(commitment_request(transaction_uid, stored),
                                        REQUEST_COMMITMENT, STORAGE_COMMITMENT_PUSH_MODEL,
                                        STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
    except (ValueError, AttributeError, RuntimeError) as exc:  # context refused
        request.error = f"storage commitment request not sent: {exc}"
        return request
    if "Status" not in status:
        request.error = "no storage commitment response (timeout or abort)"
        return request
    code = int(status.Status)
    if status_category(code) == "failure":
        request.error = f"storage commitment request refused: 0x{code:04X}"
        return request
    if listener.arrived.wait(commitment.report_wait):
        request.report = listener.report
        request.seconds_to_report = time.monotonic() - started
    return request


def _send_one(assoc: Association, item: FileToSend) -> Any:
    if not item.meta_differs:
        return assoc.send_c_store(item.path)
    with tempfile.TemporaryDirectory(prefix="dicom-ai-send-") as folder:
        return assoc.send_c_store(_corrected_copy(item, Path(folder)))


def _record(
    report: SendReport,
    item: FileToSend,
    category: str,
    detail: str,
    progress: Callable[[FileToSend, str], None] | None,
) -> None:
    report.sent += 1
    report.statuses[category] += 1
    if category == "failure":
        report.failures.append((str(item.path), detail))
    if progress is not None:
        progress(item, detail)
