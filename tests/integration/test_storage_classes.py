"""Storage classes at negotiation: retired standard classes accepted, private ones when
configured, every refused presentation context counted and logged with its SOP class."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context

from dicom_ai.config import Settings
from dicom_ai.network.contexts import STORAGE_SOP_CLASSES
from dicom_ai.service import Service
from tests.conftest import need_binary
from tests.integration.test_receive import index_count, port_of, send_paths, stored_path
from tests.peers import ENV, sample_file, storescu

US_IMAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
PRIVATE_CLASS = "1.2.826.0.1.3680043.10.543.1.1"
UNKNOWN_SYNTAX = "1.2.826.0.1.3680043.10.543.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _retagged(tmp: Path, sop_class: str, name: str = "us.dcm") -> Path:
    """pydicom's US image with fresh UIDs and its SOP class (dataset and file meta) changed."""
    ds = pydicom.dcmread(sample_file("US1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp / name
    ds.save_as(path)
    return path


def _indexed_class(settings: Settings) -> list[str]:
    from sqlalchemy import text

    from storage.db import Database

    db = Database(settings.storage.url)
    try:
        with db.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(text("SELECT sop_class_uid FROM instances"))]
    finally:
        db.dispose()


def test_retired_us_image_is_stored_from_storescu_and_dcmsend(
        service: Service, tmp_path: Path) -> None:
    """US Image Storage (Retired), which Orthanc stores, is accepted, stored and indexed."""
    assert US_IMAGE_RETIRED in STORAGE_SOP_CLASSES
    need_binary("storescu")
    first = _retagged(tmp_path, US_IMAGE_RETIRED)
    # -R: propose only the file's own class (storescu's default list omits retired classes).
    result = storescu(port_of(service), [first], extra=["-R"])
    assert result.returncode == 0, result.stderr
    assert stored_path(service.settings, pydicom.dcmread(first)).is_file()
    dcmsend = need_binary("dcmsend")
    second = _retagged(tmp_path, "1.2.840.10008.5.1.4.1.1.3", "us-mf.dcm")  # US MF (Retired)
    sent = subprocess.run([dcmsend, "-v", "-aec", "DICOM_AI", "127.0.0.1",
                           str(port_of(service)), str(second)],
                          env=ENV, capture_output=True, text=True, check=False)
    assert "with status SUCCESS" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
    assert index_count(service.settings) == 2
    assert sorted(_indexed_class(service.settings)) == sorted(
        ["1.2.840.10008.5.1.4.1.1.3", US_IMAGE_RETIRED])
    assert sum(service.counters.snapshot()["context"].values()) == 0


def test_refused_contexts_are_counted_and_logged(
        service: Service, caplog: pytest.LogCaptureFixture) -> None:
    """A private class and an unknown transfer syntax are refused, counted and logged."""
    ae = AE(ae_title="REFUSED")
    ae.requested_contexts = [
        build_context(CT_IMAGE, [ExplicitVRLittleEndian]),
        build_context(PRIVATE_CLASS, [ExplicitVRLittleEndian]),
        build_context("1.2.840.10008.5.1.4.1.1.4", [UNKNOWN_SYNTAX]),  # MR, no syntax we know
    ]
    with caplog.at_level(logging.WARNING, logger="dicom_ai.network.handlers"):
        assoc = ae.associate("127.0.0.1", port_of(service), ae_title="DICOM_AI")
        assert assoc.is_established
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [CT_IMAGE]
        assoc.release()
    counted = service.counters.snapshot()["context"]
    assert counted == {"abstract syntax not supported": 1,
                       "transfer syntaxes not supported": 1, "other": 0}
    lines = [r.getMessage() for r in caplog.records if "presentation context" in r.getMessage()]
    assert len(lines) == 1, lines
    assert PRIVATE_CLASS in lines[0]
    assert "1.2.840.10008.5.1.4.1.1.4" in lines[0]
    assert "REFUSED" in lines[0]


def test_refused_contexts_reach_metrics(service: Service) -> None:
    """``/metrics`` exports the refusals by reason."""
    from prometheus_client import generate_latest

    from dicom_ai.api.metrics import make_registry
    from storage.db import Database

    ae = AE(ae_title="REFUSED")
    ae.add_requested_context(PRIVATE_CLASS, ExplicitVRLittleEndian)
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port_of(service), ae_title="DICOM_AI")
    assert assoc.is_established
    assoc.release()
    db = Database(service.settings.storage.url)
    try:
        text = generate_latest(make_registry(db, service.settings.storage.root,
                                             service.counters)).decode()
    finally:
        db.dispose()
    assert ('dicom_ai_presentation_contexts_refused_total{reason="abstract syntax not '
            'supported"} 1.0') in text


def test_private_class_accepted_when_configured(
        make_settings: Callable[..., Settings], start_service: Callable[[Settings], Service],
        tmp_path: Path) -> None:
    """``[dicom] extra_storage_classes`` adds a private class; it is stored and indexed."""
    service = start_service(make_settings(dicom={"extra_storage_classes": [PRIVATE_CLASS]}))
    path = _retagged(tmp_path, PRIVATE_CLASS)
    assert send_paths(port_of(service), [path]) == [0x0000]
    assert stored_path(service.settings, pydicom.dcmread(path)).is_file()
    assert _indexed_class(service.settings) == [PRIVATE_CLASS]
    assert service.counters.snapshot()["context"]["abstract syntax not supported"] == 0


def test_private_class_refused_by_default(service: Service, tmp_path: Path) -> None:
    """Closed by default: an unconfigured private class is refused at negotiation."""
    path = _retagged(tmp_path, PRIVATE_CLASS)
    ae = AE(ae_title="PRIVATE")
    ae.add_requested_context(PRIVATE_CLASS, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port_of(service), ae_title="DICOM_AI")
    if assoc.is_established:  # pynetdicom accepts with no contexts; the requestor gives up
        assert not assoc.accepted_contexts
        assoc.release()
    assert not stored_path(service.settings, pydicom.dcmread(path)).exists()
    assert service.counters.snapshot()["context"]["abstract syntax not supported"] == 1
