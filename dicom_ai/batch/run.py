"""Batch jobs over an archive: find studies, retrieve them politely, follow their processing.

::

    C-FIND (study level; per accession number, or a date range split when the archive truncates)
      -> batch_studies rows (resumable: a study is found once per batch)
      -> C-MOVE to our own receiver, or C-GET on the same association (skipped when the store
         already holds the study, or when our results of the route's active model version
         exist: a second run over the same archive makes no job and sends nothing), at most
         ``max_associations`` at once, at most ``max_studies_per_minute``, only inside
         ``run_window``
      -> the normal flow of the running service (completion, routing, inference, SR back);
         our own results coming back with a study are recognised at ingest and never routed;
         a study held already whose results are of an older model version is routed again
      -> progress read from jobs and the outbox; a report per study

A batch needs a running ``dicom-ai serve`` with the same store and database: it receives the
C-MOVE sub-operations, completes the studies and runs the models. Retrieval state is in the
database, so an interrupted batch (Ctrl-C, a crash) resumes without fetching again what it has.
"""

from __future__ import annotations

import csv
import html
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_ai.config import Settings, Source, parse_window
from dicom_ai.exceptions import ConfigError, NetworkError, safe_message
from dicom_ai.inference.registry import Registry
from dicom_ai.ingest.spool import Ingestor
from dicom_ai.network.qr_scu import RetrieveResult, find, get_study, move_study
from dicom_ai.network.scu import Peer
from storage import batches
from storage.db import Database

LOGGER = logging.getLogger(__name__)

__all__ = ["BatchQuery", "BatchRunner", "Counts", "in_window", "read_accessions",
           "write_report"]


@dataclass(frozen=True)
class BatchQuery:
    """What a batch looks for: accession numbers, or a study-date range with filters."""

    accessions: tuple[str, ...] = ()
    study_date: str | None = None  # "YYYYMMDD-YYYYMMDD", "YYYYMMDD", "YYYYMMDD-", "-YYYYMMDD"
    modality: str | None = None
    keys: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """For the batch row."""
        return {"accessions": list(self.accessions), "study_date": self.study_date,
                "modality": self.modality, "keys": dict(self.keys)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchQuery:
        """From the batch row."""
        return cls(tuple(data.get("accessions") or ()), data.get("study_date"),
                   data.get("modality"), tuple((data.get("keys") or {}).items()))


def read_accessions(path: Path) -> tuple[str, ...]:
    """Accession numbers from a CSV with an ``AccessionNumber`` header (blank lines skipped).

    Raises
    ------
    ConfigError
        No such column.
    """
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "AccessionNumber" not in reader.fieldnames:
            raise ConfigError(f"{path}: needs a header with an AccessionNumber column")
        values = [(row.get("AccessionNumber") or "").strip() for row in reader]
    return tuple(dict.fromkeys(v for v in values if v))


def in_window(window: str | None, now: datetime) -> bool:
    """Whether local time `now` is inside ``HH:MM-HH:MM`` (which may span midnight)."""
    if window is None:
        return True
    start, end = parse_window(window)
    minute = now.hour * 60 + now.minute
    if start == end:
        return True
    return start <= minute < end if start < end else minute >= start or minute < end


def _date_bounds(text: str) -> tuple[date, date] | None:
    """A closed date range as dates (None for an open range: it cannot be split)."""
    if "-" not in text:
        day = datetime.strptime(text, "%Y%m%d").date()
        return day, day
    first, _, last = text.partition("-")
    if not first or not last:
        return None
    return (datetime.strptime(first, "%Y%m%d").date(),
            datetime.strptime(last, "%Y%m%d").date())


def _identifier(query: BatchQuery, *, accession: str | None = None,
                study_date: str | None = None, sop_classes: bool = False) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.AccessionNumber = accession or ""
    ds.StudyDate = study_date or ""
    ds.NumberOfStudyRelatedInstances = ""
    ds.ModalitiesInStudy = query.modality or ""
    if sop_classes:  # a C-GET proposes only these (an optional key: may come back absent)
        ds.SOPClassesInStudy = ""
    for key, value in query.keys:
        setattr(ds, key, value)
    return ds


def _sop_classes(match: Dataset) -> tuple[str, ...]:
    """The SOP Classes in Study (0008,0062) of a C-FIND match; empty when absent."""
    value = match.get("SOPClassesInStudy", None)
    if value in (None, ""):
        return ()
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in values if str(v).strip())


