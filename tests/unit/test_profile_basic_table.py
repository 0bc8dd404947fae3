"""The generated PS3.15 Table E.1-1 (Basic Profile): pinned to its edition, equal to its source.

``dicom_ai/batch/profile_basic_table.py`` is written by ``scripts/gen_profile_basic.py`` from
``dicom-anonymizer`` (the ``dev`` extra pins the release). These tests pin the edition (row
counts, known rows), check that the committed module is byte for byte what the script gives
for the installed source, and run the script on small source folders of their own.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dicom_ai.batch import profile_basic_table
from dicom_ai.batch.profile_basic import BASIC_PROFILE, EDITION, action_for_tag
from tests.conftest import missing

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_profile_basic.py"
COMMITTED = REPO / "dicom_ai" / "batch" / "profile_basic_table.py"
PINNED = "dicom-anonymizer==2.1.0"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_edition_pinned() -> None:
    assert EDITION == profile_basic_table.EDITION == "2026c"
    assert profile_basic_table.SOURCE_DISTRIBUTION == PINNED
    assert len(BASIC_PROFILE) == 652
    assert Counter(BASIC_PROFILE.values()) == {
        "X": 412, "D": 93, "U": 55, "Z": 42, "X/D": 23, "X/Z": 11, "X/Z/D": 8, "Z/D": 6,
        "X/Z/U*": 2}
    assert profile_basic_table.MASKED_ROWS == (
        (0x50000000, 0xFF000000, "X"),  # Curve Data
        (0x60003000, 0xFF00FFFF, "X"),  # Overlay Data
        (0x60004000, 0xFF00FFFF, "X"),  # Overlay Comments
    )
    known = {
        0x00100010: "Z",  # Patient's Name
        0x00100020: "Z/D",  # Patient ID (Z in editions up to about 2023)
        0x00100030: "Z",  # Patient's Birth Date
        0x00100040: "Z",  # Patient's Sex
        0x00101010: "X",  # Patient's Age
        0x00080050: "Z",  # Accession Number
        0x00080080: "X/Z/D",  # Institution Name
        0x00081140: "X/Z/U*",  # Referenced Image Sequence
        0x0020000D: "U",  # Study Instance UID
        0x0020000E: "U",  # Series Instance UID
        0x00080018: "U",  # SOP Instance UID
        0x00200052: "U",  # Frame of Reference UID
        0x00080201: "X",  # Timezone Offset From UTC
        0x00080054: "X",  # Retrieve AE Title
        0x3006_0009: "Z",  # Structure Set Time
        0x300A_00B2: "X/Z",  # Treatment Machine Name
        0x3010_0077: "X/D",  # Treatment Site
        0x0040A730: "D",  # Content Sequence
        0xFFFAFFFA: "X",  # Digital Signatures Sequence
    }
    assert {tag: BASIC_PROFILE.get(tag) for tag in known} == known
    assert 0x00280030 not in BASIC_PROFILE  # Pixel Spacing: no row
    assert 0x00080016 not in BASIC_PROFILE  # SOP Class UID: no row


def test_actions_resolved_private_curves_overlays() -> None:
    assert action_for_tag(0x00100020) == "D"  # Z/D
    assert action_for_tag(0x300A00B2) == "Z"  # X/Z
    assert action_for_tag(0x00081140) == "U"  # X/Z/U*
    assert action_for_tag(0x00091001) == "X"  # private: "(gggg,eeee) where gggg is odd"
    assert action_for_tag(0x7FE10010) == "X"  # private creator
    assert action_for_tag(0x50003000) == "X"  # Curve Data
    assert action_for_tag(0x501E0005) == "X"  # any element of curve group 501E
    assert action_for_tag(0x601E3000) == "X"  # Overlay Data, group 601E
    assert action_for_tag(0x60000010) == "X"  # Overlay Rows: the whole overlay goes
    assert action_for_tag(0x50200000) is None  # group 5020 is not a curve group
    assert action_for_tag(0x00280030) is None


def test_committed_table_is_what_the_script_generates(tmp_path: Path) -> None:
    try:
        version = importlib.metadata.version("dicom-anonymizer")
    except importlib.metadata.PackageNotFoundError:
        missing(f"dicom-anonymizer not installed (pip install '{PINNED}', the dev extra)")
        return
    assert f"dicom-anonymizer=={version}" == PINNED
    out = tmp_path / "table.py"
    result = _run("--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == COMMITTED.read_text(encoding="utf-8")
    assert _run("--check").returncode == 0


def _source_folder(root: Path, body: str, edition: str = "1999z") -> Path:
    """A folder laid out like an unpacked dicom-anonymizer wheel, with one edition."""
    database = root / "dicomanonymizer" / "dicom_anonymization_databases"
    database.mkdir(parents=True)
    (database / f"dicomfields_{edition}.py").write_text(body, encoding="utf-8")
    info = root / "dicom_anonymizer-9.9.9.dist-info"
    (info / "licenses").mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.4\nName: dicom_anonymizer\n"
                                   "Version: 9.9.9\n", encoding="utf-8")
    (info / "licenses" / "LICENSE").write_text("Copyright 2020, Test\n", encoding="utf-8")
    return root


_EMPTY_LISTS = "".join(f"{name} = []\n" for name in (
    "Z_TAGS", "X_TAGS", "Z_D_TAGS", "X_Z_TAGS", "X_D_TAGS", "X_Z_D_TAGS", "X_Z_U_STAR_TAGS"))


def test_script_reads_a_source_folder(tmp_path: Path) -> None:
    body = ("D_TAGS = [\n    (0x0008, 0x0080),  # Institution Name\n"
            "    (0x6000, 0x3000, 0xFF00, 0xFFFF),  # Overlay Data\n]\n"
            "U_TAGS = [\n    (\n        0x0020,\n        0x000D,\n    ),  # Study Instance UID\n]\n"
            + _EMPTY_LISTS)
    source = _source_folder(tmp_path / "src", body)
    out = tmp_path / "table.py"
    result = _run("--source", str(source), "--edition", "1999z", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text(encoding="utf-8")
    assert "GENERATED, do not edit" in text
    assert "# Copyright 2020, Test" in text
    namespace: dict[str, object] = {}
    exec(compile(text, str(out), "exec"), namespace)
    assert namespace["EDITION"] == "1999z"
    assert namespace["SOURCE_DISTRIBUTION"] == "dicom-anonymizer==9.9.9"
    assert namespace["ROWS"] == {0x00080080: "D", 0x0020000D: "U"}
    assert namespace["MASKED_ROWS"] == ((0x60003000, 0xFF00FFFF, "D"),)
    assert "0x0020000D: \"U\",  # Study Instance UID" in text
    # --check: equal passes, a hand edit is caught.
    assert _run("--source", str(source), "--edition", "1999z", "--out", str(out),
                "--check").returncode == 0
    out.write_text(text.replace('0x00080080: "D"', '0x00080080: "X"'), encoding="utf-8")
    checked = _run("--source", str(source), "--edition", "1999z", "--out", str(out), "--check")
    assert checked.returncode == 1
    assert "differs" in checked.stderr


@pytest.mark.parametrize(("body", "message"), [
    ("D_TAGS = [(0x0010, 0x0010)]\nU_TAGS = [(0x0010, 0x0010)]\n" + _EMPTY_LISTS,
     "(0010,0010) is both D and U"),
    ("D_TAGS = [(0x0010, 0x0010)]\n" + _EMPTY_LISTS, "no U_TAGS"),
    ("D_TAGS = [(0x10010, 0x0010)]\nU_TAGS = []\n" + _EMPTY_LISTS, "not a tag"),
])
def test_script_refuses_a_malformed_source(tmp_path: Path, body: str, message: str) -> None:
    source = _source_folder(tmp_path / "src", body)
    out = tmp_path / "table.py"
    result = _run("--source", str(source), "--edition", "1999z", "--out", str(out))
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()
    missing_edition = _run("--source", str(source), "--edition", "2099a", "--out", str(out))
    assert missing_edition.returncode == 2
    assert "dicomfields_2099a.py" in missing_edition.stderr
