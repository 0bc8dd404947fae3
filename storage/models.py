"""SQLAlchemy 2 models of the index: the DICOM hierarchy plus completion bookkeeping.

Patient -> Study -> Series -> Instance mirrors PS3.3's information model. Only the header fields
a router or an operator needs are copied here; the files stay the source of truth, so the index
can always be rebuilt from the store (see :mod:`dicom_ai.ingest.recovery`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

#: Lists and objects stored as JSON (migration 0010): TEXT holding JSON on SQLite, JSONB on
#: PostgreSQL (binary, has an equality operator for DISTINCT/UNION, and can be GIN-indexed).
JSONDocument = JSON().with_variant(JSONB(), "postgresql")

# States of a study or series as it is received.
RECEIVING = "receiving"
COMPLETE = "complete"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Normalise to UTC before storing."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Attach UTC to values read back without a zone."""
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Patient(Base):
    """A patient as identified by the sending system (PatientID + IssuerOfPatientID)."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """A study and its receive/completion state."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(32), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    state: Mapped[str] = mapped_column(String(16), default=RECEIVING, index=True)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completion_reason: Mapped[str | None] = mapped_column(String(16))
    # How many times the study became complete (a late instance re-opens it).
    completion_count: Mapped[int] = mapped_column(Integer, default=0)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series and its receive/completion state."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_date: Mapped[str] = mapped_column(String(8), default="")
    state: Mapped[str] = mapped_column(String(16), default=RECEIVING, index=True)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A series of our own results (SR, SEG, heat-map SC) received back: indexed, never routed.
    own_results: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance and where its file is."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(260))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())

    series: Mapped[Series] = relationship(back_populates="instances")


