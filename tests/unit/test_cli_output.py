"""CLI listings when stdout is not a terminal: full values, tab-separated; ``--json`` on
every listing; summaries on stdout."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_ai.cli import app as cli_app
from storage.db import Database
from storage.repository import InstanceRecord, index_instance

CT = "1.2.840.10008.5.1.4.1.1.2"
EVLE = "1.2.840.10008.1.2.1"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nroot = "{tmp_path / "store"}"\n'
                    f'database_url = "sqlite:///{tmp_path / "index.sqlite3"}"\n'
                    '[logging]\nlevel = "WARNING"\n')
    return path


def _rows(stdout: str) -> list[list[str]]:
    return [line.split("\t") for line in stdout.splitlines()]


def test_models_list_is_tab_separated_and_whole(config: Path) -> None:
    result = CliRunner().invoke(cli_app, ["models", "list", "-c", str(config)])
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    assert rows[0] == ["name", "version", "task", "active", "backend", "applies to", "source"]
    names = [row[0] for row in rows[1:]]
    assert "chest-nodule" in names
    assert "chest-nodule-seg" in names
    assert "…" not in result.stdout
    assert all(len(row) == len(rows[0]) for row in rows)
    listed = json.loads(CliRunner().invoke(
        cli_app, ["models", "list", "--json", "-c", str(config)]).stdout)
    assert sorted(names) == sorted(m["name"] for m in listed)


def test_studies_show_full_uids(config: Path, tmp_path: Path) -> None:
    study = generate_uid()  # 64 characters at most; rich cut it to "StudyIns…" when piped
    db = Database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    db.upgrade()
    with db.write_session() as session:
        index_instance(session, InstanceRecord(
            study_instance_uid=study, series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(), sop_class_uid=CT, transfer_syntax_uid=EVLE,
            patient_id="P1", patient_name="A^B", patient_birth_date="19700101",
            accession_number="ACC-LONG-ACCESSION-0001", study_date="20260101", modality="CT",
            instance_number=1), path="instances/x/1.dcm", size_bytes=10,
            calling_ae_title="CT1", now=datetime.now(UTC), replace=False)
    db.dispose()
    result = CliRunner().invoke(cli_app, ["studies", "-c", str(config)])
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    assert rows[0][0] == "StudyInstanceUID"
    assert rows[1][0] == study
    assert rows[1][1] == "ACC-LONG-ACCESSION-0001"
    as_json = json.loads(CliRunner().invoke(
        cli_app, ["studies", "--json", "-c", str(config)]).stdout)
    assert as_json[0]["study_instance_uid"] == study


@pytest.mark.parametrize("command", [
    ["studies"], ["models", "list"], ["jobs"], ["findings", "1.2.3"], ["audit"],
    ["batch", "list"], ["apikeys", "list"],
])
def test_every_listing_has_json(config: Path, command: list[str]) -> None:
    result = CliRunner().invoke(cli_app, [*command, "--json", "-c", str(config)])
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)


def test_send_summary_is_on_stdout(config: Path, tmp_path: Path) -> None:
    # Nothing to send and nobody listening: the summary still goes to stdout.
    (tmp_path / "not-dicom.txt").write_text("hello")
    result = CliRunner().invoke(cli_app, ["send", str(tmp_path / "not-dicom.txt"), "--to",
                                          "PACS@127.0.0.1:9", "-c", str(config)])
    assert result.exit_code == 1
    rows = _rows(result.stdout)
    assert rows[0] == ["status", "files"]
    assert ["skipped (not DICOM)", "1"] in rows
    as_json = json.loads(CliRunner().invoke(cli_app, [
        "send", str(tmp_path / "not-dicom.txt"), "--to", "PACS@127.0.0.1:9", "--json",
        "-c", str(config)]).stdout)
    assert as_json["skipped"] == 1
