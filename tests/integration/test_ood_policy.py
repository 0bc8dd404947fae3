"""Inputs outside the model's training distribution, through the whole loop (issue 18).

A running service with the bundled chest-nodule classifier (trained on synthetic CR) receives,
from dcmtk ``storescu``, pydicom's real chest radiograph (RG1: CR, CHEST, so the scope gate lets
it through, and the classifier says "nodule" at p ~ 1.0) and a synthetic chest CR study; its
results go to dcmtk ``storescp``. Three routes, chosen by the calling AE title, apply the three
``ood_policy`` values:

* ``send``: the real radiograph's SR reaches the PACS and states "Input outside training
  distribution: Present" (still valid for dsrdump and dciodvfy);
* ``hold``: its SR is built and stored with the job but never sent, while the synthetic study
  on the same route gets its SR (stating the flag Absent);
* ``drop``: no result object at all; the flagged findings are kept.

The findings rows carry the score and the flag (shown by ``dicom-ai findings``), and the
input-drift gauge counts them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from pydicom import dcmread
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_ai.api.metrics import make_registry
from dicom_ai.cli import app as cli_app
from dicom_ai.config import Settings
from dicom_ai.reporting import summarize_sr
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import jobs
from storage import outbox as outbox_rows
from storage.db import Database
from storage.paging import MAX_LIMIT
from tests.conftest import need_binary
from tests.integration.test_loop import (
    assert_valid_sr,
    dicom_files,
    loop_settings,
    push,
    received,
    sqlite_only,
)
from tests.peers import StoreSCP, sample_file, wait_until


def _route(name: str, calling: str, policy: str) -> dict[str, Any]:
    return {"name": name, "match": {"Modality": ["CR", "DX"], "CallingAETitle": calling},
            "model": "chest-nodule", "destinations": ["pacs"], "ood_policy": policy}


def _real_chest(out: Path, name: str) -> Path:
    """pydicom's chest CR as a study of its own (a fresh study, series and instance UID)."""
    ds = dcmread(sample_file("RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    ds.save_as(out / name, enforce_file_format=True)
    return out / name


@sqlite_only
def test_flagged_inputs_are_sent_with_the_flag_held_or_dropped_per_route(
    tmp_path: Path, db_url: str, start_service: Callable[[Settings], Service],
) -> None:
    need_binary("storescu")
    need_binary("storescp")
    synth = tmp_path / "synth"
    synthesize(synth, studies=1, seed=1808, modality="CR", compress=False)
    (synth_file,) = dicom_files(synth)
    sent, held, dropped = (_real_chest(tmp_path / "in", f"{n}.dcm")
                           for n in ("sent", "held", "dropped"))
    study = {name: str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
             for name, path in (("sent", sent), ("held", held), ("dropped", dropped),
                                ("synth", synth_file))}
    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(tmp_path, db_url, [
            {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
            routes=[_route("send", "SENDER", "send"), _route("hold", "HOLDER", "hold"),
                    _route("drop", "DROPPER", "drop")])
        service = start_service(settings)
        push(service, [sent], calling="SENDER")
        push(service, [held, synth_file], calling="HOLDER")
        push(service, [dropped], calling="DROPPER")

        db = Database(db_url)
        try:
            def settled() -> dict[str, Any] | None:
                with db.sessions() as session:
                    rows = jobs.list_jobs(session, limit=100)
                if len(rows) == 4 and all(j.state == "done" for j in rows):
                    return {j.study_instance_uid: j for j in rows}
                return None

            done = wait_until(settled, 180, "4 jobs done")
            srs = wait_until(lambda: (lambda f: f if len(f) == 2 else None)(
                received(scp.folder)["sr"]), 60, "2 SRs at storescp")
            time.sleep(1.0)  # nothing more arrives: the held and dropped results stay here
            assert len(received(scp.folder)["sr"]) == 2

            # The PACS got the flagged study's SR (policy send) and the synthetic one's.
            by_study = {str(dcmread(p).StudyInstanceUID): p for p in srs}
            assert set(by_study) == {study["sent"], study["synth"]}
            for path in srs:
                assert_valid_sr(path)  # the extra evaluation keeps dsrdump and dciodvfy clean
            (flagged_group,) = summarize_sr(dcmread(by_study[study["sent"]]))
            assert flagged_group.out_of_distribution is True
            assert flagged_group.probability > 0.99  # what the flag is there to warn about
            (synth_group,) = summarize_sr(dcmread(by_study[study["synth"]]))
            assert synth_group.out_of_distribution is False

            with db.sessions() as session:
                rows = {name: jobs.findings_of_study(session, uid)
                        for name, uid in study.items()}
                results = {name: jobs.results_of_job(session, done[uid].id)
                           for name, uid in study.items()}
                outbox = {item.result_id for item, _ in outbox_rows.list_outbox(
                    session, limit=MAX_LIMIT)}
            # Every real radiograph's finding is flagged with its score; the synthetic is not.
            for name in ("sent", "held", "dropped"):
                (row,) = rows[name]
                assert row.out_of_distribution is True
                assert row.ood_score is not None
                assert row.ood_score > 9
            (synth_row,) = rows["synth"]
            assert synth_row.out_of_distribution is False
            assert synth_row.ood_score is not None
            # Held: the SR is stored with the job (visible), but has no outbox row.
            assert [r.kind for r in results["held"]] == ["sr"]
            assert results["held"][0].id not in outbox
            assert all(r.id in outbox for r in results["synth"] + results["sent"])
            # Dropped: no result object at all.
            assert results["dropped"] == []

            # Visible in the CLI (table and --json) for the held study.
            config = tmp_path / "config.toml"
            config.write_text(f'[storage]\nroot = "{settings.storage.root}"\n'
                              f'database_url = "{settings.storage.url}"\n')
            runner = CliRunner()
            shown = runner.invoke(cli_app, ["findings", study["held"], "-c", str(config)])
            assert shown.exit_code == 0, shown.output
            assert "(input outside training data)" in shown.stdout
            shown_json = runner.invoke(cli_app, ["findings", study["held"], "--json",
                                                 "-c", str(config)])
            (listed,) = json.loads(shown_json.stdout)["findings"]
            assert listed["out_of_distribution"] is True
            assert listed["ood_score"] > 9

            # The drift gauge: three of the four images scored in the last hour were flagged.
            text = generate_latest(make_registry(db, settings.storage.root)).decode()
            assert 'dicom_ai_ood_scored_last_hour{model="chest-nodule"} 4.0' in text
            assert 'dicom_ai_ood_flagged_ratio_last_hour{model="chest-nodule"} 0.75' in text
        finally:
            db.dispose()
