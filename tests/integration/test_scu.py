"""Our requestor side: a peer that cannot be reached is one clear error, not log noise."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from pynetdicom import AE

from dicom_ai.config import Settings
from dicom_ai.exceptions import NetworkError
from dicom_ai.network.scu import Peer, echo
from tests.peers import free_port


def test_unreachable_peer_is_one_error_with_the_reason(
        make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture) -> None:
    """The error names the peer and the OS reason; pynetdicom's own ERROR lines about the
    failed connection are not logged (the outbox retries a PACS that is down forever)."""
    settings = make_settings()
    port = free_port()  # nothing listens there
    caplog.set_level(logging.WARNING)
    expected = rf"cannot connect to PACS@127\.0\.0\.1:{port}: .*refused"
    with pytest.raises(NetworkError, match=expected):
        echo(Peer("PACS", "127.0.0.1", port), settings.dicom)
    noise = [r for r in caplog.records if r.name.startswith("pynetdicom")]
    assert noise == [], [r.getMessage() for r in noise]


def test_other_associations_keep_pynetdicoms_lines(caplog: pytest.LogCaptureFixture) -> None:
    """An association we did not make (e.g. pynetdicom's C-MOVE sub-association) still logs
    why it could not connect."""
    caplog.set_level(logging.WARNING)
    ae = AE()
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", free_port(), ae_title="ELSEWHERE")
    assert not assoc.is_established
    assert any("TCP Initialisation Error" in r.getMessage() for r in caplog.records)
