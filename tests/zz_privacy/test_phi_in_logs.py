"""No log line written during the test session names a test patient (run last).

``tests/conftest.py`` appends every log record of the session (every logger, from DEBUG, with
exception text) to ``<basetemp>/session-records.log``; the services the tests start as
processes (``dicom-ai serve``, ``dicom-ai worker``) write their logs to ``*.log`` files under
the basetemp too, and the processes an in-process service spawns (local workers, receiver
processes) append to its ``[logging] file``, ``service.log`` in the test's folder (set by the
conftest's ``make_settings``). This test greps all of them for the names, IDs and birth dates of the
patients the tests use: the synthetic phantoms, pydicom's sample files and the names the tests
set. Not logging, and not scanned: what peers log (Orthanc's own log), the output of dcmtk
tools a test reads (dsrdump, dcmdump, findscu answers) and pytest's captured output.

Collected after ``tests/integration`` and ``tests/unit`` (and moved last by the conftest), it
checks what ran before it in the same session; run alone, it has nothing to check.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import SESSION_LOG

# Log files under the basetemp that are not ours: what a peer logs is its business.
PEER_LOGS = {"orthanc.log"}

# (what, pattern): names are matched case-insensitively (a query may upper-case them).
PATIENT_DATA: list[tuple[str, re.Pattern[str]]] = [
    (what, re.compile(pattern, re.IGNORECASE if what.endswith(("name", "data")) else 0))
    for what, pattern in [
        # dicom_ai.training.synth: SYNTH^0001 / SYN0001
        ("synthetic patient name", r"SYNTH\^\d{4}"),
        ("synthetic patient ID", r"\bSYN\d{4}\b"),
        # pydicom's sample files used by tests/peers.py and the tests
        ("pydicom sample patient name", r"CompressedSamples\^"),
        ("pydicom sample patient ID", r"\b[148](?:CT|NM|MR)1\b"),
        ("pydicom sample patient name", r"Lestrade\^G|Perfusion\^MCA|Last\^First\^mid"),
        ("pydicom sample patient ID", r"\bid00001\b"),
        ("pydicom sample birth date", r"\b19500704\b"),
        # names the tests set themselves
        ("test patient name", r"Doe\^J(?:a|\?)ne"),
        ("test patient ID", r"\bQR-1\b|\bPID-4711\b|\bPID-7731-SECRET\b|\bAUD-PID-5521\b"),
        ("test patient name", r"Secretname\^Verity|Auditee\^Secreta"),
        ("test birth date", r"\b19010203\b|\b19450607\b"),
        # the canaries of tests/integration/test_security_phi.py (every patient attribute) and
        # tests/unit/test_safe_errors.py, and their dashed birth dates (a vendor quirk)
        ("canary patient data", r"QZCANARY"),
        ("canary birth date", r"\b1873-?04-?29\b|\b1901-?12-?31\b"),
    ]
]


def _log_files(basetemp: Path) -> list[Path]:
    return sorted(p for p in basetemp.rglob("*.log")
                  if p.is_file() and p.name not in PEER_LOGS)


def _offending(path: Path) -> list[str]:
    found = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            for what, pattern in PATIENT_DATA:
                if pattern.search(line):
                    found.append(f"{path.name}:{number}: {what}: {line.strip()[:300]}")
                    break
    return found


def test_patterns_find_what_they_should(tmp_path: Path) -> None:
    """The grep itself works: each kind of identifier is found, UIDs and tags are not."""
    sample = tmp_path / "sample.txt"
    sample.write_text("C-FIND from X: PatientName=SYNTH^0003\nstored SYN0042 ok\n"
                      "query DOE^JANE\nid 1CT1 here\n"
                      "UID 1.2.826.0.1.3680043.8.498.10001 tag (0010,0010) job 4711\n"
                      "Unable to convert '1901-12-31' to 'DA' object\naddress qzcanary 1\n"
                      "PatientBirthDate: not a valid DA value (value withheld)\n")
    assert [line.split(": ")[1] for line in _offending(sample)] == [
        "synthetic patient name", "synthetic patient ID", "test patient name",
        "pydicom sample patient ID", "canary birth date", "canary patient data"]


def test_no_patient_data_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every log line of this session: not one names a test patient."""
    basetemp = tmp_path_factory.getbasetemp()
    files = _log_files(basetemp)
    assert basetemp / SESSION_LOG in files, "the conftest's session log is missing"
    offending = [hit for path in files for hit in _offending(path)]
    assert not offending, (f"{len(offending)} log line(s) name a test patient:\n"
                           + "\n".join(offending[:50]))
