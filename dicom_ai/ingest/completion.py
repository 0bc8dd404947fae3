"""Deciding when a series or study is completely received, and announcing it.

Two rules complete a study, both persisted in the index so they survive a restart:

* quiet period: a series that received nothing for ``series_quiet_seconds`` completes; a study
  completes once all its series have and it received nothing for ``study_quiet_seconds``;
* MPPS (PS3.4 annex F.7): a step set to COMPLETED whose referenced instances have all arrived
  completes their study at once, without waiting.

Each completion writes a durable :class:`storage.models.Event` (``series.complete`` or
``study.complete``) that later stages consume with :func:`storage.repository.pending_events`;
in the serve process the monitor also calls ``on_event`` callbacks. An instance that arrives
after completion re-opens its study, which then completes (and is announced) again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom.dataset import Dataset

from dicom_ai.config import CompletionSettings
from dicom_ai.dimse_status import Status
from dicom_ai.periodic import PeriodicWorker
from storage import repository
from storage.db import Database

LOGGER = logging.getLogger(__name__)

# MPPS statuses (PS3.3 C.4.14, Performed Procedure Step Status).
IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"


@dataclass(frozen=True)
class CompletionEvent:
    """A series or study that became complete."""

    id: int
    kind: str
    study_instance_uid: str
    series_instance_uid: str | None
    reason: str
    created_at: datetime


class CompletionMonitor(PeriodicWorker):
    """Polls the index every ``poll_seconds`` and completes what is due; one per serve
    process is enough.

    Several monitors (several receiver hosts) may run against one database: completion is a
    conditional update, so each completion is announced once.

    Parameters
    ----------
    db : Database
        The index database.
    settings : CompletionSettings
        Quiet periods and the poll interval.
    on_event : callable, optional
        Called with each :class:`CompletionEvent` after it is committed.
    """

    def __init__(
        self,
        db: Database,
        settings: CompletionSettings,
        on_event: Callable[[CompletionEvent], None] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.on_event = on_event
        # The index may be full or unavailable for a while: keep polling, log the outage once.
        super().__init__("completion", LOGGER, [("completion check", self.run_once)],
                         interval=settings.poll_seconds)

    def run_once(self, now: datetime | None = None) -> list[CompletionEvent]:
        """Complete everything due at `now` and return the events emitted."""
        now = now or datetime.now(UTC)
        with self.db.write_session() as session:
            emitted = repository.complete_by_mpps(session, now=now)
            emitted += repository.complete_quiet(
                session,
                now=now,
                series_quiet=self.settings.series_quiet_seconds,
                study_quiet=self.settings.study_quiet_seconds,
            )
            session.flush()
            events = [
                CompletionEvent(e.id, e.kind, e.study_instance_uid, e.series_instance_uid,
                                e.reason, e.created_at)
                for e in emitted
            ]
        for event in events:
            LOGGER.info("%s %s%s (%s)", event.kind, event.study_instance_uid,
                        f" series {event.series_instance_uid}" if event.series_instance_uid
                        else "", event.reason)
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:  # a consumer bug must not stop completion
                    LOGGER.exception("completion consumer failed on event %d", event.id)
        return events


def referenced_instances(ds: Dataset) -> list[str]:
    """The SOP Instance UIDs an MPPS's Performed Series Sequence references (PS3.3 C.4.15)."""
    uids: list[str] = []
    for series in ds.get("PerformedSeriesSequence", None) or []:
        for keyword in ("ReferencedImageSequence",
                        "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in series.get(keyword, None) or []:
                uid = item.get("ReferencedSOPInstanceUID")
                if uid:
                    uids.append(str(uid))
    return uids


def _study_uid(ds: Dataset) -> str | None:
    for item in ds.get("ScheduledStepAttributesSequence", None) or []:
        uid = item.get("StudyInstanceUID")
        if uid:
            return str(uid)
    return None


class MppsService:
    """The state of Modality Performed Procedure Steps, kept in the index.

    Parameters
    ----------
    db : Database
        The index database.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, sop_instance_uid: str, ds: Dataset) -> int:
        """Handle an N-CREATE: the step must start IN PROGRESS (PS3.4 F.7.2.1).

        Returns
        -------
        int
            A DIMSE status.
        """
        status = str(ds.get("PerformedProcedureStepStatus", "") or "")
        if status != IN_PROGRESS:
            return Status.INVALID_ATTRIBUTE_VALUE
        with self.db.write_session() as session:
            created = repository.upsert_mpps(
                session,
                sop_instance_uid=sop_instance_uid,
                status=status,
                study_instance_uid=_study_uid(ds),
                referenced_sop_instance_uids=referenced_instances(ds),
                now=datetime.now(UTC),
                create=True,
            )
        LOGGER.info("MPPS %s created (%s)", sop_instance_uid, status)
        return Status.SUCCESS if created else Status.DUPLICATE_SOP_INSTANCE

    def set(self, sop_instance_uid: str, ds: Dataset) -> int:
        """Handle an N-SET: update a step still IN PROGRESS (PS3.4 F.7.2.2).

        Returns
        -------
        int
            A DIMSE status.
        """
        status = ds.get("PerformedProcedureStepStatus")
        status = str(status) if status else None
        if status not in (None, IN_PROGRESS, COMPLETED, DISCONTINUED):
            return Status.INVALID_ATTRIBUTE_VALUE
        with self.db.write_session() as session:
            current = repository.mpps_status(session, sop_instance_uid)
            if current is None:
                return Status.NO_SUCH_OBJECT_INSTANCE
            if current != IN_PROGRESS:
                return Status.PROCESSING_FAILURE  # a final step may not be modified
            refs = referenced_instances(ds) if "PerformedSeriesSequence" in ds else None
            repository.upsert_mpps(
                session,
                sop_instance_uid=sop_instance_uid,
                status=status,
                study_instance_uid=_study_uid(ds),
                referenced_sop_instance_uids=refs,
                now=datetime.now(UTC),
                create=False,
            )
        LOGGER.info("MPPS %s set (%s)", sop_instance_uid, status or "no status change")
        return Status.SUCCESS
