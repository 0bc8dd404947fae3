"""Access control of the receiver over real associations: AE and host allow-lists, DICOM TLS.

Every test starts the real service (SQLite and PostgreSQL index) and talks to it with dcmtk or
a pynetdicom requestor; nothing is mocked. The TLS material is made with the ``openssl`` CLI.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file
from pydicom.filereader import dcmread
from pynetdicom import AE

from dicom_ai.config import DicomSettings, Settings
from dicom_ai.network.scu import Peer, echo, inspect, send_files
from dicom_ai.service import Service
from tests.conftest import missing, need_binary
from tests.peers import ENV

CALLED = "DICOM_AI"
VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (PS3.4 annex A.4)
TIMEOUT = 10  # seconds for any one association step; failures must come fast, not hang

MakeSettings = Callable[..., Settings]
StartService = Callable[[Settings], Service]


def _port(service: Service) -> int:
    assert service.address is not None
    return service.address[1]


def _echoscu(port: int, calling: str) -> subprocess.CompletedProcess[str]:
    """dcmtk ``echoscu`` from `calling` to the service."""
    return subprocess.run(
        [need_binary("echoscu"), "-to", str(TIMEOUT), "-aet", calling, "-aec", CALLED,
         "127.0.0.1", str(port)],
        env=ENV, capture_output=True, text=True, check=False, timeout=60,
    )


@dataclass
class Outcome:
    """How a pynetdicom C-ECHO attempt ended."""

    established: bool
    rejected: bool
    aborted: bool
    status: int | None


def _pynetdicom_echo(port: int, calling: str = "PYNETSCU",
                     context: ssl.SSLContext | None = None) -> Outcome:
    """Try a C-ECHO with a pynetdicom requestor (over TLS when `context` is given)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    tls_args = (context, "127.0.0.1") if context is not None else None
    assoc: Any = ae.associate("127.0.0.1", port, ae_title=CALLED, tls_args=tls_args)
    established = bool(assoc.is_established)
    status: int | None = None
    if established:
        rsp = assoc.send_c_echo()
        status = int(rsp.Status) if "Status" in rsp else None
        assoc.release()
    return Outcome(established, bool(assoc.is_rejected), bool(assoc.is_aborted), status)


# -- calling AE title allow-list ----------------------------------------------------------------
def test_calling_ae_allow_list(make_settings: MakeSettings, start_service: StartService) -> None:
    """Only listed calling AE titles get an association; a rejection leaves the service up."""
    service = start_service(make_settings(dicom={"allowed_calling_aets": ["GOODAE"]}))
    port = _port(service)

    bad = _echoscu(port, "BADAE")
    assert bad.returncode != 0, bad.stdout + bad.stderr
    assert "reject" in (bad.stdout + bad.stderr).lower()

    refused = _pynetdicom_echo(port, calling="BADAE")
    assert refused.rejected
    assert not refused.established

    good = _echoscu(port, "GOODAE")
    assert good.returncode == 0, good.stdout + good.stderr
    assert _pynetdicom_echo(port, calling="GOODAE").status == 0x0000


# -- host allow-list ------------------------------------------------------------------------------
def test_host_outside_allow_list_gets_no_service(make_settings: MakeSettings,
                                                 start_service: StartService) -> None:
    """A caller whose address is outside ``allowed_hosts`` gets no association, no C-ECHO."""
    service = start_service(make_settings(dicom={"allowed_hosts": ["10.0.0.0/8"]}))
    port = _port(service)

    outcome = _pynetdicom_echo(port)
    assert not outcome.established
    assert outcome.status is None
    assert _echoscu(port, "ECHOSCU").returncode != 0


def test_host_outside_allow_list_is_rejected(make_settings: MakeSettings,
                                             start_service: StartService) -> None:
    """The refusal of a host outside ``allowed_hosts`` is a proper A-ASSOCIATE-RJ, every time
    (so the caller can tell "not allowed" from a network failure)."""
    service = start_service(make_settings(dicom={"allowed_hosts": ["10.0.0.0/8"]}))
    port = _port(service)

    outcomes = [_pynetdicom_echo(port) for _ in range(5)]
    assert all(o.rejected and not o.established for o in outcomes), outcomes
    dcmtk = _echoscu(port, "ECHOSCU")
    assert dcmtk.returncode != 0
    assert "rejected" in (dcmtk.stdout + dcmtk.stderr).lower()


def test_host_inside_allow_list_is_accepted(make_settings: MakeSettings,
                                            start_service: StartService) -> None:
    """A caller whose address is inside ``allowed_hosts`` (CIDR) is served."""
    service = start_service(make_settings(dicom={"allowed_hosts": ["127.0.0.0/8"]}))
    port = _port(service)

    outcome = _pynetdicom_echo(port)
    assert outcome.established
    assert outcome.status == 0x0000
    assert _echoscu(port, "ECHOSCU").returncode == 0


# -- DICOM TLS with client certificates ----------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """Certificates and keys (PEM files) for the TLS tests."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


