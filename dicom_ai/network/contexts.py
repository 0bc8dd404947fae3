"""Presentation contexts the receiver accepts and the sender proposes.

The transfer syntaxes and their order of preference are :mod:`dicom_ai.transfer_syntaxes`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts, build_context, sop_class
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_ai import transfer_syntaxes

# pynetdicom's names (pynetdicom.sop_class) for the SOP classes we serve or ask for.
VERIFICATION: str = Verification
"""Verification SOP Class (PS3.4 annex A)."""
MODALITY_PERFORMED_PROCEDURE_STEP: str = ModalityPerformedProcedureStep
"""Modality Performed Procedure Step SOP Class (PS3.4 annex F.7)."""
STORAGE_COMMITMENT_PUSH_MODEL: str = StorageCommitmentPushModel
"""Storage Commitment Push Model SOP Class (PS3.4 annex J)."""
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE: str = StorageCommitmentPushModelInstance
"""Its well-known SOP Instance (PS3.4 J.3.5)."""
PATIENT_ROOT_FIND: str = PatientRootQueryRetrieveInformationModelFind
PATIENT_ROOT_MOVE: str = PatientRootQueryRetrieveInformationModelMove
PATIENT_ROOT_GET: str = PatientRootQueryRetrieveInformationModelGet
STUDY_ROOT_FIND: str = StudyRootQueryRetrieveInformationModelFind
STUDY_ROOT_MOVE: str = StudyRootQueryRetrieveInformationModelMove
STUDY_ROOT_GET: str = StudyRootQueryRetrieveInformationModelGet
QUERY_RETRIEVE_SOP_CLASSES = [PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET,
                              STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET]
"""Patient Root and Study Root Query/Retrieve FIND/MOVE/GET (PS3.4 C.6.1, C.6.2)."""

ACCEPTED_TRANSFER_SYNTAXES: list[str] = list(transfer_syntaxes.ACCEPTED)
"""Every transfer syntax pydicom knows, uncompressed first (:data:`transfer_syntaxes.ACCEPTED`)."""

RETIRED_AND_OTHER_STORAGE_SOP_CLASSES: tuple[str, ...] = (
    # Storage SOP classes of the standard (PS3.4 B.5, PS3.6 annex A) that pynetdicom's
    # AllStoragePresentationContexts leaves out: the retired ones, which old modalities and
    # archives still send (Orthanc stores retired US images), DICOS and DICONDE.
    "1.2.840.10008.5.1.1.27",  # Stored Print Storage (Retired)
    "1.2.840.10008.5.1.1.29",  # Hardcopy Grayscale Image Storage (Retired)
    "1.2.840.10008.5.1.1.30",  # Hardcopy Color Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.8",  # Standalone Overlay Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.9",  # Standalone Curve Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.9.1",  # Waveform Storage - Trial (Retired)
    "1.2.840.10008.5.1.4.1.1.10",  # Standalone Modality LUT Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.11",  # Standalone VOI LUT Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.12.3",  # X-Ray Angiographic Bi-Plane Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image Storage - Trial (Retired)
    "1.2.840.10008.5.1.4.1.1.77.2",  # VL Multi-frame Image Storage - Trial (Retired)
    "1.2.840.10008.5.1.4.1.1.88.1",  # Text SR Storage - Trial (Retired)
    "1.2.840.10008.5.1.4.1.1.88.2",  # Audio SR Storage - Trial (Retired)
    "1.2.840.10008.5.1.4.1.1.88.3",  # Detail SR Storage - Trial (Retired)
    "1.2.840.10008.5.1.4.1.1.88.4",  # Comprehensive SR Storage - Trial (Retired)
    "1.2.840.10008.5.1.4.1.1.129",  # Standalone PET Curve Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.501.1",  # DICOS CT Image Storage
    "1.2.840.10008.5.1.4.1.1.501.2.1",  # DICOS Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.501.2.2",  # DICOS Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.501.3",  # DICOS Threat Detection Report Storage
    "1.2.840.10008.5.1.4.1.1.501.4",  # DICOS 2D AIT Storage
    "1.2.840.10008.5.1.4.1.1.501.5",  # DICOS 3D AIT Storage
    "1.2.840.10008.5.1.4.1.1.501.6",  # DICOS Quadrupole Resonance (QR) Storage
    "1.2.840.10008.5.1.4.1.1.601.1",  # Eddy Current Image Storage
    "1.2.840.10008.5.1.4.1.1.601.2",  # Eddy Current Multi-frame Image Storage
    "1.2.840.10008.5.1.4.34.1",  # RT Beams Delivery Instruction Storage - Trial (Retired)
)
"""Standard storage SOP classes beyond pynetdicom's list (a test holds it complete against
pydicom's UID dictionary). Non-Patient Object Storage (PS3.4 GG: hanging protocols, colour
palettes, implant templates, protocols, inventories) is left out: such objects have no patient
or study to index; ``[dicom] extra_storage_classes`` can add any class."""

STORAGE_SOP_CLASSES: list[str] = [
    *(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts),
    *RETIRED_AND_OTHER_STORAGE_SOP_CLASSES,
]
"""Every storage SOP class of the standard, retired ones included (PS3.4 annex B.5).

