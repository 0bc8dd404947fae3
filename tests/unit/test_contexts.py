"""The receiver's presentation contexts: the fast table equals what pynetdicom builds itself."""

from __future__ import annotations

import pytest
from pydicom.uid import UID
from pynetdicom import AE, build_context

from dicom_ai.network.contexts import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    VERIFICATION,
    scp_contexts,
    supported_contexts,
)


def _table(ae: AE) -> list[tuple[str, list[str], bool | None, bool | None]]:
    return [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax], cx.scu_role,
             cx.scp_role) for cx in ae.supported_contexts]


def test_fast_table_equals_add_supported_context() -> None:
    slow = AE()
    for cx in scp_contexts():
        slow.add_supported_context(str(cx.abstract_syntax), cx.transfer_syntax,
                                   scu_role=cx.scu_role, scp_role=cx.scp_role)
    fast = AE()
    fast._supported_contexts = supported_contexts(scp_contexts())
    assert _table(fast) == _table(slow)
    storage = [row for row in _table(fast) if row[0] in STORAGE_SOP_CLASSES]
    assert len(storage) == len(STORAGE_SOP_CLASSES)
    assert all(row[1] == ACCEPTED_TRANSFER_SYNTAXES and row[2] and row[3] for row in storage)


def test_storage_contexts_do_not_share_their_transfer_syntax_lists() -> None:
    contexts = [cx for cx in scp_contexts() if str(cx.abstract_syntax) in STORAGE_SOP_CLASSES]
    contexts[0].transfer_syntax.pop()
    assert [str(ts) for ts in contexts[1].transfer_syntax] == ACCEPTED_TRANSFER_SYNTAXES


def test_duplicate_abstract_syntaxes_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        supported_contexts([build_context(VERIFICATION), build_context(VERIFICATION)])


def test_deep_copies_are_equal_and_independent() -> None:
    # pynetdicom deep-copies the acceptor's table for every association it accepts.
    import copy

    table = scp_contexts()
    clone = copy.deepcopy(table)
    assert [(str(a.abstract_syntax), a.transfer_syntax, a.scu_role, a.scp_role)
            for a in table] == [(str(b.abstract_syntax), b.transfer_syntax, b.scu_role,
                                 b.scp_role) for b in clone]
    clone[-1].transfer_syntax.clear()
    clone[-1].scp_role = False
    assert [str(ts) for ts in table[-1].transfer_syntax] == ACCEPTED_TRANSFER_SYNTAXES
    assert table[-1].scp_role is True


def test_every_standard_storage_class_is_accepted_retired_ones_included() -> None:
    # pydicom's UID dictionary (PS3.6 annex A): every "... Storage" SOP class but storage
    # commitment, the media directory and Non-Patient Object Storage (PS3.4 GG).
    from pydicom._uid_dict import UID_dictionary
    from pynetdicom.sop_class import _NON_PATIENT_OBJECT_CLASSES

    non_patient = set(_NON_PATIENT_OBJECT_CLASSES.values())
    standard = {uid for uid, (name, kind, *_) in UID_dictionary.items()
                if kind == "SOP Class" and "Storage" in name and "Storage Commitment" not in name
                and uid != "1.2.840.10008.1.3.10" and uid not in non_patient}
    assert standard <= set(STORAGE_SOP_CLASSES)
    assert "1.2.840.10008.5.1.4.1.1.6" in STORAGE_SOP_CLASSES  # US Image Storage (Retired)
    assert len(STORAGE_SOP_CLASSES) == len(set(STORAGE_SOP_CLASSES))
    table = {str(cx.abstract_syntax) for cx in scp_contexts()}
    assert set(STORAGE_SOP_CLASSES) <= table
    assert not non_patient & table


def test_retired_and_extra_classes_are_dispatched_to_storage() -> None:
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    private = UID("1.2.826.0.1.3680043.10.543.9")
    contexts = scp_contexts([private, VERIFICATION, "1.2.840.10008.5.1.4.1.1.6"])
    table = supported_contexts(contexts)  # distinct: the duplicates were ignored
    assert len(table) == len(scp_contexts()) + 1
    assert private in table
    assert table[private].scp_role
    assert [str(ts) for ts in table[private].transfer_syntax] == ACCEPTED_TRANSFER_SYNTAXES
    for uid in ("1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3", private):
        assert uid_to_service_class(uid) is StorageServiceClass
    # A C-GET proposes a prefix of the list: the classes in current use come first.
    assert STORAGE_SOP_CLASSES.index("1.2.840.10008.5.1.4.1.1.6") >= 127


def test_extra_storage_classes_setting_validates_uids() -> None:
    from pydantic import ValidationError

    from dicom_ai.config import DicomSettings

    assert DicomSettings(extra_storage_classes=["1.2.3.4"]).extra_storage_classes == ["1.2.3.4"]
    for bad in ("1.2.03", "1..2", "abc", "1." * 40 + "1"):
        with pytest.raises(ValidationError):
            DicomSettings(extra_storage_classes=[bad])
