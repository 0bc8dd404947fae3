"""Query/retrieve as a requestor (PS3.4 annex C): C-FIND, C-MOVE and C-GET against an archive.

Used by batch jobs (:mod:`dicom_ai.batch`). Everything here speaks Study Root (the model every
archive supports). Pending responses are collected, warnings kept, failures raised with their
status. C-GET receives the instances on the same association and hands each one to the
:class:`~dicom_ai.ingest.spool.Ingestor`, exactly as the receiver does with C-STORE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
    XRayAngiographicImageStorage,
)
from pynetdicom.status import STATUS_CANCEL, STATUS_PENDING, code_to_category

from dicom_ai import transfer_syntaxes
from dicom_ai.config import DicomSettings
from dicom_ai.dimse_status import Status
from dicom_ai.exceptions import NetworkError
from dicom_ai.ingest.spool import Ingestor
from dicom_ai.network.contexts import STORAGE_SOP_CLASSES
from dicom_ai.network.scp import guard_receive, handle_store
from dicom_ai.network.scu import Peer, _associate
from dicom_ai.network.tuning import handle_stores_in_reader

LOGGER = logging.getLogger(__name__)

__all__ = ["FindResult", "RetrieveResult", "find", "get_classes", "get_study", "move_study"]

# A C-GET proposes one context per storage class it wants to receive, and a requestor may
# propose at most 128: the classes an imaging archive sends for AI work come first.
_GET_CLASSES_FIRST: tuple[str, ...] = (
    ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing, CTImageStorage, EnhancedCTImageStorage,
    MRImageStorage, EnhancedMRImageStorage, SecondaryCaptureImageStorage,
    ComprehensiveSRStorage, Comprehensive3DSRStorage, SegmentationStorage,
    DigitalMammographyXRayImageStorageForPresentation, XRayAngiographicImageStorage,
    UltrasoundImageStorage, PositronEmissionTomographyImageStorage,
    NuclearMedicineImageStorage,
)


#: What a C-GET offers to receive (:data:`dicom_ai.transfer_syntaxes.RETRIEVE`).
GET_TRANSFER_SYNTAXES = list(transfer_syntaxes.RETRIEVE)


def _status(rsp: Dataset | None) -> int | None:
    return int(rsp.Status) if rsp is not None and "Status" in rsp else None


@dataclass
class FindResult:
    """The matches of a C-FIND, and whether the archive stopped early.

    ``truncated`` is True when the archive ended with 0xFE00 (matching terminated): archives
    such as Orthanc (``LimitFindResults``) answer a query with too many matches that way.
    """

    matches: list[Dataset]
    truncated: bool = False


def find(peer: Peer, settings: DicomSettings, identifier: Dataset) -> FindResult:
    """C-FIND (Study Root) and collect every match.

    Parameters
    ----------
    peer : Peer
        The archive.
    settings : DicomSettings
        Our AE title and TLS material.
    identifier : Dataset
        The query: QueryRetrieveLevel, matching keys and the return keys (empty values).

    Returns
    -------
    FindResult
        The identifiers of the pending responses; ``truncated`` if the archive cut them short.

    Raises
    ------
    NetworkError
        No association, no response, or a failure status (named).
    """
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer, settings)
    result = FindResult([])
    try:
        for rsp, found in assoc.send_c_find(identifier,
                                            StudyRootQueryRetrieveInformationModelFind):
            status = _status(rsp)
            if status is None:
                raise NetworkError(f"C-FIND to {peer.ae_title}: no response (timeout or abort)")
            category = code_to_category(status)
            if category == STATUS_PENDING:
                if found is not None:
                    result.matches.append(found)
            elif category == STATUS_CANCEL:  # PS3.4 C.4.1.1.4: matching terminated (a limit)
                result.truncated = True
            elif status != Status.SUCCESS:
                raise NetworkError(f"C-FIND to {peer.ae_title} failed with status "
                                   f"0x{status:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return result


@dataclass(frozen=True)
class RetrieveResult:
    """The outcome of a C-MOVE or C-GET of one study.

    ``status`` is the final DIMSE status: 0x0000 all sub-operations succeeded, 0xB000 some
    failed (a partial result, counts say how many), anything else failed.
    """

    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        """Every sub-operation succeeded (or finished with a warning)."""
        return self.status == Status.SUCCESS and self.failed == 0


def _final(peer: Peer, what: str, responses: Iterator[tuple[Dataset, Dataset | None]]
           ) -> RetrieveResult:
    last: Dataset | None = None
    for rsp, _identifier in responses:
        status = _status(rsp)
        if status is None:
            raise NetworkError(f"{what} from {peer.ae_title}: no response (timeout or abort)")
        last = rsp
    if last is None:
        raise NetworkError(f"{what} from {peer.ae_title}: no final response")

    def count(keyword: str) -> int:
        return int(last.get(keyword, 0) or 0)

    return RetrieveResult(int(last.Status), count("NumberOfCompletedSuboperations"),
                          count("NumberOfFailedSuboperations"),
                          count("NumberOfWarningSuboperations"))


def _study_identifier(study_instance_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_instance_uid
    return ds


def move_study(peer: Peer, settings: DicomSettings, study_instance_uid: str,
               destination_ae_title: str) -> RetrieveResult:
    """C-MOVE one study to `destination_ae_title` (normally our own receiver).

    The archive must know that AE title (host and port); the instances arrive on separate
    associations to that receiver.

    Raises
    ------
    NetworkError
        No association or no final response.
    """
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = _associate(ae, peer, settings)
    try:
        return _final(peer, "C-MOVE", assoc.send_c_move(
            _study_identifier(study_instance_uid), destination_ae_title,
            StudyRootQueryRetrieveInformationModelMove))
    finally:
        if assoc.is_established:
            assoc.release()


def get_classes(sop_classes: Sequence[str] | None,
                extra_storage_classes: Sequence[str] = ()) -> list[str]:
    """The storage classes a C-GET proposes (127 at most: one context is the GET model's).

    Parameters
    ----------
    sop_classes : sequence of str or None
        The study's SOP classes as the archive listed them (C-FIND ``SOPClassesInStudy``), or
        None when unknown.
    extra_storage_classes : sequence of str
        ``[dicom] extra_storage_classes``: classes the receiver accepts beyond the standard's.

    Returns
    -------
    list of str
        The listed classes that we store, in the archive's order; every class we store (the
        common imaging classes first) when none is listed or none of those listed is one we
        store.
    """
    ours = dict.fromkeys([*STORAGE_SOP_CLASSES, *map(str, extra_storage_classes)])
    # Negotiating a context per class costs time per association (measured against Orthanc:
    # 70-200 ms for 127 classes, about 2 ms for one): propose what the study holds.
    listed = [c for c in dict.fromkeys(str(c).strip() for c in sop_classes or ()) if c in ours]
    if listed:
        return listed[:127]
    ordered = [*_GET_CLASSES_FIRST, *(c for c in ours if c not in _GET_CLASSES_FIRST)]
    return ordered[:127]


def get_study(peer: Peer, settings: DicomSettings, study_instance_uid: str,
              ingestor: Ingestor, sop_classes: Sequence[str] | None = None) -> RetrieveResult:
    """C-GET one study: the archive sends its instances back on this association.

    Each instance is received straight to a file in the store's ``incoming/`` folder and
    ingested like a C-STORE to the receiver (durable and indexed before its success is
    answered, so the archive sends the next one only then). Several studies may be retrieved
    at once from several threads, each on its own association, sharing one `ingestor`.

    Parameters
    ----------
    peer : Peer
        The archive.
    settings : DicomSettings
        Our AE title, TLS material and ``extra_storage_classes``.
    study_instance_uid : str
        The study.
    ingestor : Ingestor
        Accepts each received instance (thread-safe; one per process is enough).
    sop_classes : sequence of str, optional
        The study's SOP classes (C-FIND ``SOPClassesInStudy``): only those are proposed
        (:func:`get_classes`). An instance of a class not proposed is a failed sub-operation.

    Returns
    -------
    RetrieveResult
        The final status and sub-operation counts.

    Raises
    ------
    NetworkError
        No association or no final response.
    """
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = 0
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles: list[Any] = []
    for sop_class in get_classes(sop_classes, settings.extra_storage_classes):
        ae.add_requested_context(sop_class, GET_TRANSFER_SYNTAXES)
        roles.append(build_role(sop_class, scp_role=True))
    # Stream to incoming/, so accepting is a rename. pynetdicom reads this switch per message,
    # process-wide: it is set for good (as the receiver does), never restored, because a
    # restore by one retrieval would turn it off under another still receiving.
    _config.STORE_RECV_CHUNKED_DATASET = True
    handlers: list[Any] = [(evt.EVT_C_STORE, handle_store, [ingestor])]
    assoc = _associate(ae, peer, settings, ext_neg=roles, evt_handlers=handlers)
    # Into incoming/ (this association only); a full disk is answered 0xA700, as on our
    # own receiver.
    guard_receive(assoc, ingestor.store.incoming)
    if settings.tune_network:
        # Each C-STORE answered on the thread that read it: no hand-off to this thread and
        # back per instance (tuning.handle_stores_in_reader).
        handle_stores_in_reader(assoc)
    try:
        return _final(peer, "C-GET", assoc.send_c_get(
            _study_identifier(study_instance_uid),
            StudyRootQueryRetrieveInformationModelGet))
    finally:
        if assoc.is_established:
            assoc.release()