pynetdicom's classes come first, in its order: a requestor proposes at most 128 contexts
(PS3.8 9.3.2.2), so a sender that takes a prefix of this list (C-GET) keeps proposing the
classes in current use."""


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


def register_storage_classes(uids: Sequence[str]) -> None:
    """Have pynetdicom dispatch C-STOREs of ``uids`` to the Storage Service Class.

    pynetdicom answers a C-STORE of a SOP class it does not know with an error (and the
    association aborts) even when the context was accepted; ``register_uid`` is its documented
    hook for retired and private classes (PS3.4 B.5). Idempotent; only classes pynetdicom does
    not know yet are registered.
    """
    for uid in uids:
        if sop_class.uid_to_service_class(uid) is StorageServiceClass:
            continue
        sop_class.register_uid(uid, "DicomAIStorage_" + uid.replace(".", "_"),
                               StorageServiceClass)


def scp_contexts(extra_storage_classes: Sequence[str] = (), *,
                 storage_commitment: bool = False) -> list[PresentationContext]:
    """The contexts the receiver supports: Verification, MPPS, Q/R, every storage SOP class.

    With `storage_commitment` (some destination has ``storage_commitment = true``), also the
    Storage Commitment Push Model, for the N-EVENT-REPORT a destination sends on a new
    association (PS3.4 J.3.3): it is the association requestor but the SCP of the SOP class,
    so it may propose role selection (PS3.7 D.3.3.4); either proposal is accepted. Closed by
    default: without such a destination the context is refused.

    Storage contexts accept both roles: without role selection the caller stays the SCU (a
    plain C-STORE); a C-GET caller proposes the SCP role for them (PS3.7 D.3.3.4) and receives
    the retrieved instances on the same association (PS3.4 C.4.3).

    The table's size is a per-association cost (pynetdicom copies it for every association
    it accepts; :class:`AcceptorContext` keeps that copy cheap), and negotiation looks each
    proposed context up by abstract syntax, so its cost follows the at most 128 contexts
    proposed, not the table (``tests/unit/test_contexts.py`` measures both).

    Parameters
    ----------
    extra_storage_classes : sequence of str
        Private or otherwise unknown storage SOP classes to accept as well
        (``[dicom] extra_storage_classes``); classes already in the table are ignored.

    Returns
    -------
    list of PresentationContext
        Each storage class with :data:`ACCEPTED_TRANSFER_SYNTAXES`.
    """
    contexts: list[PresentationContext] = [_acceptor_context(build_context(VERIFICATION))]
    contexts.append(_acceptor_context(build_context(MODALITY_PERFORMED_PROCEDURE_STEP)))
    contexts.extend(_acceptor_context(build_context(uid)) for uid in QUERY_RETRIEVE_SOP_CLASSES)
    if storage_commitment:
        commitment = _acceptor_context(build_context(STORAGE_COMMITMENT_PUSH_MODEL))
        commitment.scu_role, commitment.scp_role = True, True  # as the destination proposes
        contexts.append(commitment)
    # pynetdicom validates each transfer syntax UID by regular expression as it is added: for
    # every syntax of every storage class that was 13 000 checks and a tenth of the receiver's
    # start-up. The list is validated once here and every storage context gets its own copy.
    template = _acceptor_context(build_context(STORAGE_SOP_CLASSES[0], ACCEPTED_TRANSFER_SYNTAXES))
    template.scu_role, template.scp_role = True, True
    taken = {str(cx.abstract_syntax) for cx in contexts}  # an extra class never replaces these
    wanted = dict.fromkeys([*STORAGE_SOP_CLASSES, *map(str, extra_storage_classes)])
    storage = [uid for uid in wanted if uid not in taken]
    register_storage_classes(storage)
    for uid in storage:
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
