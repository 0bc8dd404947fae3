"""Where a received dataset is streamed: the receiving association's folder, nothing global."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from pynetdicom import evt

from dicom_ai.config import Settings
from dicom_ai.network import handlers
from dicom_ai.service import Service
from tests.peers import sample_file, storescu

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_received_dataset_streams_into_incoming_without_a_process_tempdir(
        make_settings: Callable[..., Settings], start_service: Callable[[Settings], Service],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver no longer sets ``tempfile.tempdir`` for the whole process; each dataset
    still arrives in the store's incoming/ folder (accepting it is a rename there)."""
    streamed: list[Path] = []
    store = handlers.handle_store

    def recording(event: evt.Event, *args: Any) -> Any:
        streamed.append(Path(cast(Path, event.request._dataset_path)))
        return store(event, *args)

    monkeypatch.setattr(handlers, "handle_store", recording)
    before = tempfile.gettempdir()  # sets tempfile.tempdir if nothing had yet
    settings = make_settings()
    service = start_service(settings)
    assert tempfile.tempdir == before  # the old receiver pointed it at incoming/
    assert service.address is not None
    result = storescu(service.address[1], [Path(sample_file("CT_small.dcm"))])
    assert result.returncode == 0, result.stderr
    assert len(streamed) == 1
    incoming = (settings.storage.root / "incoming").resolve()
    assert incoming in streamed[0].resolve().parents, streamed[0]
    assert tempfile.tempdir == before
