"""DIMSE event handlers of the receiver.

Handlers stay thin: the C-STORE handler hands the received file to the
:class:`~dicom_ai.ingest.spool.Ingestor` and returns its status; nothing else happens on the
association thread. Logs carry UIDs, AE titles and addresses, never patient data.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_STORE, N_CREATE, N_SET

from dicom_ai.ingest.completion import MppsService
from dicom_ai.ingest.index import CANNOT_UNDERSTAND
from dicom_ai.ingest.spool import Ingestor, Received
from dicom_ai.network.contexts import MODALITY_PERFORMED_PROCEDURE_STEP

LOGGER = logging.getLogger(__name__)

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_CLASS = 0x0118

# A-ASSOCIATE-RJ: rejected-permanent (1), service-user (1), calling AE title not recognised (3).
_REJECT_PERMANENT, _SERVICE_USER, _CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03
# Rejected-transient (2), service-provider presentation (3), local limit exceeded (2).
_REJECT_TRANSIENT, _SERVICE_PROVIDER_PRESENTATION, _LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02


def _calling_ae(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def handle_echo(event: evt.Event) -> int:
    """C-ECHO (PS3.7 9.1.5): always success."""
    return SUCCESS


def handle_store(event: evt.Event, ingestor: Ingestor) -> int:
    """C-STORE (PS3.4 B.2.2): durably accept the received file or refuse it.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The EVT_C_STORE event (chunked receive: the dataset is already a file on disk).
    ingestor : Ingestor
        Moves the file into the store and indexes it.

    Returns
    -------
    int
        The DIMSE status to answer.
    """
    request = cast(C_STORE, event.request)
    try:
        path = Path(event.dataset_path)
    except AttributeError:
        LOGGER.error("chunked receive is off: cannot store without a dataset file")
        return CANNOT_UNDERSTAND
    return ingestor.ingest(
        Received(
            path=path,
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            calling_ae_title=_calling_ae(event),
        )
    )


def handle_requested(event: evt.Event, allowed: list[str]) -> None:
    """Reject associations from hosts outside the allow-list (checked before negotiation).

    Parameters
    ----------
    event : pynetdicom.events.Event
        The EVT_REQUESTED notification.
    allowed : list of str
        IP addresses or networks (CIDR); empty allows every host.
    """
    if not allowed:
        return
    address = str(event.assoc.requestor.address)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if ip is not None and any(ip in ipaddress.ip_network(n, strict=False) for n in allowed):
        return
    primitive = event.assoc.requestor.primitive
    calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
    LOGGER.warning("rejected association from %s (%s): host not allowed", address, calling)
    event.assoc.acse.send_reject(_REJECT_PERMANENT, _SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
    # As pynetdicom's own rejections do: stop the association thread so the A-ASSOCIATE-RJ is
    # written before the connection closes (otherwise the caller mostly sees an abort).
    event.assoc.kill()


def handle_accepted(event: evt.Event) -> None:
    """Log an accepted association (notification; must not raise)."""
    LOGGER.info("association from %s at %s:%s accepted", _calling_ae(event),
                event.assoc.requestor.address, event.assoc.requestor.port)


def handle_rejected(event: evt.Event) -> None:
    """Log a rejected association (notification; must not raise)."""
    LOGGER.warning("association from %s at %s rejected", _calling_ae(event),
                   event.assoc.requestor.address)


def handle_released(event: evt.Event) -> None:
    """Log a released association (notification; must not raise)."""
    LOGGER.info("association from %s released", _calling_ae(event))


def handle_aborted(event: evt.Event) -> None:
    """Log an aborted association (notification; must not raise)."""
    LOGGER.warning("association from %s aborted", _calling_ae(event))


def handle_n_create(event: evt.Event, mpps: MppsService) -> tuple[int, Dataset | None]:
    """N-CREATE of a Modality Performed Procedure Step (PS3.4 F.7.2.1)."""
    request = cast(N_CREATE, event.request)
    if request.AffectedSOPClassUID != MODALITY_PERFORMED_PROCEDURE_STEP:
        return NO_SUCH_SOP_CLASS, None
    sop_uid = request.AffectedSOPInstanceUID
    if not sop_uid:  # the SCU may leave the UID to the SCP; we require it to track the step
        return PROCESSING_FAILURE, None
    ds = event.attribute_list
    status = mpps.create(str(sop_uid), ds)
    return status, (ds if status == SUCCESS else None)


def handle_n_set(event: evt.Event, mpps: MppsService) -> tuple[int, Dataset | None]:
    """N-SET of a Modality Performed Procedure Step (PS3.4 F.7.2.2)."""
    request = cast(N_SET, event.request)
    if request.RequestedSOPClassUID != MODALITY_PERFORMED_PROCEDURE_STEP:
        return NO_SUCH_SOP_CLASS, None
    ds = event.modification_list
    status = mpps.set(str(request.RequestedSOPInstanceUID), ds)
    return status, (ds if status == SUCCESS else None)
