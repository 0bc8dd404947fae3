"""The output schemas: what the HTTP API answers and what every CLI ``--json`` prints.

One model per entity (study, series, job, finding, result and its deliveries, routing decision,
batch, outbox row, audit entry, API key), built from the rows of the single reader of
:mod:`storage` that answers the question, and used both as the FastAPI ``response_model`` of
:mod:`dicom_ai.api.app` and by the ``dicom-ai`` commands, so the two print the same JSON for the
same object (``tests/integration/test_cli_api_json.py`` holds them equal).

Naming convention: fields are snake_case DICOM keywords (``StudyInstanceUID`` ->
``study_instance_uid``, ``AccessionNumber`` -> ``accession_number``); our own attributes are
plain snake_case (``state``, ``created_at``); a model is named ``model`` and its version
``model_version``; times are ISO 8601 strings (``datetime.isoformat``, UTC). A list is a page
``{"items": [...], "next_after": id | null}`` in the API and the JSON list of its items in the
CLI (``--limit``/``--after`` page it the same way). Patient names, IDs and birth dates appear
only in :attr:`StudyView.patient`, and only when ``api.show_patient_names`` is set.

This module imports no web framework: the CLI uses it without loading FastAPI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    model_serializer,
)

if TYPE_CHECKING:
    from dicom_ai.inference.registry import ModelEntry
    from storage.apikeys import ApiKeyInfo
    from storage.audit import AuditRecord
    from storage.models import (
        Batch,
        FindingRecord,
        Job,
        OutboxItem,
        ResultObject,
        RoutingDecision,
    )
    from storage.studies import SeriesRow, StudyRow

#: A time, printed as ``datetime.isoformat()`` (what the API has always answered).
Timestamp = Annotated[datetime, PlainSerializer(lambda value: value.isoformat(), return_type=str,
                                                when_used="always")]
T = TypeVar("T")


class _View(BaseModel):
    # from_attributes: a view whose fields are a row's own (same names) is built from the row
    # itself (``model_validate(row)``) instead of copying every field by hand.
    model_config = ConfigDict(frozen=True, from_attributes=True)


class Page(_View, Generic[T]):
    """One page of a list: pass ``next_after`` as ``?after=`` (CLI: ``--after``) for the next."""

    items: list[T]
    next_after: int | None = Field(description="The last id of this page when it is full, "
                                   "else null (no more rows).")


def page(items: Sequence[Any], limit: int) -> dict[str, Any]:
    """A page of views: ``next_after`` is the last id when the page is full."""
    return {"items": list(items),
            "next_after": items[-1].id if items and len(items) == limit else None}


# -- studies and series -------------------------------------------------------------------------
class StudyView(_View):
    """A received study with its counts."""

    id: int
    study_instance_uid: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    study_description: str
    state: str = Field(description="`receiving` or `complete`.")
    series: int
    instances: int
    modalities: list[str]
    first_received_at: Timestamp
    last_received_at: Timestamp
    completed_at: Timestamp | None
    completion_reason: str | None
    completion_count: int
    patient: dict[str, str] | None = Field(
        default=None, description="Only with api.show_patient_names (absent otherwise).")

    @model_serializer(mode="wrap")
    def _without_absent_patient(self, handler: SerializerFunctionWrapHandler) -> Any:
        # The key is absent (not null) unless the operator allowed patient data.
        data = handler(self)
        if isinstance(data, dict) and data.get("patient") is None:
            data.pop("patient", None)
        return data


def study_view(row: StudyRow) -> StudyView:
    """The view of a :class:`storage.studies.StudyRow` (its fields, read by name)."""
    return StudyView.model_validate(row)


class SeriesView(_View):
    """A series with its instance count."""

    id: int
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    series_number: int | None
    state: str
    instances: int
    last_received_at: Timestamp
    completed_at: Timestamp | None


def series_view(row: SeriesRow) -> SeriesView:
    """The view of a :class:`storage.studies.SeriesRow` (its fields, read by name)."""
    return SeriesView.model_validate(row)


class RoutingDecisionView(_View):
    """How routing decided for one series: a route (and its job) or unrouted, and why."""

    series_instance_uid: str | None
    route: str | None
    job_id: int | None
    reason: str
    created_at: Timestamp


def routing_view(row: RoutingDecision) -> RoutingDecisionView:
    """The view of a routing decision row."""
    return RoutingDecisionView(series_instance_uid=row.series_instance_uid, route=row.route,
                               job_id=row.job_id, reason=row.reason, created_at=row.created_at)


# -- jobs, findings, results, deliveries ------------------------------------------------------
class JobView(_View):
    """A job: state, attempts, last error (or note), stage timings."""

    id: int
    study_instance_uid: str
    series_instance_uids: list[str]
    route: str
    model: str
    model_version: str | None
    state: str
    attempts: int
    max_attempts: int
    error: str | None
    supersedes_job_id: int | None
    timings: dict[str, Any]
    created_at: Timestamp | None
    started_at: Timestamp | None
    finished_at: Timestamp | None


def job_view(job: Job) -> JobView:
    """The view of a job row."""
    return JobView(
        id=job.id, study_instance_uid=job.study_instance_uid,
        series_instance_uids=list(job.series_instance_uids), route=job.route,
        model=job.model_name, model_version=job.model_version, state=job.state,
        attempts=job.attempts, max_attempts=job.max_attempts, error=job.error,
        supersedes_job_id=job.supersedes_job_id, timings=dict(job.timings),
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at)


class StudyDetailView(StudyView):
    """One study with its series, jobs and routing decisions."""

    series_list: list[SeriesView]
    jobs: list[JobView]
    routing: list[RoutingDecisionView]


class CodedConceptView(_View):
    """A coded concept (code value, coding scheme designator, code meaning)."""

    code_value: str
    code_scheme: str
    code_meaning: str


class FindingView(_View):
    """One finding of a model for an image, a series or a study."""

    id: int
    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    frame_number: int | None
    model: str
    model_version: str
    label: str
    finding: CodedConceptView
    probability: float
    threshold: float
    decision: Literal["present", "absent"]
    location_kind: str | None
    location: Any
    segment_number: int | None
    heatmap_path: str | None
    created_at: Timestamp | None
    superseded_by_job_id: int | None
    ood_score: float | None = Field(description="The input's distance to the model's "
                                    "training data.")
    out_of_distribution: bool | None = Field(description="Whether the input is outside the "
                                             "training data.")


def finding_view(f: FindingRecord) -> FindingView:
    """The view of a finding row."""
    return FindingView(
        id=f.id, job_id=f.job_id, study_instance_uid=f.study_instance_uid,
        series_instance_uid=f.series_instance_uid, sop_instance_uid=f.sop_instance_uid,
        frame_number=f.frame_number, model=f.model_name, model_version=f.model_version,
        label=f.label, finding=CodedConceptView(code_value=f.code_value,
                                                code_scheme=f.code_scheme,
                                                code_meaning=f.code_meaning),
        probability=f.probability, threshold=f.threshold,
        decision="present" if f.present else "absent", location_kind=f.location_kind,
        location=f.location,
        segment_number=f.segment_number, heatmap_path=f.heatmap_path, created_at=f.created_at,
        superseded_by_job_id=f.superseded_by_job_id, ood_score=f.ood_score,
        out_of_distribution=f.out_of_distribution)


Delivery = Literal["pending", "failed", "sent", "awaiting", "committed"]


def delivery_state(item: OutboxItem) -> Delivery:
    """Per object: ``committed``; ``sent`` (delivered, no commitment asked); ``awaiting``
    (sent, commitment report outstanding); ``failed`` (pending after a failed attempt, or a
    commitment failure); ``pending``."""
    from storage.models import COMMITTED, SENT

    if item.state == COMMITTED:
        return "committed"
    if item.state == SENT:
        return "awaiting" if item.commit_requested_at is not None else "sent"
    return "failed" if item.last_error is not None and item.attempts > 0 else "pending"


class DeliveryView(_View):
    """One outbox row: a result object to one destination."""

    id: int
    result_id: int
    job_id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: Timestamp | None
    last_error: str | None
    created_at: Timestamp | None
    sent_at: Timestamp | None
    delivery: Delivery = Field(description="pending, failed, sent, awaiting (the Storage "
                               "Commitment report) or committed.")
    committed_at: Timestamp | None
    commit_requested_at: Timestamp | None


class OutboxRowView(DeliveryView):
    """An outbox row with the kind and SOP Instance UID of its result object."""

    kind: str
    sop_instance_uid: str


def _delivery_fields(item: OutboxItem) -> dict[str, Any]:
    return {"id": item.id, "result_id": item.result_id, "job_id": item.job_id,
            "destination": item.destination, "state": item.state, "attempts": item.attempts,
            "next_attempt_at": item.next_attempt_at, "last_error": item.last_error,
            "created_at": item.created_at, "sent_at": item.sent_at,
            "delivery": delivery_state(item), "committed_at": item.committed_at,
            "commit_requested_at": item.commit_requested_at}


def delivery_view(item: OutboxItem) -> DeliveryView:
    """The view of an outbox row."""
    return DeliveryView(**_delivery_fields(item))


def outbox_view(item: OutboxItem, result: ResultObject) -> OutboxRowView:
    """The view of an outbox row with its result object."""
    return OutboxRowView(**_delivery_fields(item), kind=result.kind,
                         sop_instance_uid=result.sop_instance_uid)


class ResultView(_View):
    """A result object (SR, SEG, heat-map) with its deliveries."""

    id: int
    kind: str
    sr_kind: str | None
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    created_at: Timestamp | None
    deliveries: list[DeliveryView]


def result_view(result: ResultObject, deliveries: Sequence[OutboxItem]) -> ResultView:
    """The view of a result object and its outbox rows."""
    return ResultView(id=result.id, kind=result.kind, sr_kind=result.sr_kind,
                      series_instance_uid=result.series_instance_uid,
                      sop_instance_uid=result.sop_instance_uid,
                      sop_class_uid=result.sop_class_uid, created_at=result.created_at,
                      deliveries=[delivery_view(item) for item in deliveries])


class JobDetailView(JobView):
    """One job with its result objects and their deliveries."""

    results: list[ResultView]


class StudyFindingsView(_View):
    """A study's findings, how routing decided and its jobs (``dicom-ai findings --json``)."""

    findings: list[FindingView]
    routing: list[RoutingDecisionView]
    jobs: list[JobView]


