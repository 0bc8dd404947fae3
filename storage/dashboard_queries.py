"""Reads of the web dashboard that :mod:`storage.api_queries` lacks.

All are lookups by key (a study UID list of one page, the job ids of its routing decisions, a
finding id), so they cost the same whatever the table sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import FindingRecord, Job, RoutingDecision

__all__ = ["finding", "job_notes", "routing_of_studies"]


def routing_of_studies(session: Session,
                       study_instance_uids: Sequence[str]) -> dict[str, list[RoutingDecision]]:
    """The routing decisions of some studies (one page of them), oldest first per study.

    Parameters
    ----------
    session : Session
        An open session.
    study_instance_uids : sequence of str
        The studies (indexed column ``routing_decisions.study_instance_uid``).

    Returns
    -------
    dict of str to list of RoutingDecision
        Every given UID, with an empty list when it has no decision yet.
    """
    found: dict[str, list[RoutingDecision]] = {uid: [] for uid in study_instance_uids}
    if not found:
        return found
    rows = session.scalars(
        select(RoutingDecision)
        .where(RoutingDecision.study_instance_uid.in_(list(found)))
        .order_by(RoutingDecision.id)
    ).all()
    for row in rows:
        found[row.study_instance_uid].append(row)
    return found


def job_notes(session: Session, job_ids: Sequence[int]) -> dict[int, str]:
    """The notes of those of some jobs that are done with one: the series the model skipped
    and why (``not applicable: ...`` when it took none, so the job has no result).

    Parameters
    ----------
    session : Session
        An open session.
    job_ids : sequence of int
        The jobs (primary key), e.g. those of one page's routing decisions.

    Returns
    -------
    dict of int to str
        Job id to ``jobs.error`` for done jobs with a note; other jobs are left out.
    """
    if not job_ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.error)
        .where(Job.id.in_(sorted(set(job_ids))), Job.state == "done", Job.error.is_not(None))
    ).all()
    return {int(job_id): str(note) for job_id, note in rows if note}


def finding(session: Session, finding_id: int) -> FindingRecord | None:
    """One finding by id, or None."""
    return session.get(FindingRecord, finding_id)
