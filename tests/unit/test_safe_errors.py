"""What errors and log lines may say: no attribute value, no forged line (issue 17).

Real library exceptions (highdicom, pydicom, SQLAlchemy on SQLite and PostgreSQL, numpy) with
canary values are turned into text by :func:`dicom_ai.exceptions.safe_message`; results are
built by the real builders from sources with vendor quirks and checked by dsrdump and
dciodvfy; log lines go through the real :func:`dicom_ai.logs.setup_logging` into a file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom.config
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import text
from sqlalchemy.exc import DataError, IntegrityError

from dicom_ai.config import LoggingSettings
from dicom_ai.exceptions import (
    JobError,
    ReportError,
    redact,
    safe_message,
    safe_traceback,
)
from dicom_ai.inference.spec import FINDING_SITE_LUNG, NODULE
from dicom_ai.logs import escape_controls, setup_logging
from dicom_ai.reporting import build_heatmap_capture, build_seg, build_sr
from dicom_ai.runner.results import _building
from dicom_ai.training.synth import synthesize
from dicom_ai.values import Finding, HeatMap, Location, ModelRun
from storage.db import Database
from tests.conftest import need_binary

BIRTH_DATE = "1901-12-31"  # the dashed form a vendor writes; not a DA value
CANARY = "QZCANARYUNIT"


@pytest.fixture(scope="module")
def cr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cr")
    synthesize(out, studies=1, seed=5, modality="CR", positive_fraction=1.0, compress=False)
    return sorted(out.glob("*/*/*.dcm"))[0]


def _quirky(path: Path, *, pixels: bool = False) -> Dataset:
    """The source image with the quirks seen in the field, and canaries elsewhere."""
    ds = dcmread(path, stop_before_pixels=not pixels)
    with warnings.catch_warnings():  # pydicom warns (quoting the value) as it is set
        warnings.simplefilter("ignore")
        ds.PatientBirthDate = BIRTH_DATE
        ds.PatientSex = "U"
        ds.PatientName = [f"{CANARY}^ONE", f"{CANARY}^TWO"]  # PN is single-valued here
        ds.PatientAge = "QZCA"
        ds.StudyTime = f"{CANARY}"
    return ds


def _derived_uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["test_safe_errors", *map(str, parts)]))


def _hd_error(**patient: str) -> BaseException:
    """What highdicom raises when it copies these patient values into a new object."""
    try:
        hd.SOPClass(study_instance_uid=_derived_uid("study"),
                    series_instance_uid=_derived_uid("series"), series_number=1,
                    sop_instance_uid=_derived_uid("sop"), sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    instance_number=1, modality="OT", **patient)  # type: ignore[arg-type]
    except Exception as exc:
        return exc
    raise AssertionError("highdicom accepted the value")


def _wrap_int_error(*, chained: bool) -> None:
    """Our error embedding a library message, as ``f"...: {exc}"`` call sites write it."""
    try:
        int(CANARY)
    except ValueError as inner:
        if chained:
            raise JobError(f"cannot load the images: {inner}", retryable=False) from inner
        raise JobError(f"first line kept: {str(inner).splitlines()[0]}",
                       retryable=False) from None


# -- safe_message --------------------------------------------------------------------------------
def test_highdicom_errors_name_the_attribute_and_rule_not_the_value(cr_file: Path) -> None:
    """The issue's example: a dashed birth date; and Patient's Sex U."""
    source = _quirky(cr_file)
    birth = _hd_error(patient_birth_date=BIRTH_DATE)
    assert BIRTH_DATE in str(birth)  # the raw message does quote it
    assert safe_message(birth, [source]) == "ValueError: PatientBirthDate: not a valid DA value"
    assert safe_message(birth) == "ValueError: not a valid DA value"
    sex = _hd_error(patient_birth_date="", patient_sex="U")
    assert "'U'" in str(sex)
    assert safe_message(sex) == "ValueError: PatientSex: not one of the PatientSexValues"


def test_library_messages_are_reduced_and_own_messages_kept() -> None:
    def deep_in_a_library() -> None:
        raise RuntimeError(f"something odd about {CANARY}")

    try:
        deep_in_a_library()
    except RuntimeError as exc:
        unknown = safe_message(exc)
    assert CANARY not in unknown
    assert unknown.startswith("RuntimeError: (library message withheld; raised in ")
    assert "test_safe_errors.py:" in unknown  # where it came from, for the operator
    # A keyword or a tag the message names is kept (not a value).
    assert "about PatientID" in safe_message(KeyError("PatientID"))
    assert "about PatientName" in safe_message(LookupError(f"(0010,0010) {CANARY}"))
    assert CANARY not in safe_message(LookupError(f"(0010,0010) {CANARY}"))
    # int() of a string attribute quotes it.
    with pytest.raises(ValueError, match=CANARY) as caught:
        int(CANARY)
    assert safe_message(caught.value) == "ValueError: not a valid int"
    # Value-free library messages stay as they are: numpy, the OS.
    with pytest.raises(ValueError, match="reshape") as caught:
        np.zeros(4).reshape(3)
    assert safe_message(caught.value) == \
        "ValueError: cannot reshape array of size 4 into shape (3,)"
    assert safe_message(OSError(28, "No space left on device")) == \
        "OSError: [Errno 28] No space left on device"
    # Our own messages are ours; a library message embedded in one is replaced.
    assert safe_message(JobError("route 'chest' is no longer configured", retryable=False)) \
        == "route 'chest' is no longer configured"
    with pytest.raises(JobError) as wrapped:
        _wrap_int_error(chained=True)
    assert safe_message(wrapped.value) == "cannot load the images: ValueError: not a valid int"
    with pytest.raises(JobError) as wrapped:
        _wrap_int_error(chained=False)
    assert CANARY in str(wrapped.value)
    assert CANARY not in safe_message(wrapped.value)  # `from None` still leaves the context


def test_database_errors_lose_statement_and_parameters(db_url: str) -> None:
    """SQLAlchemy puts the bound parameters in its message; PostgreSQL its DETAIL too."""
    db = Database(db_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(text("CREATE TABLE canary (v VARCHAR(8), u TEXT UNIQUE)"))
            conn.execute(text("INSERT INTO canary VALUES ('', :u)"), {"u": CANARY})
        with pytest.raises(IntegrityError) as caught, db.engine.begin() as conn:
            conn.execute(text("INSERT INTO canary VALUES ('', :u)"), {"u": CANARY})
        assert CANARY in str(caught.value)
        duplicate = safe_message(caught.value)
        assert duplicate.startswith("IntegrityError: ")
        assert CANARY not in duplicate
        assert "INSERT" not in duplicate
        if db_url.startswith("postgresql"):  # value too long for VARCHAR(8): 22001
            with pytest.raises(DataError) as too_long, db.engine.begin() as conn:
                conn.execute(text("INSERT INTO canary VALUES (:v, '')"), {"v": CANARY})
            assert CANARY in str(too_long.value)
            assert "SQLSTATE 22001" in safe_message(too_long.value)
            assert CANARY not in safe_message(too_long.value)
    finally:
        db.dispose()


def test_redact_withholds_values_in_library_log_text() -> None:
    assert redact(f"Invalid value for VR DA: '{BIRTH_DATE}'.") == \
        "Invalid value for VR DA: (value withheld)."
    assert redact(f'value of argument "patient_name" is potentially invalid: "{CANARY}"') == \
        'value of argument "patient_name" is potentially invalid: (value withheld)'
    assert redact("association from STORESCU accepted") == "association from STORESCU accepted"


# -- results from quirky sources ------------------------------------------------------------------
def _run(ds: Dataset, *, segment: bool = False) -> ModelRun:
    uid = str(ds.SOPInstanceUID)
    mask = np.zeros((int(ds.Rows), int(ds.Columns)), dtype=bool)
    mask[10:30, 10:30] = True
    location = Location("segment", uid, segment_number=1, mask=mask) if segment else None
    finding = Finding(label="nodule", finding=NODULE, probability=0.8, threshold=0.5,
                      present=True, sop_instance_uids=(uid,), finding_site=FINDING_SITE_LUNG,
                      tracking_uid=_derived_uid("finding", uid), location=location)
    return ModelRun(model_name="chest-nodule", model_version="1.0.0",
                    task="segmentation" if segment else "classification",
                    study_instance_uid=str(ds.StudyInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID), findings=[finding])


def _dciodvfy_errors(path: Path) -> list[str]:
    check = subprocess.run([need_binary("dciodvfy"), str(path)], capture_output=True,
                           text=True, check=False)
    return [line for line in (check.stdout + check.stderr).splitlines()
            if line.startswith("Error")]


def test_results_build_from_vendor_quirks_and_validate(cr_file: Path, tmp_path: Path) -> None:
    """Dashed birth date, sex U, a two-valued name, a bad AS and TM: SR, SEG and SC build on a
    sanitised copy, pass dsrdump and dciodvfy, and the caller's dataset is untouched."""
    source = _quirky(cr_file, pixels=True)
    seg = build_seg(_run(source, segment=True), [source], series_instance_uid=_derived_uid("a"),
                    sop_instance_uid=_derived_uid("b"))
    sr = build_sr(_run(source, segment=True), [source], series_instance_uid=_derived_uid("c"),
                  sop_instance_uid=_derived_uid("d"), segmentation=seg)
    shape = (int(source.Rows), int(source.Columns))
    heat = HeatMap(str(source.SOPInstanceUID), np.zeros(shape, np.float32),
                   np.full(shape, 0.5, np.float32))
    sc = build_heatmap_capture(heat, source, _run(source), series_instance_uid=_derived_uid("e"),
                               sop_instance_uid=_derived_uid("f"))
    paths = {}
    for name, ds in (("sr", sr), ("seg", seg), ("sc", sc)):
        paths[name] = tmp_path / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    dump = subprocess.run([need_binary("dsrdump"), "-v", "+Pt", str(paths["sr"])],
                          capture_output=True, text=True, check=False)
    assert dump.returncode == 0, dump.stdout + dump.stderr
    for name, path in paths.items():
        errors = [e for e in _dciodvfy_errors(path)
                  if "needed to build DICOMDIR" not in e]
        assert not errors, f"{name}: {errors}"
        back = dcmread(path)
        assert back.PatientBirthDate == ""
        assert back.PatientSex == ""
        assert str(back.PatientName) == f"{CANARY}^ONE"
        assert back.PatientID == source.PatientID
    assert source.PatientBirthDate == BIRTH_DATE
    assert source.PatientSex == "U"