def _found(match: Dataset) -> batches.FoundStudy | None:
    uid = str(match.get("StudyInstanceUID", "") or "")
    if not uid:
        return None
    raw = match.get("NumberOfStudyRelatedInstances", None)
    try:
        expected = int(raw) if raw not in (None, "") else None
    except (TypeError, ValueError):
        expected = None
    return batches.FoundStudy(uid, str(match.get("AccessionNumber", "") or ""),
                              str(match.get("StudyDate", "") or ""), expected)


@dataclass
class Counts:
    """Progress of a batch: studies found, retrieved, processed and failed."""

    found: int = 0
    retrieved: int = 0
    processed: int = 0
    failed: int = 0
    status: str = ""

    @property
    def finished(self) -> bool:
        """Every found study is processed or failed."""
        return self.found > 0 and self.processed + self.failed >= self.found


@dataclass
class BatchRunner:
    """Runs (and resumes) batches against one configured source.

    Parameters
    ----------
    settings : Settings
        The service settings (the same file ``serve`` runs with).
    db : Database
        The shared database.
    source_name : str
        A ``[[sources]]`` name.
    """

    settings: Settings
    db: Database
    source_name: str
    source: Source = field(init=False)
    _pace_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _next_start: float = field(default=0.0, init=False)
    _versions: dict[str | None, dict[str, str]] = field(default_factory=dict, init=False)
    # C-GET: the SOP classes each found study holds (from the C-FIND; not persisted: a resumed
    # batch asks again per study), and one ingestor for every retrieval in flight.
    _classes: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False)
    _ingestor: Ingestor | None = field(default=None, init=False)
    _ingestor_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        for source in self.settings.sources:
            if source.name == self.source_name:
                self.source = source
                return
        known = [s.name for s in self.settings.sources]
        raise ConfigError(f"unknown source {self.source_name!r}; configured: {known or 'none'}")

    @property
    def peer(self) -> Peer:
        """The archive as a peer."""
        return Peer(self.source.ae_title, self.source.host, self.source.port, self.source.tls)

    def active_versions(self, route: str | None) -> dict[str, str]:
        """Route name -> the active version of its model, for `route` (None: every route).

        Read once per runner (a model activated meanwhile counts from the next batch run).
        Routes whose model is not in the registry are left out.
        """
        if route not in self._versions:
            registry = Registry(self.settings.storage.root / "models")
            versions: dict[str, str] = {}
            for item in self.settings.routes:
                if route is not None and item.name != route:
                    continue
                try:
                    versions[item.name] = registry.get(item.model).version
                except ConfigError as exc:  # RegistryError: the job will fail and say why
                    LOGGER.warning("route %s: %s", item.name, safe_message(exc))
            self._versions[route] = versions
        return self._versions[route]

    # -- finding ----------------------------------------------------------------------------
    def find(self, query: BatchQuery) -> list[batches.FoundStudy]:
        """C-FIND the studies a query names (per accession, or by date range, split as needed).

        Raises
        ------
        NetworkError
            The archive refused or failed a query.
        """
        found: dict[str, batches.FoundStudy] = {}
        if query.accessions:
            for accession in query.accessions:
                answer = find(self.peer, self.settings.dicom,
                              _identifier(query, accession=accession,
                                          sop_classes=self._gets))
                self._remember_classes(answer.matches)
                if answer.truncated:
                    LOGGER.warning("C-FIND for accession %s on %s was cut short by the "
                                   "archive", accession, self.source.name)
                for match in answer.matches:
                    study = _found(match)
                    if study is not None:
                        found.setdefault(study.study_instance_uid, study)
            return list(found.values())
        for study in self._find_range(query, query.study_date):
            found.setdefault(study.study_instance_uid, study)
        return list(found.values())

    def _find_range(self, query: BatchQuery, study_date: str | None
                    ) -> list[batches.FoundStudy]:
        answer = find(self.peer, self.settings.dicom,
                      _identifier(query, study_date=study_date, sop_classes=self._gets))
        matches = answer.matches
        self._remember_classes(matches)
        studies = [s for s in (_found(m) for m in matches) if s is not None]
        limit = self.source.max_query_results
        if not answer.truncated and (not limit or len(matches) < limit):
            return studies
        bounds = _date_bounds(study_date) if study_date else None
        if bounds is None or bounds[0] >= bounds[1]:
            LOGGER.warning("C-FIND for %s returned %d matches, the archive's limit, and the "
                           "range %r cannot be split further: results may be incomplete",
                           self.source.name, len(matches), study_date or "(all dates)")
            return studies
        first, last = bounds
        middle = first + (last - first) // 2
        LOGGER.info("C-FIND %s truncated at %d matches: splitting %s", self.source.name,
                    len(matches), study_date)
        left = f"{first:%Y%m%d}-{middle:%Y%m%d}"
        right = f"{middle + timedelta(days=1):%Y%m%d}-{last:%Y%m%d}"
        return self._find_range(query, left) + self._find_range(query, right)

    @property
    def _gets(self) -> bool:
        return self.source.retrieve == "get"

    def _remember_classes(self, matches: Iterable[Dataset]) -> None:
        for match in matches:
            uid = str(match.get("StudyInstanceUID", "") or "")
            if uid:  # empty: the archive does not list them (not asked again)
                known = self._classes.get(uid, ())
                self._classes[uid] = tuple(dict.fromkeys([*known, *_sop_classes(match)]))

    def _study_classes(self, study_instance_uid: str) -> tuple[str, ...] | None:
        """The SOP classes of a study: from the batch's C-FIND, else a C-FIND for the study
        (a resumed batch); None when the archive does not say (every class is proposed)."""
        if study_instance_uid in self._classes:
            return self._classes[study_instance_uid] or None
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_instance_uid
        identifier.SOPClassesInStudy = ""
        try:
            answer = find(self.peer, self.settings.dicom, identifier)
        except NetworkError as exc:
            LOGGER.info("study %s: SOP classes not known (%s): proposing every class",
                        study_instance_uid, safe_message(exc))
            return None
        classes = tuple(dict.fromkeys(c for m in answer.matches for c in _sop_classes(m)))
        return classes or None

    def _shared_ingestor(self) -> Ingestor:
        """One ingestor (and its fsync threads) for every C-GET of this runner."""
        with self._ingestor_lock:
            if self._ingestor is None:
                # Its own incoming/ folder: a serve (re)start on this host must not clear a
                # retrieval in progress.
                self._ingestor = Ingestor(self.settings.storage.file_store(role="batch"),
                                          self.db, self.settings.storage,
                                          self.settings.limits)
            return self._ingestor

    # -- creating and running ---------------------------------------------------------------
    def create(self, query: BatchQuery, *, route: str | None = None,
               kind: str = "run") -> int:
        """A new batch row for `query`.

        Raises
        ------
        ConfigError
            `route` is not configured.
        """
        if route is not None and route not in {r.name for r in self.settings.routes}:
            raise ConfigError(f"unknown route {route!r}")
        with self.db.write_session() as session:
            batch = batches.create_batch(session, kind=kind, source=self.source.name,
                                         route=route, query=query.as_dict(),
                                         now=datetime.now(UTC))
            return batch.id

    def counts(self, batch_id: int) -> Counts:
        """Where a batch stands."""
        with self.db.sessions() as session:
            batch = batches.get_batch(session, batch_id)
            assert batch is not None
            kind, route = batch.kind, batch.route
            versions = self.active_versions(route) if kind == "run" else None
            rows = batches.progress(session, batch_id, route, versions)
        counts = Counts(found=len(rows))
        for row in rows:
            counts.retrieved += row.retrieve_state == batches.RETRIEVED
            if kind == "export":
                counts.processed += row.retrieve_state == batches.RETRIEVED
            else:
                counts.processed += row.processed
            counts.failed += row.failed
        return counts

    def run(self, batch_id: int, *, progress: Callable[[Counts], None] | None = None,
            stop: threading.Event | None = None, wait_processing: bool = True,
            timeout: float | None = None) -> Counts:
        """Find (once), retrieve what is missing, then follow processing until done.

        Parameters
        ----------
        batch_id : int
            A batch made by :meth:`create`.
        progress : callable, optional
            Called with :class:`Counts` after each step and every second while waiting.
        stop : threading.Event, optional
            Set to stop early (Ctrl-C): what was retrieved stays retrieved. A batch an
            operator cancels (``POST /api/batches/{id}/cancel``) stops the same way, before
            its next retrieval, and stays cancelled.
        wait_processing : bool
            Wait for the service to process the studies (a ``run`` batch) or not (an export).
        timeout : float, optional
            Give up waiting for processing after this many seconds.

        Returns
        -------
        Counts
        """
        stop = stop or threading.Event()
        report = progress or (lambda _: None)
        with self.db.sessions() as session:
            batch = batches.get_batch(session, batch_id)
            if batch is None:
                raise ConfigError(f"no batch {batch_id}")
            if batch.state == batches.CANCELLED:
                raise ConfigError(f"batch {batch_id} was cancelled")
            query = BatchQuery.from_dict(batch.query)
            needs_find = batch.found_at is None
            versions = self.active_versions(batch.route) if batch.kind == "run" else {}
        if needs_find:
            self._set(batch_id, "finding")
            found = self.find(query)
            with self.db.write_session() as session:
                batches.add_found(session, batch_id, found)
                batches.set_state(session, batch_id, "retrieving", datetime.now(UTC),
                                  found=True)
            LOGGER.info("batch %d: %d studies found on %s", batch_id, len(found),
                        self.source.name)
        report(self.counts(batch_id))
        with self.db.sessions() as session:
            todo = [r for r in batches.studies(session, batch_id)
                    if r.state != batches.RETRIEVED]
            session.expunge_all()
        lock = threading.Lock()

        def one(row: Any) -> None:
            if stop.is_set() or self._cancelled(batch_id, stop):
                return
            self._wait_turn(stop, lambda status: report(self._status(batch_id, status)))
            if stop.is_set():
                return
            self._retrieve(row, versions)
            if progress is not None:  # reading the counts is a query over the batch
                with lock:
                    report(self.counts(batch_id))

        with ThreadPoolExecutor(max_workers=self.source.max_associations) as pool:
            list(pool.map(one, todo))
        if stop.is_set():
            self._set(batch_id, "interrupted")
            return self.counts(batch_id)
        self._set(batch_id, "processing" if wait_processing else "done")
        deadline = None if timeout is None else time.monotonic() + timeout
        counts = self.counts(batch_id)
        while wait_processing and not counts.finished and not stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                break
            report(counts)
            if stop.wait(1.0) or self._cancelled(batch_id, stop):
                break
            counts = self.counts(batch_id)
        report(counts)
        if counts.finished:
            self._set(batch_id, "done")
        elif stop.is_set():
            self._set(batch_id, "interrupted")
        return counts

    def _cancelled(self, batch_id: int, stop: threading.Event) -> bool:
        """Whether an operator cancelled the batch (then `stop` is set for every thread)."""
        with self.db.sessions() as session:
            batch = batches.get_batch(session, batch_id)
        if batch is not None and batch.state == batches.CANCELLED:
            stop.set()
            return True
        return False

    def _status(self, batch_id: int, status: str) -> Counts:
        counts = self.counts(batch_id)
        counts.status = status
        return counts

    def _set(self, batch_id: int, state: str, error: str | None = None) -> None:
        with self.db.write_session() as session:
            batches.set_state(session, batch_id, state, datetime.now(UTC), error=error)

    def _wait_turn(self, stop: threading.Event, say: Callable[[str], None]) -> None:
        """Block until the run window is open and the rate limit allows the next study."""
        while not in_window(self.source.run_window, datetime.now().astimezone()):
            say(f"waiting for the run window {self.source.run_window}")
            if stop.wait(30.0):
                return
        rate = self.source.max_studies_per_minute
        if rate is None:
            return
        with self._pace_lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + 60.0 / rate
        if start > now:
            stop.wait(start - now)

    def _retrieve(self, row: Any, versions: dict[str, str]) -> None:
        """Retrieve one study unless it is held or processed already.

        `versions` (route name -> active model version; empty for an export) decides
        "processed": our results of that version exist. A study held already whose results
        are of an older version is routed again (nothing else would re-open it).
        """
        uid = row.study_instance_uid
        with self.db.sessions() as session:
            have = batches.local_instance_count(session, uid)
            processed = batches.has_current_results(session, uid, versions)
        if processed:
            LOGGER.info("study %s already processed by the active model version: not "
                        "retrieved", uid)
            with self.db.write_session() as session:
                batches.mark_retrieved(session, row.id, instances=have, failed=0,
                                       now=datetime.now(UTC))
            return
        try:
            self._fetch_missing(row, have)
        finally:
            self._reroute_stale(uid, versions)

    def _reroute_stale(self, uid: str, versions: dict[str, str]) -> None:
        with self.db.write_session() as session:
            if (batches.has_stale_results(session, uid, versions)
                    and batches.request_routing(session, uid, datetime.now(UTC))):
                LOGGER.info("study %s: results of an older model version; routed again", uid)

    def _fetch_missing(self, row: Any, have: int) -> None:
        uid = row.study_instance_uid
        if row.expected_instances is not None and have >= row.expected_instances > 0:
            LOGGER.info("study %s already in the store (%d instances): not retrieved", uid,
                        have)
            with self.db.write_session() as session:
                batches.mark_retrieved(session, row.id, instances=have, failed=0,
                                       now=datetime.now(UTC))
            return
        try:
            result = self._fetch(uid)
        except NetworkError as exc:
            with self.db.write_session() as session:
                batches.mark_failed(session, row.id, error=safe_message(exc))
            LOGGER.warning("study %s: retrieval failed: %s", uid, exc)
            return
        with self.db.sessions() as session:
            have = batches.local_instance_count(session, uid)
        with self.db.write_session() as session:
            if result.status in (0x0000, 0xB000) and have > 0:
                # 0xB000: a partial result; what arrived is processed, the failures recorded.
                batches.mark_retrieved(session, row.id, instances=have, failed=result.failed,
                                       now=datetime.now(UTC))
                if result.failed:
                    LOGGER.warning("study %s: %d sub-operations failed (status 0x%04X)", uid,
                                   result.failed, result.status)
            else:
                batches.mark_failed(session, row.id, failed=result.failed,
                                    error=f"retrieve status 0x{result.status:04X}, "
                                          f"{result.completed} completed, {result.failed} "
                                          "failed")

    def _fetch(self, study_instance_uid: str) -> RetrieveResult:
        if self.source.retrieve == "move":
            return move_study(self.peer, self.settings.dicom, study_instance_uid,
                              self.settings.dicom.ae_title)
        ingestor = self._shared_ingestor()
        classes = self._study_classes(study_instance_uid)
        result = get_study(self.peer, self.settings.dicom, study_instance_uid, ingestor,
                           classes)
        if classes is not None and not result.ok:
            # The archive may hold a class its SOPClassesInStudy left out (no context for
            # it: a failed sub-operation): once more with every class. What arrived already
            # comes again and is absorbed as a duplicate.
            LOGGER.info("study %s: C-GET with the study's SOP classes ended 0x%04X (%d "
                        "failed): again with every class", study_instance_uid, result.status,
                        result.failed)
            result = get_study(self.peer, self.settings.dicom, study_instance_uid, ingestor)
        return result


