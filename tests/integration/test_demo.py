"""``dicom-ai demo``, the README's first thing to try, run as a user runs it.

The command synthesises chest radiographs, starts the stand-in PACS and the service, pushes the
studies and waits for the SRs and heat-map SCs; the test then reads what the stand-in PACS
stored and checks it against the synthetic ground truth the demo wrote. ``demo --modality CT``
does the same with a chest CT volume and the bundled volume model (a SEG and a 3D SR back).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
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


CT_MODEL = REPO / "dicom_ai" / "inference" / "bundled" / "chest-ct-nodule" / "1.0.0"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.mark.skipif(not (CT_MODEL / "spec.json").is_file(),
                    reason="the bundled chest-ct-nodule model is not in this checkout")
def test_ct_demo_finds_the_lesions_of_a_chest_ct_volume(tmp_path: Path) -> None:
    """``demo --modality CT``: a synthetic chest CT volume through the service to the bundled
    volume model; the stand-in PACS gets a SEG and a Comprehensive 3D SR whose lesions match
    the truth the demo wrote (one study, with lesions; 256 x 256 slices 2.5 mm apart)."""
    work = tmp_path / "demo-ct"
    done = subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "demo", "--modality", "CT", "--studies", "1",
         "--matrix", "256", "--work", str(work), "--timeout", "240", "--json"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["complete"]
    (study,) = result["studies"]
    with (work / "studies" / "lesions.csv").open() as fh:
        truth = list(csv.DictReader(fh))
    assert truth
    assert {row["StudyInstanceUID"] for row in truth} == {study["StudyInstanceUID"]}
    assert len(study["truth"]) == len(truth)

    sr = dcmread(study["sr_path"])
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR  # the route's destination takes 3D SR
    assert sr.StudyInstanceUID == study["StudyInstanceUID"]
    reported = [f for f in summarize_sr(sr) if f.present]
    assert len(reported) == len(study["found"])
    # The bundled model finds the demo's lesion(s) (1-3 of 8-25 mm, difficulty 0.3): at least
    # one. Its volume accuracy is the model's own test (tests/unit/test_bundled_ct.py).
    assert study["hits"] >= 1, study
    assert study["hits"] + study["false_positives"] == len(study["found"])
    for _, f in study["matches"]:
        assert study["found"][f]["volume_mm3"] > 0
    seg = dcmread(study["seg_path"])
    assert seg.SOPClassUID == SEG_CLASS
    assert len(seg.SegmentSequence) == len(reported)
    assert {f.segmentation_sop_instance_uid for f in reported} == {str(seg.SOPInstanceUID)}
    assert not list((work / "pacs").glob("*.part"))


def test_ct_demo_matches_lesions_by_centroid_within_the_true_radius() -> None:
    """The CT demo's hit rule: nearest pairs first, each lesion used once, within the true
    radius + 5 mm; a found lesion without a centroid (Comprehensive SR) matches nothing."""
    from dicom_ai.demo import FoundLesion, TrueLesion, match_lesions

    truth = [TrueLesion(500.0, 10.0, (0.0, 0.0, 0.0)), TrueLesion(4000.0, 20.0, (50.0, 0.0, 0.0))]
    found = [FoundLesion(3900.0, 19.0, (58.0, 0.0, 0.0), 0.9, 1),   # 8 mm off, radius 10: hit
             FoundLesion(450.0, 9.0, (0.0, 9.0, 0.0), 0.8, 2),      # 9 mm off, radius 5 + 5: hit
             FoundLesion(400.0, 9.0, (0.0, 2.0, 0.0), 0.7, 3),      # nearer: takes lesion 0
             FoundLesion(100.0, 5.0, None, 0.6, 4)]
    assert match_lesions(truth, found) == [(0, 2), (1, 0)]
    assert match_lesions(truth, [FoundLesion(1.0, 1.0, (0.0, 10.5, 0.0), 0.9, 1)]) == []
