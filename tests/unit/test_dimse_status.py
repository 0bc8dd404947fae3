"""DIMSE statuses named once (dicom_ai.dimse_status), categorised by pynetdicom."""

from __future__ import annotations

import subprocess
import sys

from pynetdicom.status import code_to_category

from dicom_ai.dimse_status import Status
from dicom_ai.network.scu import status_category
from tests.peers import REPO


def test_each_status_is_in_the_category_its_name_says() -> None:
    expected = {"SUCCESS": "Success", "PENDING": "Pending",
                "PENDING_OPTIONAL_KEYS_UNSUPPORTED": "Pending", "CANCEL": "Cancel",
                "MATCHING_TERMINATED": "Cancel"}
    for name, member in Status.__members__.items():
        assert code_to_category(member) == expected.get(name, "Failure"), name


def test_status_category_keeps_its_answers() -> None:
    """scu.status_category now asks pynetdicom; its answers for every 16-bit code are those
    of the hand-written version it replaced."""
    def before(status: int) -> str:
        if status == 0x0000:
            return "success"
        if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
            return "warning"
        return "failure"

    assert [status_category(c) for c in range(0x10000)] == [before(c) for c in range(0x10000)]


def test_statuses_are_the_numbers() -> None:
    code: int = Status.OUT_OF_RESOURCES
    assert code == 0xA700
    assert f"0x{Status.OUT_OF_RESOURCES:04X}" == "0xA700"
    assert Status["UNKNOWN_TRANSACTION"] is Status["PROCESSING_FAILURE"]  # one code, two names
    assert int(Status.PROCESSING_FAILURE) == 0x0110


def test_ingest_names_statuses_without_pynetdicom() -> None:
    """The import boundary: only dicom_ai.network imports pynetdicom."""
    code = ("import sys, dicom_ai.dimse_status, dicom_ai.transfer_syntaxes, "
            "dicom_ai.ingest.spool, dicom_ai.ingest.completion; "
            "print('pynetdicom' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
