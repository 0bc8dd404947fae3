"""What the receiver treats as possibly our own output, and the mark it looks for."""

from __future__ import annotations

import pytest

from dicom_ai.ingest.spool import OWN_MANUFACTURER, _is_result_class
from dicom_ai.reporting.sr import MANUFACTURER


def test_the_receiver_looks_for_the_manufacturer_our_objects_carry() -> None:
    assert OWN_MANUFACTURER == MANUFACTURER


@pytest.mark.parametrize(("sop_class", "ours"), [
    ("1.2.840.10008.5.1.4.1.1.88.33", True),   # Comprehensive SR
    ("1.2.840.10008.5.1.4.1.1.88.34", True),   # Comprehensive 3D SR
    ("1.2.840.10008.5.1.4.1.1.66.4", True),    # Segmentation
    ("1.2.840.10008.5.1.4.1.1.7", True),       # Secondary Capture (our heat-maps)
    ("1.2.840.10008.5.1.4.1.1.7.4", True),     # Multi-frame True Color SC
    ("1.2.840.10008.5.1.4.1.1.1", False),      # CR: images are never looked up
    ("1.2.840.10008.5.1.4.1.1.2", False),      # CT
    ("1.2.840.10008.5.1.4.1.1.77.1.4", False),  # VL Photographic (starts with 7, not 7.)
    ("1.2.840.10008.5.1.4.1.1.66", False),     # Raw Data
    ("1.2.3.4.5.1.4.1.1.7", False),            # private
])
def test_only_the_storage_classes_we_write_are_checked(sop_class: str, ours: bool) -> None:
    assert _is_result_class(sop_class) is ours