class Mpps(Base):
    """A Modality Performed Procedure Step (PS3.4 annex F.7) as N-CREATE/N-SET left it."""

    __tablename__ = "mpps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    # The SOP Instance UIDs the COMPLETED step references.
    referenced_sop_instance_uids: Mapped[list[str]] = mapped_column(JSONDocument, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    satisfied_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Event(Base):
    """A durable event (e.g. ``study.complete``) that later stages consume exactly once."""

    __tablename__ = "events"
    # Consumers ask for one kind (the scheduler: study.complete); series.complete events are
    # never consumed, so without the kind first the pending scan would grow with every series.
    __table_args__ = (Index("ix_events_pending", "consumed_at", "id"),
                      Index("ix_events_kind_pending", "kind", "consumed_at", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    consumed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class QuarantineRecord(Base):
    """An instance that was refused, where its file went, and why."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(260))
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


# -- closing the loop: routing, jobs, findings, result objects, outbox -------------------------
# Job states. A failed attempt that may be retried goes back to PENDING with a later
# ``not_before``; FAILED is terminal (attempts exhausted or an error no retry can fix).
PENDING = "pending"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
# A job that met a full disk or an unavailable index: no attempt used, due again after
# ``workers.resource_wait_seconds`` (its ``error`` says why it waits).
WAITING = "waiting"
# A job in one of these states will still run: its study is busy (retention keeps it, a
# re-route waits for it).
UNFINISHED = (PENDING, RUNNING, WAITING)
# Outbox states: PENDING until the destination answered success (or a warning); never dropped.
SENT = "sent"
# For a destination with storage_commitment: SENT rows await the destination's N-EVENT-REPORT
# (PS3.4 J.3.3); COMMITTED once it reported the object committed (only then delivered).
COMMITTED = "committed"


class RoutingDecision(Base):
    """What routing decided for one series of a completed study (matched or not, and why)."""

    __tablename__ = "routing_decisions"
    __table_args__ = (Index("ix_routing_study", "study_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int | None] = mapped_column(Integer)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    # The matching route, or None: the series matched no route (recorded, never dropped).
    route: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Job(Base):
    """One model run over the matching series of one study, for one route.

    The database row is the durable truth; dispatchers carry only its id. A worker claims it by
    a conditional update that sets ``lease_owner``/``lease_expires_at``; a job whose lease expired
    (a killed worker) is claimable again. Completion is conditional on still holding the lease,
    so a job runs at most once to completion.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_due", "state", "not_before"),
        Index("ix_jobs_study_route", "study_instance_uid", "route"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    # The series the route matched.
    series_instance_uids: Mapped[list[str]] = mapped_column(JSONDocument, default=list)
    route: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    # The earlier job of the same study and route whose results this one replaces.
    supersedes_job_id: Mapped[int | None] = mapped_column(Integer)
    event_id: Mapped[int | None] = mapped_column(Integer)
    # Seconds per stage of the last successful run, for the e2e benchmark and operators.
    timings: Mapped[dict[str, float]] = mapped_column(JSONDocument, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class FindingRecord(Base):
    """One model output on one image, decided at the model's threshold."""

    __tablename__ = "findings"
    __table_args__ = (
        UniqueConstraint("job_id", "ordinal"),
        Index("ix_findings_study", "study_instance_uid"),
        Index("ix_findings_model", "model_name", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    ordinal: Mapped[int] = mapped_column(Integer)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    frame_number: Mapped[int | None] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(32))
    code_value: Mapped[str] = mapped_column(String(64))
    code_scheme: Mapped[str] = mapped_column(String(16))
    code_meaning: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    present: Mapped[bool] = mapped_column(Boolean)
    # "point" | "bbox" | "segment" | None, with its geometry (image pixels, row/col): a JSON
    # object (migration 0011), SQL NULL when there is none (none_as_null, not JSON 'null').
    location_kind: Mapped[str | None] = mapped_column(String(16))
    location: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql"))
    segment_number: Mapped[int | None] = mapped_column(Integer)
    # The heat-map Secondary Capture of the finding's image, when one was made.
    heatmap_path: Mapped[str | None] = mapped_column(String(260))
    tracking_uid: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    superseded_by_job_id: Mapped[int | None] = mapped_column(Integer)
    # Out-of-distribution score of the input (the highest of a series or study decision's
    # images; None when the model has no training statistics) and whether it is above the
    # model's threshold (dicom_ai.inference.ood).
    ood_score: Mapped[float | None] = mapped_column(Float)
    out_of_distribution: Mapped[bool] = mapped_column(Boolean, default=False,
                                                      server_default=false())


class ResultObject(Base):
    """A DICOM object a job produced (SR, SEG, heat-map SC), stored under ``results/``."""

    __tablename__ = "result_objects"
    __table_args__ = (Index("ix_results_job", "job_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(String(16))  # sr | seg | heatmap
    sr_kind: Mapped[str | None] = mapped_column(String(16))  # comprehensive | comprehensive3d
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(260))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class OutboxItem(Base):
    """One result object to deliver to one destination, retried with backoff until it is."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("result_id", "destination"),
        Index("ix_outbox_due", "state", "next_attempt_at"),
        # Storage Commitment: reports find their rows by transaction; the sender's timeout
        # sweep finds SENT rows whose commitment was requested long ago.
        Index("ix_outbox_commit_transaction", "commit_transaction_uid"),
        Index("ix_outbox_commit_due", "state", "commit_requested_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id"))
    job_id: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Storage Commitment (PS3.4 annex J) of the last send, for storage_commitment destinations.
    commit_transaction_uid: Mapped[str | None] = mapped_column(String(64))
    commit_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    committed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# -- batch query/retrieve ---------------------------------------------------------------------
class Batch(Base):
    """A query/retrieve batch over an archive: what was asked, and where it stands."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="run")  # run | export
    source: Mapped[str] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(String(64))
    # Accessions, study-date range, modality, extra keys; how studies were found.
    query: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="created")
    found_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)


class BatchStudy(Base):
    """One study a batch found, retrieved (or not) and processed (or not)."""

    __tablename__ = "batch_studies"
    __table_args__ = (
        UniqueConstraint("batch_id", "study_instance_uid"),
        Index("ix_batch_studies_uid", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    # found -> retrieved (or failed); processing progress is read from jobs and the outbox.
    state: Mapped[str] = mapped_column(String(16), default="found")
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    retrieved_instances: Mapped[int] = mapped_column(Integer, default=0)
    failed_suboperations: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    retrieved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)


# -- HTTP API ---------------------------------------------------------------------------------
# Roles of an API key: "read" sees data; "operator" may also re-run jobs, re-send results,
# retry deliveries and cancel batches.
ROLE_READ = "read"
ROLE_OPERATOR = "operator"


class ApiKey(Base):
    """An API key: only the SHA-256 of its token is kept (the token is shown once)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    # The token's first characters, to find its row and to tell keys apart in listings.
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# -- audit trail ------------------------------------------------------------------------------
# Who acted: a DICOM peer (its calling AE title), an API key ("apikey:<id>"), or the service.
ACTOR_DICOM = "dicom"
ACTOR_API = "api"
ACTOR_SYSTEM = "system"


class AuditEvent(Base):
    """One audited action: who (AE title or API key id) did what to which UIDs, and when.

    Append-only (:mod:`storage.audit` has no update or delete). It names UIDs, AE titles, key
    ids, hosts and counts, never patient names, IDs or birth dates.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_at", "at"),
        Index("ix_audit_study_id", "study_instance_uid", "id"),
        Index("ix_audit_action_id", "action", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor_kind: Mapped[str] = mapped_column(String(8))  # dicom | api | system
    actor: Mapped[str] = mapped_column(String(64))  # AE title, "apikey:<id>" or a component
    peer: Mapped[str | None] = mapped_column(String(64))  # the caller's or callee's host
    action: Mapped[str] = mapped_column(String(32))  # e.g. instances.stored, query.find
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    # The UIDs acted on (bounded; the detail says how many there were in all).
    uids: Mapped[list[str]] = mapped_column(JSONDocument, default=list)
    # Counts, levels, statuses, destinations; never patient data.
    detail: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)


# Indexes the API's filters use: each filter is an equality followed by the keyset column
# (``WHERE f = ? AND id > ? ORDER BY id LIMIT n`` is one index range scan), or a range index.
Index("ix_studies_study_date", Study.study_date)
Index("ix_studies_accession", Study.accession_number)
Index("ix_jobs_state_id", Job.state, Job.id)
Index("ix_jobs_model_id", Job.model_name, Job.id)
Index("ix_jobs_finished", Job.finished_at)
Index("ix_findings_model_id", FindingRecord.model_name, FindingRecord.id)
Index("ix_findings_present_id", FindingRecord.present, FindingRecord.id)
Index("ix_findings_created", FindingRecord.created_at)
Index("ix_outbox_state_destination", OutboxItem.state, OutboxItem.destination,
      OutboxItem.created_at)


class InstanceTotal(Base):
    """Running totals of the ``instances`` table, one row per writer (migration 0012).

    Triggers on ``instances`` add every insert, delete and size change to the row of the
    writing connection, in the writer's own transaction: on PostgreSQL the row keyed by the
    server process id of the connection (``pg_backend_pid()``, unique among open connections,
    so concurrent writers never wait on each other's row), on SQLite (one writer at a time)
    row 0. ``SUM`` over the rows is ``COUNT(*)`` and ``SUM(size_bytes)`` of ``instances``
    (see :func:`storage.metrics.instance_totals`).
    """

    __tablename__ = "instance_totals"

    shard: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    instances: Mapped[int] = mapped_column(BigInteger, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