_CA_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""
_LEAF_EXT = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, f"openssl {args[0]} failed: {result.stderr}"


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert, config = folder / f"{name}.key", folder / f"{name}.pem", folder / "openssl.cnf"
    config.write_text(_CA_CONFIG)  # also the request config of the leaf certificates
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _openssl("req", "-new", "-x509", "-key", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={name}", "-config", config, "-extensions", "v3_ca")
    return cert, key


def _make_leaf(folder: Path, name: str, cn: str, ca: tuple[Path, Path], usage: str,
               serial: int, san: str | None = None) -> tuple[Path, Path]:
    key, csr = folder / f"{name}.key", folder / f"{name}.csr"
    cert, ext = folder / f"{name}.pem", folder / f"{name}.ext"
    ext.write_text(_LEAF_EXT + f"extendedKeyUsage = {usage}\n"
                   + (f"subjectAltName = {san}\n" if san else ""))
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={cn}",
             "-config", folder / "openssl.cnf")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial",
             str(serial), "-days", "2", "-out", cert, "-extfile", ext)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server (localhost, 127.0.0.1) and a client certificate; an unrelated CA
    with a client certificate of its own."""
    if shutil.which("openssl") is None:
        missing("openssl not found (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca(folder, "test-ca")
    server = _make_leaf(folder, "server", "localhost", ca, "serverAuth", 1001,
                        san="DNS:localhost,IP:127.0.0.1")
    client = _make_leaf(folder, "client", "MODALITY", ca, "clientAuth", 1002)
    rogue_ca = _make_ca(folder, "rogue-ca")
    rogue = _make_leaf(folder, "rogue", "MODALITY", rogue_ca, "clientAuth", 2001)
    return Pki(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0],
               client_key=client[1], rogue_ca=rogue_ca[0], rogue_cert=rogue[0],
               rogue_key=rogue[1])


def _tls_service(pki: Pki, make_settings: MakeSettings, start_service: StartService) -> int:
    settings = make_settings(dicom={"tls_cert": pki.server_cert, "tls_key": pki.server_key,
                                    "tls_ca": pki.ca})
    return _port(start_service(settings))


def _client_context(pki: Pki, cert: Path | None = None, key: Path | None = None
                    ) -> ssl.SSLContext:
    """A requestor context trusting the test CA (server name checked: localhost/127.0.0.1)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def _good_context(pki: Pki) -> ssl.SSLContext:
    return _client_context(pki, pki.client_cert, pki.client_key)


def _ct_small() -> Path:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str), "pydicom test data missing"
    return Path(path)


def _stored_path(settings: Settings, source: Path) -> Path:
    """Where the store keeps `source`: instances/<study>/<series>/<sop>.dcm."""
    ds = dcmread(source, stop_before_pixels=True)
    study, series, sop = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                          str(ds.SOPInstanceUID))
    return settings.storage.root / "instances" / study / series / f"{sop}.dcm"


def test_tls_echo_with_trusted_client_certificate(
    pki: Pki, make_settings: MakeSettings, start_service: StartService
) -> None:
    """A caller presenting a certificate from the configured CA gets C-ECHO success; the
    server's certificate verifies against the CA for 127.0.0.1."""
    port = _tls_service(pki, make_settings, start_service)

    outcome = _pynetdicom_echo(port, context=_good_context(pki))
    assert outcome.established
    assert outcome.status == 0x0000


def test_tls_refuses_caller_without_certificate(
    pki: Pki, make_settings: MakeSettings, start_service: StartService
) -> None:
    """With ``tls_ca`` set, a TLS caller that presents no certificate gets no association;
    the receiver keeps serving verified callers."""
    port = _tls_service(pki, make_settings, start_service)

    outcome = _pynetdicom_echo(port, context=_client_context(pki))
    assert not outcome.established
    assert outcome.status is None
    assert _pynetdicom_echo(port, context=_good_context(pki)).status == 0x0000


def test_tls_refuses_certificate_from_unrelated_ca(
    pki: Pki, make_settings: MakeSettings, start_service: StartService
) -> None:
    """A client certificate signed by another CA is refused during the TLS handshake."""
    port = _tls_service(pki, make_settings, start_service)

    outcome = _pynetdicom_echo(port, context=_client_context(pki, pki.rogue_cert, pki.rogue_key))
    assert not outcome.established
    assert outcome.status is None
    assert _pynetdicom_echo(port, context=_good_context(pki)).status == 0x0000


def test_tls_refuses_plain_association(
    pki: Pki, make_settings: MakeSettings, start_service: StartService
) -> None:
    """A TLS receiver does not answer plain (unencrypted) DICOM, from pynetdicom or dcmtk."""
    port = _tls_service(pki, make_settings, start_service)

    outcome = _pynetdicom_echo(port)
    assert not outcome.established
    assert outcome.status is None
    assert _echoscu(port, "ECHOSCU").returncode != 0
    assert _pynetdicom_echo(port, context=_good_context(pki)).status == 0x0000