def test_a_result_that_cannot_be_built_fails_the_job_without_the_value(cr_file: Path) -> None:
    """What highdicom still refuses becomes a non-retryable job error naming the attribute."""
    source = _quirky(cr_file)
    with pytest.raises(JobError) as caught, _building("SR", [source]):
        raise _hd_error(patient_birth_date=BIRTH_DATE)
    assert str(caught.value) == "cannot build the SR: ValueError: PatientBirthDate: not a " \
        "valid DA value"
    assert caught.value.retryable is False
    with pytest.raises(JobError) as caught, _building("SEG", [source]):
        raise ReportError("segment numbers must be 1..2, got [1, 3]")
    assert str(caught.value) == "cannot build the SEG: segment numbers must be 1..2, got [1, 3]"


# -- log lines ------------------------------------------------------------------------------------
@pytest.fixture
def log_to(tmp_path: Path) -> Iterator[Callable[[bool], Path]]:
    """setup_logging into a file (text or JSON); the root logger is restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def configure(json_format: bool) -> Path:
        path = tmp_path / ("json.log" if json_format else "text.log")
        setup_logging(LoggingSettings(level="INFO", file=path, json_format=json_format))
        return path

    yield configure
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_escape_controls() -> None:
    assert escape_controls("EVIL\nFAKE\rLINE\t\x00\x1b[31m\u2028\x85") == \
        "EVIL\\nFAKE\\rLINE\\t\\x00\\x1b[31m\\u2028\\x85"
    assert escape_controls("1.2.840 DICOM_AI ÄÖ") == "1.2.840 DICOM_AI ÄÖ"


@pytest.mark.parametrize("json_format", [False, True], ids=["text", "json"])
def test_log_lines_cannot_be_forged_and_carry_no_values(
        json_format: bool, log_to: Callable[[bool], Path], cr_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A receiver started earlier in this process turns pydicom's value checks off (process-wide):
    # the warning this test reads needs them on.
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.WARN)
    path = log_to(json_format)
    logger = logging.getLogger("dicom_ai.network.handlers")
    logger.info("association from %s at %s:%s accepted", "EVIL\nFAKE LINE", "127.0.0.1", 1)
    error = _hd_error(patient_birth_date=BIRTH_DATE)
    logger.warning("job %d failed: %s", 7, error)  # an exception as an argument
    try:
        raise error
    except ValueError:
        logger.exception("job %d crashed", 8)  # and as exc_info: the traceback
    source = dcmread(cr_file, stop_before_pixels=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # pytest records warnings itself during a test: route them as the service does.
        logging.captureWarnings(False)
        logging.captureWarnings(True)
        source.PatientBirthDate = BIRTH_DATE  # pydicom logs and warns, quoting the value
        hd.valuerep.check_person_name(CANARY)  # highdicom warns, quoting the name
    for handler in logging.getLogger().handlers:
        handler.flush()
    written = path.read_text(encoding="utf-8")
    assert BIRTH_DATE not in written, written
    assert CANARY not in written, written
    if json_format:
        entries = [json.loads(line) for line in written.splitlines()]
        messages = [e["message"] for e in entries]
        assert "association from EVIL\\nFAKE LINE at 127.0.0.1:1 accepted" in messages
        crashed = next(e for e in entries if e["message"] == "job 8 crashed")
        trace = crashed["exception"]
    else:
        lines = written.splitlines()
        assert not any(line.startswith("FAKE LINE") for line in lines)
        assert any(line.endswith("association from EVIL\\nFAKE LINE at 127.0.0.1:1 accepted")
                   for line in lines)
        trace = written.split("job 8 crashed", 1)[1]
    assert "job 7 failed: ValueError: not a valid DA value" in written
    # The traceback keeps its frames (file, line, code) and gives the safe message.
    assert "Traceback (most recent call last):" in trace
    assert "highdicom/base.py" in trace
    assert "ValueError: not a valid DA value" in trace
    assert "Invalid value for VR DA: (value withheld)" in written
    assert "is unlikely to represent the intended person name" in written  # the warning, routed


def test_safe_traceback_follows_the_chain() -> None:
    with pytest.raises(JobError) as caught:
        _wrap_int_error(chained=True)
    trace = safe_traceback(caught.value)
    assert CANARY not in trace
    assert trace.count("Traceback (most recent call last):") == 2
    assert "The above exception was the direct cause of the following exception:" in trace
    assert trace.splitlines()[-1] == \
        "dicom_ai.exceptions.JobError: cannot load the images: ValueError: not a valid int"