# -- models --------------------------------------------------------------------------------------
class ModelView(_View):
    """A model version of the registry (the bundled ones included)."""

    name: str
    version: str
    task: str
    active: bool
    bundled: bool
    backend: str
    modalities: list[str]
    body_parts: list[str]
    description: str
    path: str


def model_view(entry: ModelEntry) -> ModelView:
    """The view of a registry entry (:meth:`dicom_ai.inference.registry.ModelEntry.summary`)."""
    return ModelView.model_validate(entry.summary())


class ModelListView(_View):
    """Every model version of the registry (not paged: a registry holds a few)."""

    items: list[ModelView]


class ModelVersionView(_View):
    """One version of a model."""

    version: str
    active: bool
    bundled: bool


class ModelDetailView(ModelView):
    """A model version with its network's digest, its sibling versions and its whole spec
    (``dicom-ai models show``)."""

    network_sha256: str
    versions: list[ModelVersionView]
    spec: dict[str, Any]


# -- batches, audit, API keys ---------------------------------------------------------------------
class BatchView(_View):
    """A query/retrieve batch."""

    id: int
    kind: str
    source: str
    route: str | None
    query: dict[str, Any]
    state: str
    error: str | None
    created_at: Timestamp | None
    updated_at: Timestamp | None
    found_at: Timestamp | None


