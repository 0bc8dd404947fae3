"""Real clinical layouts through the whole loop (issue 18): studies of several series, images
outside the model's scope, and vendor quirks in the copied patient and study attributes.

A running service (in this process, with its worker pool and the bundled chest-nodule
classifier) receives studies from dcmtk ``storescu`` and sends its SRs to dcmtk ``storescp``:

* a two-view chest study (PA and lateral, two series) and pydicom's chest CR as a three-series
  study each get ONE SR whose groups reference every image, with a study-level decision;
* an ankle radiograph (Body Part Examined ANKLE; the spec says CHEST) gets no nodule result and
  no SR, and the reason is visible in the jobs API, ``dicom-ai jobs`` and ``dicom-ai findings``,
  counted by reason class in ``/metrics`` and shown on the dashboard (issue 18);
  an ankle series beside a chest series is skipped with its reason, the chest gets its SR;
* a corpus of odd values seen in real files (dashed birth date, PatientSex U, odd PN, DS with
  too many digits, IS with spaces and +, lower-case CS, missing Type 2 attributes) each get
  their SR at the first attempt.
"""

from __future__ import annotations

import html
import json
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_ai.cli import app as cli_app
from dicom_ai.config import Settings
from dicom_ai.reporting import summarize_sr
from dicom_ai.runner.analysis import SKIP_REASONS
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import apikeys, jobs
from storage.db import Database
from storage.models import Job
from tests.conftest import need_binary
from tests.integration.test_loop import (
    assert_valid_sr,
    db_jobs,
    dicom_files,
    loop_settings,
    push,
    received,
    sqlite_only,
)
from tests.peers import StoreSCP, sample_file, wait_until

CHEST_ROUTE = {"name": "chest", "match": {"Modality": ["CR", "DX"]}, "model": "chest-nodule",
               "destinations": ["pacs"], "send_heatmap": False}
# Patient and study attributes every image of one study shares.
STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
              "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName")


@contextmanager
def lenient_values() -> Iterator[None]:
    """Let pydicom write the invalid values real files carry (it refuses or warns by default)."""
    settings = pydicom_config.settings
    saved = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = pydicom_config.IGNORE
    settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.writing_validation_mode, settings.reading_validation_mode = saved


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    with lenient_values():
        ds.save_as(path, enforce_file_format=True)
    return path


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in metrics"
    return float(match.group(1))


def join_study(ds: Dataset, study: Dataset, *, series_number: int, **values: Any) -> Dataset:
    """`ds` moved into `study` as a new series (fresh series and instance UIDs)."""
    for key in STUDY_KEYS:
        if key in study:
            setattr(ds, key, study[key].value)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


@pytest.fixture(scope="module")
def synth_cr(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Ten one-image synthetic chest CR studies (uncompressed: storescu sends them as they are)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, studies=10, seed=1807, modality="CR", positive_fraction=0.5,
               difficulty=0.3, compress=False)
    return dicom_files(out)


def jobs_settled(db_url: str, count: int) -> Callable[[], dict[str, Job] | None]:
    """A wait_until predicate: `count` jobs, all done or failed, by study UID."""

    def check() -> dict[str, Job] | None:
        rows = db_jobs(db_url)
        if len(rows) == count and all(j.state in ("done", "failed") for j in rows):
            return {j.study_instance_uid: j for j in rows}
        return None

    return check


def srs_by_study(folder: Path) -> dict[str, list[Dataset]]:
    found: dict[str, list[Dataset]] = {}
    for path in received(folder)["sr"]:
        ds = dcmread(path)
        found.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    return found


def evidence(sr: Dataset) -> dict[str, set[str]]:
    """Series UID -> SOP Instance UIDs in the SR's Current Requested Procedure Evidence."""
    out: dict[str, set[str]] = {}
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            out[str(series.SeriesInstanceUID)] = {
                str(item.ReferencedSOPInstanceUID) for item in series.ReferencedSOPSequence}
    return out


