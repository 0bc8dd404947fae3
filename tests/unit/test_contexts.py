"""The receiver's presentation contexts: the fast table equals what pynetdicom builds itself."""

from __future__ import annotations

import pytest
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