def batch_view(batch: Batch) -> BatchView:
    """The view of a batch row."""
    return BatchView(id=batch.id, kind=batch.kind, source=batch.source, route=batch.route,
                     query=dict(batch.query), state=batch.state,
                     error=batch.error, created_at=batch.created_at,
                     updated_at=batch.updated_at, found_at=batch.found_at)


class BatchDetailView(BatchView):
    """One batch with its studies counted by retrieve state."""

    studies: dict[str, int]


class BatchTotalsView(_View):
    """The totals of a batch's per-study report (``dicom-ai batch report``)."""

    studies: int
    retrieved: int
    processed: int = Field(description="Retrieved, and unrouted or its job done with every "
                           "SR delivered.")
    failed: int = Field(description="Retrieval failed, or the study's job failed for good.")
    sr_delivered: int


class BatchStatusView(BatchDetailView):
    """The API's batch detail with the totals of the batch's report (``dicom-ai batch
    status``)."""

    totals: BatchTotalsView


class AuditEntryView(_View):
    """One audit event: who (AE title, API key) did what to which UIDs, and when."""

    id: int
    at: Timestamp
    actor_kind: str
    actor: str
    peer: str | None
    action: str
    study_instance_uid: str | None
    uids: list[str]
    detail: dict[str, Any]


def audit_view(row: AuditRecord) -> AuditEntryView:
    """The view of an audit row."""
    return AuditEntryView(id=row.id, at=row.at, actor_kind=row.actor_kind, actor=row.actor,
                          peer=row.peer, action=row.action,
                          study_instance_uid=row.study_instance_uid, uids=list(row.uids),
                          detail=dict(row.detail))


class ApiKeyView(_View):
    """An API key as listings show it: never its hash or token."""

    id: int
    name: str
    role: str
    prefix: str
    created_at: Timestamp
    revoked_at: Timestamp | None
    last_used_at: Timestamp | None


def apikey_view(info: ApiKeyInfo) -> ApiKeyView:
    """The view of an API key (no secret)."""
    return ApiKeyView(id=info.id, name=info.name, role=info.role, prefix=info.prefix,
                      created_at=info.created_at, revoked_at=info.revoked_at,
                      last_used_at=info.last_used_at)


def dump(value: Any) -> Any:
    """JSON-ready data of a view, or of lists and dicts of views (what ``--json`` prints)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {k: dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [dump(v) for v in value]
    return value
