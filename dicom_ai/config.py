"""One typed configuration object for the whole service.

Values come, highest priority first, from ``DICOM_AI_*`` environment variables (nested keys
joined by ``__``, e.g. ``DICOM_AI_DICOM__PORT=11113``), the TOML file given by ``--config``, and
the defaults below. Sections owned by later features may appear in the file; unknown top-level
sections are ignored, but an unknown key inside a known section is an error, so typos surface at
start instead of silently falling back to a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dicom_ai.exceptions import ConfigError
from storage.filestore import FileStore, check_node, default_node

Port = Annotated[int, Field(ge=0, le=65535)]
#: The SR SOP class a destination receives: Comprehensive SR or Comprehensive 3D SR.
SRKind = Literal["comprehensive", "comprehensive3d"]


def validate_ae_title(value: str) -> str:
    """Check an AE title against PS3.5 section 6.2 (AE value representation).

    Parameters
    ----------
    value : str
        The AE title.

    Returns
    -------
    str
        The title without leading/trailing spaces.

    Raises
    ------
    ValueError
        If it is empty, longer than 16 characters, or holds a backslash or control character.
    """
    title = value.strip()
    if not title or len(title) > 16:
        raise ValueError(f"AE title {value!r} must have 1 to 16 characters")
    if any(c == "\\" or ord(c) < 0x20 or ord(c) > 0x7E for c in title):
        raise ValueError(f"AE title {value!r} may not hold backslashes or control characters")
    return title


AETitle = Annotated[str, AfterValidator(validate_ae_title)]


def _check_networks(value: list[str]) -> list[str]:
    for entry in value:
        ipaddress.ip_network(entry, strict=False)  # raises ValueError naming the entry
    return value


#: IP addresses or CIDR networks (host names are refused: they would be resolved per check).
Networks = Annotated[list[str], AfterValidator(_check_networks)]


def _check_uid(value: str) -> str:
    # PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters.
    if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", value) or len(value) > 64:
        raise ValueError(f"not a valid UID: {value!r}")
    return value


#: A UID (PS3.5 9.1), e.g. a private SOP class.
UIDValue = Annotated[str, AfterValidator(_check_uid)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomSettings(_Section):
    """``[dicom]``: the receiver (Storage SCP, Verification SCP, MPPS SCP)."""

    ae_title: AETitle = "DICOM_AI"
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM receiver listens for modalities on the LAN
    port: Port = 11112
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    allowed_hosts: Networks = Field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    max_associations: Annotated[int, Field(ge=1)] = 64
    receivers: Annotated[int, Field(ge=1, le=64)] = 4
    # Our Maximum Length (PS3.8 D.1): a P-DATA-TF PDU longer than this is aborted; 0 = unlimited
    # (then still read only as its bytes arrive). dcmtk sends at most 128 KB, pynetdicom this.
    maximum_pdu_size: Annotated[int, Field(ge=0)] = 4 * 1024 * 1024
    network_timeout: Annotated[float, Field(gt=0)] = 60.0
    dimse_timeout: Annotated[float, Field(gt=0)] = 60.0
    # An association whose called AE title is not ours is rejected (PS3.8 7.1.1.3).
    check_called_aet: bool = True
    # ARTIM (PS3.8 9.1.5): a connection that has not completed its association request (or
    # release) within this time is closed; a silent connection cannot hold a slot for long.
    association_request_timeout: Annotated[float, Field(gt=0)] = 10.0
    # Open TCP connections one host may hold at once (associated or not), per serve process.
    max_connections_per_host: Annotated[int, Field(ge=1)] = 32
    # Storage SOP classes accepted beyond every standard one (retired included): private or
    # unknown classes, e.g. a vendor's raw data. Others are refused at negotiation (counted).
    extra_storage_classes: list[UIDValue] = Field(default_factory=list)
    # Install dicom-ai's pynetdicom tuning (dicom_ai.network.tuning: event-driven association
    # threads, cached UID checks, bounded PDU reads) in the processes that talk DICOM. Only on
    # the pynetdicom version it was tested with; false runs stock pynetdicom.
    tune_network: bool = True

    @model_validator(mode="after")
    def _tls_pair(self) -> DicomSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key")
        return self


class QueryRetrieveSettings(_Section):
    """``[query_retrieve]``: who may query (C-FIND) and retrieve (C-MOVE, C-GET) what we store.

    Closed by default: with ``allowed_calling_aets`` empty, every Q/R request is refused
    (storage, verification and MPPS are not affected). ``allowed_hosts`` (IP addresses or CIDR
    networks) further restricts where those callers may connect from; empty: any host the
    receiver itself accepts.
    """

    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    allowed_hosts: Networks = Field(default_factory=list)


class LimitsSettings(_Section):
    """``[limits]``: what one received object may cost in memory and disk, checked up front.

    The defaults fit a 2-core, 24 GB machine: far above any clinical image, far below what
    would exhaust it.
    """

    # Deflated Explicit VR Little Endian: the inflated dataset may not exceed this (it is
    # inflated as a stream, never held whole); above it the object is refused and quarantined.
    max_inflated_bytes: Annotated[int, Field(ge=1)] = 256 * 1024 * 1024
    # Declared Rows x Columns of one frame: above it, nothing is decoded.
    max_frame_pixels: Annotated[int, Field(ge=1)] = 100_000_000
    # Declared Rows x Columns x frames x samples x bits allocated / 8 of one instance.
    max_pixel_bytes: Annotated[int, Field(ge=1)] = 2 * 1024 * 1024 * 1024


class StorageSettings(_Section):
    """``[storage]``: the file store and the index database."""

    root: Path = Path("data")
    database_url: str | None = None
    min_free_bytes: Annotated[int, Field(ge=0)] = 1_000_000_000
    # Results (SR, SEG, heat-map SC) have a watermark of their own, below the ingest one: when
    # ingest refuses new images (min_free_bytes) the studies already acknowledged still get
    # their results. Below it a job waits (no attempt used) and /ready is false.
    results_min_free_bytes: Annotated[int, Field(ge=0)] = 200_000_000
    duplicates: Literal["keep-first", "replace"] = "keep-first"
    # Our own results (SR, SEG, heat-map SC) coming back, e.g. a PACS auto-forwarding a study:
    # never routed and never re-opening a study either way; "store" indexes them (visible in
    # Q/R), "drop" answers success and keeps nothing.
    own_results: Literal["store", "drop"] = "store"
    # This host's id among hosts sharing the root (its incoming/ folder and clean-shutdown
    # marker); None: the host name. In Kubernetes, the pod name.
    node: str | None = None

    @field_validator("node")
    @classmethod
    def _node(cls, value: str | None) -> str | None:
        return None if value is None else check_node(value)

    def file_store(self, *, role: str | None = None) -> FileStore:
        """The file store at ``root`` for this node (creates its folders).

        Parameters
        ----------
        role : str, optional
            A process other than ``serve`` that receives into the store on this host (``batch``
            for C-GET retrievals) gets ``incoming/<node>.<role>/``, which a ``serve`` start
            does not clear (only stale files there are swept).
        """
        node = self.node or default_node()
        return FileStore(self.root, node=f"{node}.{role}" if role else node)

    @property
    def url(self) -> str:
        """The database URL; SQLite inside the store root when none is configured."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.root / 'index.sqlite3').resolve()}"


