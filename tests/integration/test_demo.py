"""``dicom-ai demo``, the README's first thing to try, run as a user runs it.

The command synthesises chest radiographs, starts the stand-in PACS and the service, pushes the
studies and waits for the SRs and heat-map SCs; the test then reads what the stand-in PACS
stored and checks it against the synthetic ground truth the demo wrote.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from dicom_ai.reporting import summarize_sr
from tests.peers import ENV, REPO

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def test_demo_command_returns_an_sr_and_a_heatmap_per_study(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "demo", "--studies", "2", "--work", str(work),
         "--timeout", "240"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    said = " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert "2 of 2 SRs received by the stand-in PACS" in said

    with (work / "studies" / "labels.csv").open() as fh:
        truth = {row["StudyInstanceUID"]: row["label"] == "1" for row in csv.DictReader(fh)}
    assert len(truth) == 2
    received = [dcmread(p) for p in sorted((work / "pacs").glob("*.dcm"))]
    srs = {str(ds.StudyInstanceUID): ds for ds in received if ds.SOPClassUID in SR_CLASSES}
    heatmaps = [ds for ds in received if ds.SOPClassUID == SC_CLASS]
    assert set(srs) == set(truth)  # one SR per pushed study, filed in that study
    # A heat-map for each positive study only (heatmap_for = "positive", the default).
    assert {str(ds.StudyInstanceUID) for ds in heatmaps} == {s for s, p in truth.items() if p}
    for study, sr in srs.items():
        findings = summarize_sr(sr)
        assert findings, "the SR holds no measurement group"
        for finding in findings:
            assert 0.0 <= finding.probability <= 1.0
        # The demo's studies are easy (difficulty 0.3): the bundled model gets them right.
        assert any(f.present for f in findings) == truth[study]
        assert sr.Modality == "SR"
        assert sr.SeriesInstanceUID not in {h.SeriesInstanceUID for h in heatmaps}
    # Nothing the stand-in PACS was sent is half-written.
    assert not list((work / "pacs").glob("*.part"))
