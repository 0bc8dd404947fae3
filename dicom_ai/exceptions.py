"""The one error tree of dicom-ai.

::

    DicomAIError
    ├── ConfigError            bad or missing setting (names the key)
    ├── StorageError           the store or index cannot do what was asked
    │   ├── InvalidUIDError    a UID that is not DICOM UID syntax (never becomes a path)
    │   └── OutOfSpaceError    free space below ``storage.min_free_bytes``
    ├── IngestError            a received instance is refused; carries its DIMSE status
    ├── NetworkError           association refused, aborted or timed out as a requestor
    └── JobError               a job cannot run; says whether a retry could help

Code that refuses a received instance raises :class:`IngestError` with the DIMSE status
to answer; the C-STORE handler maps everything else to "cannot understand".
"""

from __future__ import annotations


class DicomAIError(Exception):
    """Base class of every error dicom-ai raises on purpose."""


class ConfigError(DicomAIError):
    """A configuration value is missing or invalid; the message names the key."""


class StorageError(DicomAIError):
    """The store or the index cannot complete an operation."""


class InvalidUIDError(StorageError):
    """A UID is not valid DICOM UID syntax (PS3.5 section 9.1) or is longer than 64 chars."""


class OutOfSpaceError(StorageError):
    """Free space on the store is below the configured minimum."""


class IngestError(DicomAIError):
    """A received instance is refused.

    Parameters
    ----------
    status : int
        The DIMSE status to answer (PS3.4 annex B.2.3), e.g. ``0xA900``.
    reason : str
        Why; written to the quarantine record and the log (never patient data).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class NetworkError(DicomAIError):
    """An association could not be established or was aborted."""


class JobError(DicomAIError):
    """A job cannot complete; ``retryable`` is False when trying again cannot help.

    Parameters
    ----------
    message : str
        Why, for the job row and the operator.
    retryable : bool
        True for passing trouble (a busy resource), False for the input or the configuration.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