class CompletionSettings(_Section):
    """``[completion]``: when a series or study counts as completely received."""

    series_quiet_seconds: Annotated[float, Field(gt=0)] = 30.0
    study_quiet_seconds: Annotated[float, Field(gt=0)] = 60.0
    poll_seconds: Annotated[float, Field(gt=0)] = 1.0


class ApiSettings(_Section):
    """``[api]``: the HTTP API and dashboard."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8080
    # Patient names, IDs and birth dates appear in API answers only when this is true.
    show_patient_names: bool = False


class LoggingSettings(_Section):
    """``[logging]``: log level, format, and an optional file besides stderr."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False
    # Appended to by every process of the service (serve, its receivers and workers); reopened
    # when logrotate moves it. Empty: stderr only (journald, docker logs).
    file: Path | None = None


class Destination(_Section):
    """``[[destinations]]``: a DICOM node results are sent to."""

    name: str
    ae_title: AETitle
    host: str
    port: Port
    tls: bool = False
    # Comprehensive SR is accepted most widely; Comprehensive 3D SR is IHE AIR's object.
    sr_kind: SRKind = "comprehensive"
    # Ask the destination to commit what it received (Storage Commitment Push Model, PS3.4
    # annex J): a result counts as delivered only once the destination's N-EVENT-REPORT says
    # it is committed; objects it reports failed, or never reports, are sent again.
    storage_commitment: bool = False


