"""What a C-GET proposes: the study's own SOP classes (from C-FIND), else every class we store."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicom_ai.batch.run import BatchQuery, _identifier, _sop_classes
from dicom_ai.network.contexts import STORAGE_SOP_CLASSES
from dicom_ai.network.qr_scu import get_classes

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
PRIVATE = "1.2.3.4.5.6.7"


def test_the_listed_classes_we_store_are_proposed_once_in_the_archive_order() -> None:
    assert get_classes([MR, CT, MR]) == [MR, CT]
    assert get_classes([PRIVATE, CT]) == [CT]  # a class we never store is not proposed
    assert get_classes([PRIVATE], [PRIVATE]) == [PRIVATE]  # unless [dicom] extra classes say


def test_unknown_or_unusable_lists_propose_every_class_common_ones_first() -> None:
    for classes in (None, [], [PRIVATE]):
        proposed = get_classes(classes)
        assert len(proposed) == 127  # 128 contexts at most, one is the GET model's
        assert proposed[:4] == ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                                "1.2.840.10008.5.1.4.1.1.1.1.1", CT]
        assert set(proposed) <= set(STORAGE_SOP_CLASSES)


def test_sop_classes_in_study_read_from_a_match() -> None:
    match = Dataset()
    assert _sop_classes(match) == ()
    match.SOPClassesInStudy = ""
    assert _sop_classes(match) == ()
    match.SOPClassesInStudy = CT
    assert _sop_classes(match) == (CT,)
    match.SOPClassesInStudy = MultiValue(UID, [CT, MR])
    assert _sop_classes(match) == (CT, MR)


def test_only_a_get_source_asks_for_sop_classes_in_study() -> None:
    assert "SOPClassesInStudy" in _identifier(BatchQuery(), sop_classes=True)
    assert "SOPClassesInStudy" not in _identifier(BatchQuery())
