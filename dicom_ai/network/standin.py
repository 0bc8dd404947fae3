"""A stand-in PACS for ``dicom-ai demo``: a Storage SCP that keeps what it receives in a folder.

Not the service's receiver (no index, no completion): just enough of a PACS to show results
arriving. Files are written as received, one per SOP instance, ``<folder>/<SOPInstanceUID>.dcm``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicom_ai.dimse_status import Status
from dicom_ai.network.contexts import scp_contexts, supported_contexts
from dicom_ai.network.tuning import install as tune_pynetdicom

LOGGER = logging.getLogger(__name__)

__all__ = ["StandInPacs"]



class StandInPacs:
    """A minimal Storage SCP on loopback.

    Parameters
    ----------
    folder : Path
        Where received objects go (created).
    ae_title : str
        Its AE title.
    host : str
        Address to listen on.
    port : int
        0 picks a free port (see :attr:`address` after :meth:`start`).
    tune_network : bool
        ``[dicom] tune_network``: install :mod:`dicom_ai.network.tuning` on :meth:`start`.
    """

    def __init__(self, folder: Path, *, ae_title: str = "STANDIN_PACS",
                 host: str = "127.0.0.1", port: int = 0, tune_network: bool = True) -> None:
        self.folder = folder
        self.tune_network = tune_network
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.address: tuple[str, int] | None = None
        self._server: object | None = None
        self._lock = threading.Lock()

    def _on_store(self, event: Event) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            path = self.folder / f"{ds.SOPInstanceUID}.dcm"
            tmp = path.with_suffix(".part")
            ds.save_as(tmp, enforce_file_format=True)
            tmp.replace(path)
        except OSError:
            LOGGER.exception("stand-in PACS cannot write")
            return Status.OUT_OF_RESOURCES
        return Status.SUCCESS

    def start(self) -> tuple[str, int]:
        """Listen; returns ``(host, port)``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tune_pynetdicom(self.tune_network)  # event-driven association threads: see tuning.py
        ae = AE(ae_title=self.ae_title)
        # As the receiver: the validated table as is (the setter revalidates every UID and
        # drops roles).
        ae._supported_contexts = supported_contexts(scp_contexts())
        server = ae.start_server((self.host, self.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None  # block=False always returns the server
        self._server = server
        self.address = (self.host, int(server.server_address[1]))
        return self.address

    def received(self) -> list[Path]:
        """The files received so far."""
        return sorted(self.folder.glob("*.dcm"))

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None