REPORT_COLUMNS = ("StudyInstanceUID", "AccessionNumber", "StudyDate", "retrieve",
                  "expected_instances", "retrieved_instances", "failed_suboperations", "job",
                  "routed", "findings", "present", "sr_delivered", "sr_pending", "processed",
                  "error")


def report_rows(db: Database, batch_id: int) -> list[dict[str, Any]]:
    """One row per study of a batch (see :data:`REPORT_COLUMNS`)."""
    with db.sessions() as session:
        batch = batches.get_batch(session, batch_id)
        if batch is None:
            raise ConfigError(f"no batch {batch_id}")
        rows = batches.progress(session, batch_id, batch.route)
    return [{
        "StudyInstanceUID": r.study_instance_uid, "AccessionNumber": r.accession_number,
        "StudyDate": r.study_date, "retrieve": r.retrieve_state,
        "expected_instances": "" if r.expected_instances is None else r.expected_instances,
        "retrieved_instances": r.retrieved_instances,
        "failed_suboperations": r.failed_suboperations, "job": r.job_state or "",
        "routed": "" if r.routed is None else ("yes" if r.routed else "no"),
        "findings": r.findings, "present": r.present, "sr_delivered": r.sr_sent,
        "sr_pending": r.sr_pending, "processed": "yes" if r.processed else "no",
        "error": r.error or "",
    } for r in rows]


def write_report(rows: Iterable[dict[str, Any]], out: Path) -> Path:
    """Write the per-study report as CSV (``.csv``) or a small HTML table (``.html``)."""
    items = list(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".html", ".htm"):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in REPORT_COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in REPORT_COLUMNS)
            + "</tr>" for r in items)
        out.write_text(f"<!doctype html><meta charset=utf-8><title>dicom-ai batch report"
                       f"</title><table border=1><tr>{head}</tr>{body}</table>\n",
                       encoding="utf-8")
        return out
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(REPORT_COLUMNS))
        writer.writeheader()
        writer.writerows(items)
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Totals of a report."""
    return {
        "studies": len(rows),
        "retrieved": sum(1 for r in rows if r["retrieve"] == batches.RETRIEVED),
        "processed": sum(1 for r in rows if r["processed"] == "yes"),
        "failed": sum(1 for r in rows if r["retrieve"] == batches.RETRIEVE_FAILED
                      or r["job"] == "failed"),
        "sr_delivered": sum(int(r["sr_delivered"]) for r in rows),
    }
