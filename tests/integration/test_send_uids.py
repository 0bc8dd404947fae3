"""``dicom-ai send`` names the dataset's SOP UIDs in the C-STORE request, as dcmtk does."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_ai.cli import app as cli_app
from dicom_ai.network.scu import inspect
from dicom_ai.service import Service
from tests.integration.test_receive import dataset_bytes, index_count, port_of, stored_path
from tests.peers import sample_file


def _meta_differs(tmp: Path) -> Path:
    """CT_small with fresh UIDs and a file meta naming another SOP Instance UID."""
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp / "meta-differs.dcm"
    ds.save_as(path)
    return path


def test_send_uses_the_datasets_uids_with_a_warning(service: Service, tmp_path: Path) -> None:
    """A file whose meta UID differs (ours, and pydicom's rtplan.dcm) is stored under the
    dataset's UID, byte for byte; the warning names both UIDs."""
    made = _meta_differs(tmp_path)
    rtplan = Path(sample_file("rtplan.dcm"))  # one of pydicom's files whose meta UID differs
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path / "cli-store"}"\n'
                      f'database_url = "sqlite:///{tmp_path / "cli.sqlite3"}"\n')
    result = CliRunner().invoke(cli_app, [
        "send", str(made), str(rtplan), "--to", f"DICOM_AI@127.0.0.1:{port_of(service)}",
        "-c", str(config)])
    assert result.exit_code == 0, result.output
    for path in (made, rtplan):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID  # as it was
        stored = stored_path(service.settings, ds)
        assert stored.is_file(), path.name
        assert dataset_bytes(stored) == dataset_bytes(path), path.name
        said = result.stderr
        assert f"warning: {path}: the file meta names other SOP UIDs" in said, said
        assert f"(SOP Instance UID {ds.SOPInstanceUID})" in said
    assert index_count(service.settings) == 2
    assert index_count(service.settings, "quarantine") == 0
    assert ["success", "2"] in [line.split("\t") for line in result.stdout.splitlines()]


def test_inspect_reads_the_datasets_uids(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    """The dataset's UIDs, a warning naming both (UIDs only); equal UIDs: no warning."""
    made = _meta_differs(tmp_path)
    ds = pydicom.dcmread(made)
    with caplog.at_level(logging.WARNING, logger="dicom_ai.network.scu"):
        item = inspect(made)
        plain = inspect(Path(sample_file("CT_small.dcm")))
    assert item is not None
    assert plain is not None
    assert item.sop_instance_uid == ds.SOPInstanceUID
    assert item.meta_differs
    assert not plain.meta_differs
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert str(ds.SOPInstanceUID) in message
    assert str(ds.file_meta.MediaStorageSOPInstanceUID) in message
