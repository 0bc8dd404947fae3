"""DIMSE status codes dicom-ai answers or looks for, named once (PS3.7 annex C, PS3.4).

A low module without pynetdicom (only :mod:`dicom_ai.network` imports pynetdicom), so the
ingest path (:mod:`dicom_ai.ingest`) names the statuses its C-STORE and MPPS answers carry too.
Members are ``int``: pynetdicom takes them as a handler's status, and they compare, format
(``f"0x{s:04X}"``) and store as the number. The category of a status (success, warning,
failure...) is pynetdicom's ``pynetdicom.status.code_to_category``, used in
:mod:`dicom_ai.network.scu`. Codes shared by two services have one name per meaning (enum
aliases: the same member).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Status"]


class Status(IntEnum):
    """Named DIMSE statuses (the PS3 section of each is in its comment)."""

    SUCCESS = 0x0000
    # Pending (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4): a C-FIND match, C-MOVE/C-GET progress.
    PENDING = 0xFF00
    PENDING_OPTIONAL_KEYS_UNSUPPORTED = 0xFF01
    # Cancel (PS3.4 C.4.1.1.4): matching terminated (a C-CANCEL, or a limit of ours).
    CANCEL = 0xFE00
    MATCHING_TERMINATED = 0xFE00
    # General statuses (PS3.7 C.4: N-CREATE, N-SET, N-EVENT-REPORT...).
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    NO_SUCH_SOP_INSTANCE = 0x0112
    NO_SUCH_EVENT_TYPE = 0x0113
    NO_SUCH_SOP_CLASS = 0x0118
    MISSING_ATTRIBUTE = 0x0120
    # "Refused: Not Authorized" (PS3.7 C.5.x; pynetdicom accepts it for any DIMSE service).
    NOT_AUTHORISED = 0x0124
    # C-STORE (PS3.4 B.2.3) and Q/R (PS3.4 C.4) failures.
    OUT_OF_RESOURCES = 0xA700
    MOVE_DESTINATION_UNKNOWN = 0xA801
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    UNABLE_TO_PROCESS = 0xC000
    # Storage Commitment (PS3.4 J.3.3): an N-EVENT-REPORT naming a transaction we do not await.
    UNKNOWN_TRANSACTION = 0x0110
