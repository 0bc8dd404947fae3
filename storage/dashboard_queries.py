"""Reads of the web dashboard that :mod:`storage.api_queries` lacks.

Both are lookups by key (a study UID list of one page, a finding id), so they cost the same
whatever the table sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import FindingRecord, RoutingDecision

__all__ = ["finding", "routing_of_studies"]


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


def finding(session: Session, finding_id: int) -> FindingRecord | None:
    """One finding by id, or None."""
    return session.get(FindingRecord, finding_id)