def run_loop(tmp_path: Path, db_url: str, start_service: Callable[[Settings], Service],
             files: list[Path], *, studies: int,
             srs: int) -> tuple[Service, Settings, dict[str, Job], dict[str, list[Dataset]]]:
    """Push `files` to a fresh service whose results go to storescp; wait for `studies` jobs
    (all done, each at its first attempt) and `srs` SRs at storescp."""
    need_binary("storescu")
    need_binary("storescp")
    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(tmp_path, db_url, [
            {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
            routes=[CHEST_ROUTE])
        service = start_service(settings)
        push(service, files)
        done = wait_until(jobs_settled(db_url, studies), 180, f"{studies} jobs settled")
        # No job failed, none was retried.
        assert {j.state for j in done.values()} == {"done"}, {
            k: (j.state, j.error) for k, j in done.items()}
        assert all(j.attempts == 1 for j in done.values())
        got = wait_until(lambda: (lambda f: f if len(f) == srs else None)(
            srs_by_study(scp.folder)), 60, f"{srs} SRs at storescp")
        for path in received(scp.folder)["sr"]:
            assert_valid_sr(path)
        time.sleep(1.0)  # nothing more arrives (an out-of-scope study sends nothing)
        assert len(received(scp.folder)["sr"]) == srs
    return service, settings, done, got


# -- several series -----------------------------------------------------------------------------
@sqlite_only
def test_two_view_chest_and_three_series_cr_studies_get_one_sr_each_over_all_images(
    tmp_path: Path, db_url: str, synth_cr: list[Path],
    start_service: Callable[[Settings], Service],
) -> None:
    out = tmp_path / "in"
    # A chest study of two views: PA (series 1) and a lateral (series 2).
    pa = dcmread(synth_cr[0])
    lateral = join_study(dcmread(synth_cr[1]), pa, series_number=2, ViewPosition="LL")
    two_view = [_save(pa, out / "pa.dcm"), _save(lateral, out / "lat.dcm")]
    # pydicom's chest CR (RG1, 1955 x 1841, MONOCHROME1) as a study of three series.
    rg1 = dcmread(sample_file("RG1_UNCR.dcm"))
    rg1.StudyInstanceUID = generate_uid()
    three = [_save(join_study(dcmread(sample_file("RG1_UNCR.dcm")), rg1, series_number=n),
                   out / f"rg1-{n}.dcm") for n in (1, 2, 3)]

    _, _, done, got = run_loop(tmp_path, db_url, start_service, [*two_view, *three],
                               studies=2, srs=2)
    assert not any(j.error for j in done.values())  # nothing skipped

    # One SR for the two-view study: both images, both series, one study decision.
    (sr,) = got[str(pa.StudyInstanceUID)]
    assert evidence(sr) == {str(pa.SeriesInstanceUID): {str(pa.SOPInstanceUID)},
                            str(lateral.SeriesInstanceUID): {str(lateral.SOPInstanceUID)}}
    groups = summarize_sr(sr)
    assert len(groups) == 3, groups  # one per image, one for the study
    per_image = [g for g in groups if len(g.source_sop_instance_uids) == 1]
    (study_group,) = [g for g in groups if len(g.source_sop_instance_uids) == 2]
    assert {g.source_sop_instance_uids[0] for g in per_image} == {
        str(pa.SOPInstanceUID), str(lateral.SOPInstanceUID)}
    assert set(study_group.source_sop_instance_uids) == {
        str(pa.SOPInstanceUID), str(lateral.SOPInstanceUID)}
    # The study's decision is the max of its images' probabilities (the spec's rule).
    assert study_group.probability == pytest.approx(max(g.probability for g in per_image))
    assert study_group.present == any(g.present for g in per_image)

    # pydicom's three-series CR study: one SR over its three images.
    (sr3,) = got[str(rg1.StudyInstanceUID)]
    assert len(evidence(sr3)) == 3
    groups3 = summarize_sr(sr3)
    assert len(groups3) == 4
    assert max(len(g.source_sop_instance_uids) for g in groups3) == 3

    db = Database(db_url)
    with db.sessions() as session:
        rows = jobs.findings_of_study(session, str(pa.StudyInstanceUID))
    db.dispose()
    # Finding rows: one per image, and the study's, which names no one image.
    assert sorted(r.sop_instance_uid for r in rows) == sorted(
        ["", str(pa.SOPInstanceUID), str(lateral.SOPInstanceUID)])
    (study_row,) = [r for r in rows if not r.sop_instance_uid]
    assert study_row.series_instance_uid == ""
    assert study_row.probability == pytest.approx(study_group.probability)


# -- out of scope -------------------------------------------------------------------------------
@sqlite_only
def test_ankle_radiograph_gets_no_nodule_result_and_the_reason_is_visible(
    tmp_path: Path, db_url: str, synth_cr: list[Path],
    start_service: Callable[[Settings], Service],
) -> None:
    out = tmp_path / "in"
    # An ankle radiograph: a CR the route matches, outside the model's body part (CHEST).
    ankle = dcmread(synth_cr[2])
    ankle.BodyPartExamined = "ANKLE"
    # A chest PA and an ankle series in one study: the chest gets its SR, the ankle skipped.
    mixed_chest = dcmread(synth_cr[3])
    mixed_ankle = join_study(dcmread(synth_cr[4]), mixed_chest, series_number=2,
                             BodyPartExamined="ANKLE")
    files = [_save(ankle, out / "ankle.dcm"), _save(mixed_chest, out / "mixed-chest.dcm"),
             _save(mixed_ankle, out / "mixed-ankle.dcm")]

    service, settings, done, got = run_loop(tmp_path, db_url, start_service, files,
                                            studies=2, srs=1)

    # The ankle: no SR, no finding, no result; the job is done and says why.
    ankle_job = done[str(ankle.StudyInstanceUID)]
    assert str(ankle.StudyInstanceUID) not in got
    assert ankle_job.error == (f"not applicable: series {ankle.SeriesInstanceUID} skipped: "
                               "body part ANKLE: chest-nodule 1.0.0 applies to CHEST")
    db = Database(db_url)
    with db.sessions() as session:
        assert jobs.results_of_job(session, ankle_job.id) == []
        assert jobs.findings_of_study(session, str(ankle.StudyInstanceUID)) == []
        mixed_rows = jobs.findings_of_study(session, str(mixed_chest.StudyInstanceUID))
    assert [r.sop_instance_uid for r in mixed_rows] == [str(mixed_chest.SOPInstanceUID)]

    # The mixed study: the SR references the chest image only; the ankle's reason kept.
    (sr_mixed,) = got[str(mixed_chest.StudyInstanceUID)]
    assert evidence(sr_mixed) == {
        str(mixed_chest.SeriesInstanceUID): {str(mixed_chest.SOPInstanceUID)}}
    mixed_job = done[str(mixed_chest.StudyInstanceUID)]
    assert mixed_job.error == (f"series {mixed_ankle.SeriesInstanceUID} skipped: body part "
                               "ANKLE: chest-nodule 1.0.0 applies to CHEST")

    # The reason in the jobs API ...
    with db.write_session() as session:
        token = apikeys.create_key(session, name="viewer", role="read",
                                   now=datetime.now(UTC)).token
    db.dispose()
    assert service.api_address is not None
    with httpx.Client(base_url=f"http://127.0.0.1:{service.api_address[1]}",
                      headers={"X-API-Key": token}, timeout=30) as client:
        listed = client.get("/api/jobs", params={"limit": 50})
        assert listed.status_code == 200, listed.text
        by_id = {j["id"]: j for j in listed.json()["items"]}
        metrics = client.get("/metrics")
        page = client.get("/dashboard")
    assert by_id[ankle_job.id]["state"] == "done"
    assert by_id[ankle_job.id]["error"] == ankle_job.error

    # ... in the metrics: one job not applicable, two series skipped for their body part (the
    # ankle study's and the mixed study's), nothing else; labels are classes, never UIDs or
    # values ...
    assert metrics.status_code == 200, metrics.text
    text = metrics.text
    assert _sample(text, 'dicom_ai_jobs_not_applicable_total{model="chest-nodule"}') == 1
    for reason in SKIP_REASONS:
        expected = 2 if reason == "body_part" else 0
        name = f'dicom_ai_series_skipped_total{{model="chest-nodule",reason="{reason}"}}'
        assert _sample(text, name) == expected, reason
    assert str(ankle.SeriesInstanceUID) not in text
    assert "ANKLE" not in text

    # ... on the dashboard: each job's note next to its study's routing, marked by kind, without
    # the patient's name ...
    assert page.status_code == 200, page.text
    body = page.text
    for job, kind in ((ankle_job, "not-applicable"), (mixed_job, "partly-skipped")):
        shown_note = re.search(rf'<div class="err skip-note {kind}" data-job-id="{job.id}">'
                               r"([^<]*)</div>", body)
        assert shown_note is not None, (kind, job.id)
        assert html.unescape(shown_note.group(1)) == job.error
    assert "body part ANKLE: chest-nodule 1.0.0 applies to CHEST" in body
    assert str(ankle.PatientName) not in body

    # ... and in the CLI: `jobs --json` and `findings` of the ankle study.
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nroot = "{settings.storage.root}"\n'
                      f'database_url = "{settings.storage.url}"\n')
    runner = CliRunner()
    listed_cli = runner.invoke(cli_app, ["jobs", "--json", "-c", str(config)])
    assert listed_cli.exit_code == 0, listed_cli.output
    cli_jobs = {j["id"]: j for j in json.loads(listed_cli.stdout)}
    assert cli_jobs[ankle_job.id]["error"] == ankle_job.error
    shown = runner.invoke(cli_app, ["findings", str(ankle.StudyInstanceUID), "-c", str(config)])
    assert shown.exit_code == 0, shown.output
    assert "not applicable" in shown.stdout
    assert "body part ANKLE" in shown.stdout
    shown_json = runner.invoke(cli_app, ["findings", str(ankle.StudyInstanceUID), "--json",
                                         "-c", str(config)])
    assert json.loads(shown_json.stdout)["jobs"][0]["error"] == ankle_job.error


# -- vendor quirks ------------------------------------------------------------------------------
def _dashed_birth_date_and_sex_u(ds: Dataset) -> None:
    ds.PatientBirthDate = "1901-12-31"
    ds.PatientSex = "U"


def _odd_person_names(ds: Dataset) -> None:
    ds.PatientName = "DOE^JOHN^^^^EXTRA^"  # six components (at most five)
    ds.ReferringPhysicianName = "Dr. Who, M.D.^" + "X" * 70  # a component over 64 characters


def _long_decimal_strings(ds: Dataset) -> None:
    ds.PatientWeight = "70.12345678901234567"  # DS: at most 16 characters
    ds.PatientSize = "1.7500000000000000001"
    ds.ImagerPixelSpacing = ["0.14285714285714285", "0.14285714285714285"]


def _integer_strings_with_signs_and_spaces(ds: Dataset) -> None:
    ds.SeriesNumber = " +1"
    ds.InstanceNumber = "+1 "
    ds.StudyID = " 0042 "


def _lower_case_code_strings(ds: Dataset) -> None:
    ds.BodyPartExamined = "chest"
    ds.ViewPosition = "pa"
    ds.PatientSex = "f"


def _missing_type_2(ds: Dataset) -> None:
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        if key in ds:
            delattr(ds, key)


QUIRKS: dict[str, Callable[[Dataset], None]] = {
    "dashed birth date, PatientSex U": _dashed_birth_date_and_sex_u,
    "odd PN": _odd_person_names,
    "DS with too many digits": _long_decimal_strings,
    "IS with spaces and +": _integer_strings_with_signs_and_spaces,
    "lower-case CS": _lower_case_code_strings,
    "missing Type 2 attributes": _missing_type_2,
}


@sqlite_only
def test_quirk_corpus_each_study_gets_its_sr(
    tmp_path: Path, db_url: str, synth_cr: list[Path],
    start_service: Callable[[Settings], Service],
) -> None:
    files: list[Path] = []
    studies: dict[str, str] = {}
    for n, (name, quirk) in enumerate(QUIRKS.items()):
        ds = dcmread(synth_cr[4 + n])
        with lenient_values():
            quirk(ds)
        files.append(_save(ds, tmp_path / "in" / f"quirk-{n}.dcm"))
        studies[str(ds.StudyInstanceUID)] = name
    # Every job done at its first attempt, with nothing skipped; one valid SR per study.
    _, _, done, got = run_loop(tmp_path, db_url, start_service, files, studies=len(QUIRKS),
                               srs=len(QUIRKS))
    assert not {studies[uid]: j.error for uid, j in done.items() if j.error}
    assert set(got) == set(studies)
    for uid, (sr,) in got.items():
        assert summarize_sr(sr), studies[uid]
    # The dashed birth date is not copied as received: the results' copy leaves it empty.
    dashed = next(uid for uid, name in studies.items() if name.startswith("dashed"))
    assert got[dashed][0].get("PatientBirthDate", "") == ""