def test_tls_store_reaches_the_store(
    pki: Pki, make_settings: MakeSettings, start_service: StartService
) -> None:
    """A C-STORE over mutually authenticated TLS succeeds and the instance lands on disk."""
    settings = make_settings(dicom={"tls_cert": pki.server_cert, "tls_key": pki.server_key,
                                    "tls_ca": pki.ca})
    port = _port(start_service(settings))
    source = _ct_small()
    item = inspect(source)
    assert item is not None

    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(item.sop_class_uid, [item.transfer_syntax_uid])
    assoc: Any = ae.associate("127.0.0.1", port, ae_title=CALLED,
                              tls_args=(_good_context(pki), "127.0.0.1"))
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(source)
    finally:
        assoc.release()
    assert "Status" in rsp
    assert int(rsp.Status) == 0x0000

    stored = _stored_path(settings, source)
    assert stored.is_file()
    assert dcmread(stored).SOPInstanceUID == dcmread(source).SOPInstanceUID


def test_tls_requestor_echo_and_send(
    pki: Pki, make_settings: MakeSettings, start_service: StartService
) -> None:
    """dicom-ai's own requestor (``echo``, ``send_files``; the ``echo``/``send`` commands and
    TLS destinations) works over TLS with a client certificate."""
    settings = make_settings(dicom={"tls_cert": pki.server_cert, "tls_key": pki.server_key,
                                    "tls_ca": pki.ca})
    port = _port(start_service(settings))
    peer = Peer(CALLED, "127.0.0.1", port, tls=True)
    client = DicomSettings(ae_title="TLSSCU", tls_cert=pki.client_cert,
                           tls_key=pki.client_key, tls_ca=pki.ca)

    assert echo(peer, client) == 0x0000
    item = inspect(_ct_small())
    assert item is not None
    report = send_files([item], peer, client)
    assert report.ok, report.failures
    assert report.statuses["success"] == 1
    assert _stored_path(settings, item.path).is_file()


def test_outbox_delivers_to_a_tls_destination(
    pki: Pki, make_settings: MakeSettings, start_service: StartService, tmp_path: Path,
    db_url: str
) -> None:
    """A result waiting in the outbox reaches a ``tls = true`` destination (here a TLS
    receiver of our own that demands a client certificate from the test CA)."""
    from datetime import UTC, datetime

    from dicom_ai.config import load_settings
    from dicom_ai.dispatch.delivery import OutboxSender
    from storage import jobs, outbox
    from storage.db import Database

    receiver = make_settings(dicom={"tls_cert": pki.server_cert, "tls_key": pki.server_key,
                                    "tls_ca": pki.ca})
    port = _port(start_service(receiver))
    sender = load_settings(
        None,
        dicom={"ae_title": "SENDER", "tls_cert": pki.client_cert, "tls_key": pki.client_key,
               "tls_ca": pki.ca},
        storage={"root": tmp_path / "sender", "database_url":
                 f"sqlite:///{tmp_path / 'sender.sqlite3'}"},
        destinations=[{"name": "secure", "ae_title": CALLED, "host": "127.0.0.1",
                       "port": port, "tls": True}])
    result = sender.storage.root / "results" / "ct.dcm"
    result.parent.mkdir(parents=True)
    shutil.copy(_ct_small(), result)
    ds = dcmread(result, stop_before_pixels=True)
    db = Database(sender.storage.url)
    db.upgrade()
    now = datetime.now(UTC)
    with db.write_session() as session:
        job = jobs.create_job(session, study_instance_uid=str(ds.StudyInstanceUID),
                              series_instance_uids=[], route="r", model_name="m",
                              max_attempts=1, event_id=None, now=now)
        assert jobs.claim_job(session, job.id, owner="me", lease_seconds=60, now=now)
        assert jobs.complete_job(session, job.id, owner="me", model_version="1", findings=[],
                                 results=[jobs.ResultToStore(
                                     kind="sr", sr_kind="comprehensive",
                                     study_instance_uid=str(ds.StudyInstanceUID),
                                     series_instance_uid=str(ds.SeriesInstanceUID),
                                     sop_instance_uid=str(ds.SOPInstanceUID),
                                     sop_class_uid=str(ds.SOPClassUID),
                                     path="results/ct.dcm", destinations=["secure"])],
                                 timings={}, now=now)
    assert OutboxSender(sender, db).send_due() == 1
    with db.sessions() as session:
        assert outbox.outbox_counts(session) == {"sent": 1}
    db.dispose()
    assert _stored_path(receiver, result).is_file()


def test_tls_idle_connection_does_not_block_others(
    pki: Pki, make_settings: MakeSettings, start_service: StartService
) -> None:
    """A TCP connection that never starts its TLS handshake (port scanner, health check)
    does not stop the receiver from accepting other callers."""
    port = _tls_service(pki, make_settings, start_service)
    idle = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        time.sleep(0.5)  # let the acceptor take the idle connection first
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            with _good_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() is not None  # handshake done within 5 s
        except TimeoutError:
            pytest.fail("TLS handshake timed out while another connection sat idle")
    finally:
        idle.close()  # frees a blocked acceptor, so the service can stop
    assert _pynetdicom_echo(port, context=_good_context(pki)).status == 0x0000
