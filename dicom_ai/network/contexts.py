"""Presentation contexts the receiver accepts and the sender proposes.

As an acceptor pynetdicom picks, per proposed context, the first transfer syntax of its own list
that the requestor offered: the order below is our preference. Uncompressed syntaxes come first;
every compressed syntax is also accepted and stored exactly as sent (never transcoded).
"""

from __future__ import annotations

import copy
from typing import Any

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AllStoragePresentationContexts, build_context
from pynetdicom.presentation import PresentationContext

VERIFICATION = "1.2.840.10008.1.1"
"""Verification SOP Class (PS3.4 annex A)."""
MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"
"""Modality Performed Procedure Step SOP Class (PS3.4 annex F.7)."""
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
QUERY_RETRIEVE_SOP_CLASSES = [PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET,
                              STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET]
"""Patient Root and Study Root Query/Retrieve FIND/MOVE/GET (PS3.4 C.6.1, C.6.2)."""

_UNCOMPRESSED: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

ACCEPTED_TRANSFER_SYNTAXES: list[str] = _UNCOMPRESSED + [
    str(ts) for ts in AllTransferSyntaxes if ts not in _UNCOMPRESSED
]
"""Every transfer syntax pydicom knows, uncompressed first."""

STORAGE_SOP_CLASSES: list[str] = [
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
]
"""Every storage SOP class pynetdicom knows (PS3.4 annex B.5)."""


class AcceptorContext(PresentationContext):
    """A supported context that is cheap to deep-copy.

    pynetdicom deep-copies the acceptor's whole context table for every association it
    accepts: generic ``deepcopy`` of 170 contexts with 40 transfer syntaxes each took about a
    quarter of the receiver's CPU per association. A context's only mutable state is its
    transfer syntax list (UIDs are immutable strings), so a copy shares everything else.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> AcceptorContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def _acceptor_context(context: PresentationContext) -> AcceptorContext:
    clone = AcceptorContext()
    clone.__dict__.update(context.__dict__)
    clone._transfer_syntax = list(context._transfer_syntax)
    return clone


def scp_contexts() -> list[PresentationContext]:
    """The contexts the receiver supports: Verification, MPPS, Q/R, every storage SOP class.

    Storage contexts accept both roles: without role selection the caller stays the SCU (a
    plain C-STORE); a C-GET caller proposes the SCP role for them (PS3.7 D.3.3.4) and receives
    the retrieved instances on the same association (PS3.4 C.4.3).

    Returns
    -------
    list of PresentationContext
        Each storage class with :data:`ACCEPTED_TRANSFER_SYNTAXES`.
    """
    contexts: list[PresentationContext] = [_acceptor_context(build_context(VERIFICATION))]
    contexts.append(_acceptor_context(build_context(MODALITY_PERFORMED_PROCEDURE_STEP)))
    contexts.extend(_acceptor_context(build_context(uid)) for uid in QUERY_RETRIEVE_SOP_CLASSES)
    # pynetdicom validates each transfer syntax UID by regular expression as it is added: for
    # every syntax of every storage class that was 13 000 checks and a tenth of the receiver's
    # start-up. The list is validated once here and every storage context gets its own copy.
    template = _acceptor_context(build_context(STORAGE_SOP_CLASSES[0], ACCEPTED_TRANSFER_SYNTAXES))
    template.scu_role, template.scp_role = True, True
    for uid in STORAGE_SOP_CLASSES:
        context = copy.deepcopy(template)  # AcceptorContext: its own transfer syntax list
        context.abstract_syntax = uid
        contexts.append(context)
    return contexts


def supported_contexts(contexts: list[PresentationContext]) -> dict[UID, PresentationContext]:
    """``contexts`` as an acceptor's table, without validating their UIDs a second time.

    ``AE.add_supported_context`` rebuilds and revalidates every context (another 13 000 regular
    expression checks for :func:`scp_contexts`), and the ``AE.supported_contexts`` setter drops
    the SCP/SCU roles. Assign the result to ``ae._supported_contexts``: the dictionary
    ``add_supported_context`` fills, keyed by abstract syntax (a test holds both paths equal).

    Parameters
    ----------
    contexts : list of PresentationContext
        Contexts with distinct abstract syntaxes, e.g. from :func:`scp_contexts`.

    Returns
    -------
    dict
        Abstract syntax UID -> context.
    """
    table = {UID(str(cx.abstract_syntax)): cx for cx in contexts}
    if len(table) != len(contexts):
        raise ValueError("supported contexts need distinct abstract syntaxes")
    return table
