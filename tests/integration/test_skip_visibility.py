"""Out-of-scope series are visible in the metrics and on the dashboard (issue 18).

A real service with the bundled chest-nodule model receives, over storescu, an ankle radiograph
(Body Part Examined ANKLE; the model applies to CHEST) and a study with a chest PA series and an
ankle series; its results go to a dcmtk storescp. Then ``/metrics`` counts the job the model
took nothing of and the two skipped series by reason class, and the dashboard shows each job's
reason next to its study, without the patient's name.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from dicom_ai.config import Settings
from dicom_ai.runner.analysis import SKIP_REASONS
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import apikeys
from storage.db import Database
from tests.integration.test_loop import dicom_files
from tests.integration.test_multi_series import _save, join_study, run_loop


@pytest.fixture(scope="module")
def chest_cr(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three one-image synthetic chest CR studies (uncompressed)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, studies=3, seed=1818, modality="CR", positive_fraction=0.5,
               difficulty=0.3, compress=False)
    return dicom_files(out)


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in metrics"
    return float(match.group(1))


def test_ankle_radiograph_is_counted_in_metrics_and_explained_on_the_dashboard(
    tmp_path: Path, db_url: str, chest_cr: list[Path],
    start_service: Callable[[Settings], Service],
) -> None:
    out = tmp_path / "in"
    ankle = dcmread(chest_cr[0])
    ankle.BodyPartExamined = "ANKLE"
    chest = dcmread(chest_cr[1])
    chest_ankle = join_study(dcmread(chest_cr[2]), chest, series_number=2,
                             BodyPartExamined="ANKLE")
    files = [_save(ankle, out / "ankle.dcm"), _save(chest, out / "chest.dcm"),
             _save(chest_ankle, out / "chest-ankle.dcm")]

    service, _settings, done, _got = run_loop(tmp_path, db_url, start_service, files,
                                              studies=2, srs=1)
    ankle_job = done[str(ankle.StudyInstanceUID)]
    mixed_job = done[str(chest.StudyInstanceUID)]
    assert ankle_job.error is not None
    assert ankle_job.error.startswith("not applicable: ")
    assert mixed_job.error is not None
    assert mixed_job.error.startswith(f"series {chest_ankle.SeriesInstanceUID} skipped: ")

    db = Database(db_url)
    try:
        with db.write_session() as session:
            token = apikeys.create_key(session, name="wallboard", role="read",
                                       now=datetime.now(UTC)).token
    finally:
        db.dispose()
    assert service.api_address is not None
    with httpx.Client(base_url=f"http://127.0.0.1:{service.api_address[1]}",
                      headers={"X-API-Key": token}, timeout=30) as client:
        metrics = client.get("/metrics")
        page = client.get("/dashboard")
    assert metrics.status_code == 200, metrics.text
    assert page.status_code == 200, page.text

    # The metrics: one job not applicable, two series skipped for their body part (the ankle
    # study's and the mixed study's), nothing else; labels are classes, never UIDs or values.
    text = metrics.text
    assert _sample(text, 'dicom_ai_jobs_not_applicable_total{model="chest-nodule"}') == 1
    for reason in SKIP_REASONS:
        expected = 2 if reason == "body_part" else 0
        name = f'dicom_ai_series_skipped_total{{model="chest-nodule",reason="{reason}"}}'
        assert _sample(text, name) == expected, reason
    assert str(ankle.SeriesInstanceUID) not in text
    assert "ANKLE" not in text

    # The dashboard: each job's note next to its study's routing, marked by kind.
    body = page.text
    for job, kind in ((ankle_job, "not-applicable"), (mixed_job, "partly-skipped")):
        shown = re.search(rf'<div class="err skip-note {kind}" data-job-id="{job.id}">'
                          r"([^<]*)</div>", body)
        assert shown is not None, (kind, job.id)
        assert html.unescape(shown.group(1)) == job.error
    assert "body part ANKLE: chest-nodule 1.0.0 applies to CHEST" in body
    assert str(ankle.PatientName) not in body
