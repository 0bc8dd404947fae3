"""Fault 3: kill -9 of the whole ``serve`` process tree (receiver, scheduler, sender and its
pool workers) while results are on the wire, then a restart: every result arrives; objects
sent again keep their SOP Instance UIDs, and no more are sent twice than were in flight.

On loopback a send of 17 objects takes milliseconds, too short to be cut reliably: until the
kill the PACS pauses a second after each object it stores (storescp ``--sleep-after 1``), and
it is back to full speed (restarted on the same port) before serve restarts, so the recovery
time is serve's alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.faults import harness
from tests.integration.test_loop import _big_series
from tests.peers import DicomAIServe, free_port, settings_toml, wait_until

IMAGES = 16  # an SR and 16 heat-map SCs: a send that takes long enough to be cut
# The restarted serve takes back its predecessor's claims at once (the claim is 120 s).
RECOVERY_LIMIT = 15.0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_serve_killed_during_delivery_resends_only_what_was_in_flight(
    tmp_path: Path, db_url: str, cr_studies: Path, pacs: harness.ResultSCP,
    fault_report: list[harness.FaultFigures]
) -> None:
    big = _big_series(cr_studies, tmp_path / "big", IMAGES)
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(settings_toml(harness.fault_settings(tmp_path, db_url, pacs.port,
                                                           dicom={"port": port})))
    server = DicomAIServe(config, port)
    pacs.stop()
    pacs.start("--sleep-after", "1")
    try:
        server.start()
        acked = harness.push_acknowledged(port, big)
        wait_until(lambda: harness.received_at(pacs.folder), 90,
                   "the first result at the PACS", interval=0.005)
        assert server.process is not None
        killed = harness.kill_tree(server.process.pid)
        server.process.wait()
        arrived = len(harness.received_at(pacs.folder))
        # Rows not marked sent: on the wire, or waiting for their turn in the same send.
        in_flight = sum(r.state != "sent" for r in harness.outbox_rows(db_url))
        pacs.stop()
        pacs.start()
        ended = time.time()  # from the restart command: serve's own start-up counts
        server.start()
        harness.wait_delivered(pacs.folder, acked, 60, "every result delivered after the restart")
        figures = harness.check("serve kill -9 during delivery", db_url=db_url,
                                store_root=tmp_path / "store", acked=acked,
                                destination=pacs.folder, fault_ended=ended,
                                report=fault_report, in_flight=in_flight)
    finally:  # a clean stop would wait for the new worker's model load: not under test
        if server.process is not None and server.process.poll() is None:
            harness.kill_tree(server.process.pid)
            server.process.wait()
    figures.notes.append(f"killed {len(killed)} processes with {arrived} of {IMAGES + 1} "
                         f"objects at the PACS and {in_flight} outbox rows not marked sent")
    assert in_flight > 0, "the kill came after the send: nothing was in flight"
    assert figures.recovery_seconds < RECOVERY_LIMIT, "claims of the killed serve not reclaimed"
    assert {r.state for r in harness.outbox_rows(db_url)} == {"sent"}
    study = str(dcmread(big[0], stop_before_pixels=True).StudyInstanceUID)
    assert {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID)
            for p in pacs.folder.iterdir()} == {study}
