"""The imaging commands as a user runs them: `dicom-ai preview`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.peers import REPO, sample_file

SPEC = """[preprocessing]
input_shape = [96, 128]
channels = 3
window = "lung"
normalization = "minmax"
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_ai.cli", *args], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=120)


def test_preview_command_writes_the_model_input_and_lists_the_steps(tmp_path: Path) -> None:
    """`preview FILE --model SPEC --out PNG` writes an image of the spec's size, lists steps."""
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    out = tmp_path / "input.png"
    result = _cli("preview", sample_file("CT_small.dcm"), "--model", str(spec), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "window: lung (C -600, W 1500)" in result.stdout
    assert "modality LUT" in result.stdout
    with Image.open(out) as image:
        assert image.size == (128, 96)


def test_preview_command_refuses_what_a_model_cannot_take(tmp_path: Path) -> None:
    """A file without pixel data exits 1 with a reason, not a traceback."""
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    result = _cli("preview", sample_file("rtplan.dcm"), "--model", str(spec), "--out",
                  str(tmp_path / "x.png"))
    assert result.returncode == 1
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_synth_command_writes_studies_and_labels(tmp_path: Path) -> None:
    """`synth --out DIR --studies N --seed S --modality CR` writes N studies and labels.csv."""
    out = tmp_path / "synth"
    result = _cli("synth", "--out", str(out), "--studies", "3", "--seed", "7", "--modality",
                  "CR", "--positive-fraction", "0.34")
    assert result.returncode == 0, result.stderr
    lines = (out / "labels.csv").read_text().splitlines()
    assert lines[0].startswith("StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID,label")
    assert len(lines) == 4
    assert sum(1 for line in lines[1:] if line.split(",")[3] == "1") == 1
    assert len(list(out.rglob("*.dcm"))) == 3
    bad = _cli("synth", "--out", str(out), "--modality", "PET")
    assert bad.returncode == 2


def test_synth_command_writes_a_chest_ct_with_lesion_truth(tmp_path: Path) -> None:
    """`synth --modality CT --phantom chest` writes a volume, lesions.csv and masks; the chest
    phantom is refused for other modalities."""
    out = tmp_path / "chest"
    result = _cli("synth", "--out", str(out), "--studies", "1", "--seed", "3", "--modality",
                  "CT", "--phantom", "chest", "--matrix", "64", "--positive-fraction", "1")
    assert result.returncode == 0, result.stderr
    assert f"lesions: {out / 'lesions.csv'}" in result.stdout
    lesions = (out / "lesions.csv").read_text().splitlines()
    assert len(lesions) >= 2  # a header and at least one lesion of the positive study
    assert len(list((out / "masks").glob("*.npz"))) == 1
    assert len(list(out.rglob("*.dcm"))) >= 100
    wrong = _cli("synth", "--out", str(tmp_path / "cr"), "--modality", "CR", "--phantom", "chest")
    assert wrong.returncode == 2
    assert "--phantom chest needs --modality CT" in wrong.stderr.replace("\n", " ")