class Source(_Section):
    """``[[sources]]``: an archive batch jobs query and retrieve from, politely."""

    name: str
    ae_title: AETitle
    host: str
    port: Port
    retrieve: Literal["move", "get"] = "move"
    tls: bool = False
    # Politeness: parallel retrievals, a rate limit, and the hours a batch may run.
    max_associations: Annotated[int, Field(ge=1, le=32)] = 1
    max_studies_per_minute: Annotated[float, Field(gt=0)] | None = None
    run_window: str | None = None  # "19:00-07:00": local time, may span midnight
    # The archive returns at most this many C-FIND matches (0 = no known limit); a result of
    # this size is taken as truncated and the date range is split.
    max_query_results: Annotated[int, Field(ge=0)] = 0

    @field_validator("run_window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None:
            parse_window(value)
        return value


def parse_window(text: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` as (start, end) minutes after midnight; raises ValueError."""
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
    if match is None:
        raise ValueError(f"run window {text!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"run window {text!r} has an invalid time")
    return h1 * 60 + m1, h2 * 60 + m2


class Route(_Section):
    """``[[routes]]``: a rule sending matching series to a model and its results to destinations.

    ``match`` maps DICOM keywords (and ``CallingAETitle``) to a value, a list of values (any
    matches), a wildcard pattern (``*``, ``?``) or a regular expression written ``/.../``.
    """

    name: str
    match: dict[str, str | list[str]] = Field(default_factory=dict)
    model: str
    destinations: list[str] = Field(default_factory=list)
    # The SR is always sent; a SEG (segmentation models) and a heat-map Secondary Capture
    # (classifiers, Grad-CAM) on request.
    send_seg: bool = False
    send_heatmap: bool = False
    # Which images get a heat-map SC: those with a positive (present) finding, or all. A map of
    # an absent finding shows where the model looked, not a lesion: only on request.
    heatmap_for: Literal["positive", "all"] = "positive"
    # A run with an input outside the model's training distribution (dicom_ai.inference.ood):
    # "send" its results with the flag stated in the SR, "hold" them (stored and visible, not
    # sent) or "drop" them (no result objects; the flagged findings are kept).
    ood_policy: Literal["send", "hold", "drop"] = "send"

    @field_validator("match")
    @classmethod
    def _patterns(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        from dicom_ai.routing import check_match  # the matcher owns its syntax

        check_match(value)
        return value


class WorkerSettings(_Section):
    """``[workers]``: where jobs run and how failures are retried."""

    # "local": a supervised pool of worker processes inside `serve`; "celery": `dicom-ai
    # worker` processes fed through a broker (serve only routes and publishes job ids).
    backend: Literal["local", "celery"] = "local"
    processes: Annotated[int, Field(ge=0, le=64)] = 1
    broker_url: str = "redis://127.0.0.1:6379/0"
    queue: str = "dicom-ai"
    lease_seconds: Annotated[float, Field(gt=0)] = 60.0
    max_attempts: Annotated[int, Field(ge=1)] = 3
    retry_backoff_seconds: Annotated[float, Field(ge=0)] = 10.0
    # A pending job not picked up within this time is handed out again (a lost message).
    redispatch_seconds: Annotated[float, Field(gt=0)] = 60.0
    poll_seconds: Annotated[float, Field(gt=0)] = 1.0
    # How long a new Celery worker child may take to load the routed models before Celery
    # gives up on it and SIGKILLs it (Celery's worker_proc_alive_timeout, 4 s by default).
    model_load_timeout_seconds: Annotated[float, Field(gt=0)] = 120.0
    # A job that meets a full disk or an unavailable index waits (state "waiting", no attempt
    # used) and is tried again this often until the resource is back.
    resource_wait_seconds: Annotated[float, Field(gt=0)] = 10.0


class DeliverySettings(_Section):
    """``[delivery]``: sending results to destinations (durable outbox, retried forever)."""

    retry_initial_seconds: Annotated[float, Field(gt=0)] = 5.0
    retry_max_seconds: Annotated[float, Field(gt=0)] = 60.0
    # A cheap indexed query; with Celery workers nothing wakes the sender, so keep it short.
    poll_seconds: Annotated[float, Field(gt=0)] = 0.25
    # How long a sender may hold the rows it claimed before another serve process may send
    # them (this node's own claims are released at once when its serve restarts).
    claim_seconds: Annotated[float, Field(gt=0)] = 120.0
    # Storage Commitment: objects sent to a destination with storage_commitment = true and not
    # reported committed (or failed) within this time are sent again, same SOP Instance UIDs.
    commitment_timeout_seconds: Annotated[float, Field(gt=0)] = 600.0


class RetentionSettings(_Section):
    """``[retention]``: what may be deleted, and when; nothing unprocessed or undelivered ever is.

    Every policy is off by default (``None``); ``serve`` applies those set every
    ``interval_seconds`` and ``dicom-ai purge`` on demand.
    """

    # Delete a study's received instances this many days after all its results were delivered.
    instances_days: Annotated[float, Field(ge=0)] | None = None
    # Delete a job's result files, findings, result and outbox rows this many days after it
    # finished, once every outbox row of it is sent.
    results_days: Annotated[float, Field(ge=0)] | None = None
    # Keep the instance store under this many bytes: delete delivered studies' instances,
    # oldest delivered first (undelivered ones never; a cap that cannot be met is logged).
    max_store_bytes: Annotated[int, Field(ge=0)] | None = None
    interval_seconds: Annotated[float, Field(gt=0)] = 3600.0

    @property
    def enabled(self) -> bool:
        """Whether any policy is set."""
        return (self.instances_days is not None or self.results_days is not None
                or self.max_store_bytes is not None)


class Settings(BaseSettings):
    """Every setting of the service, validated once at start."""

    model_config = SettingsConfigDict(
        env_prefix="DICOM_AI_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    query_retrieve: QueryRetrieveSettings = Field(default_factory=QueryRetrieveSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    destinations: list[Destination] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order the sources: keyword arguments, environment, TOML file, defaults."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for kind in ("destinations", "sources", "routes"):
            names = [item.name for item in getattr(self, kind)]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind}: duplicate name(s) {dupes}")
        known = {d.name for d in self.destinations}
        for route in self.routes:
            missing = [d for d in route.destinations if d not in known]
            if missing:
                raise ValueError(f"routes.{route.name}: unknown destination(s) {missing}")
        return self


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read and validate the settings.

    Parameters
    ----------
    path : Path or str, optional
        A TOML file; without one only defaults and environment variables apply.
        ``DICOM_AI_CONFIG`` names the file when `path` is not given.
    **overrides
        Section values that win over everything else (used by tests and the CLI).

    Returns
    -------
    Settings
        The validated settings.

    Raises
    ------
    ConfigError
        If the file is missing or unreadable, or a value is invalid; the message names the key.
    """
    chosen = path if path is not None else os.environ.get("DICOM_AI_CONFIG")
    toml_file = Path(chosen) if chosen else None
    if toml_file is not None and not toml_file.is_file():
        raise ConfigError(f"config file {toml_file} does not exist")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=toml_file)

    try:
        loaded = _FileSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration{f' in {toml_file}' if toml_file else ''}: "
                          f"{problems}") from None
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"cannot read {toml_file}: {exc}") from None
    return loaded
