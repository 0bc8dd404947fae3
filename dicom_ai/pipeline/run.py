"""One job, start to end: the readable chain a worker runs.

    claim (lease) -> load frames -> preprocess -> inference (+ Grad-CAM) -> findings
      -> SR / SEG / heat-map SC files -> findings, results and outbox rows (one transaction)

A full disk (below ``storage.results_min_free_bytes``, ``ENOSPC``, ``EDQUOT``) or an unavailable
index is not a failed attempt: the job waits (state ``waiting``, its attempt given back) and is
due again after ``workers.resource_wait_seconds``; the results watermark is checked before the
model runs. Writing the job's outcome to an unavailable index is retried until it is back.

:class:`JobRunner` is what both dispatch backends call with a job id: the local pool's worker
processes and Celery tasks. It keeps models loaded between jobs. Everything a job writes is
keyed on the job: result UIDs derive from the job, files are overwritten by a retry, and
:func:`storage.jobs.complete_job` commits only while the lease is still ours, so a job whose
worker was presumed dead cannot complete twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import update

from dicom_ai import __version__
from dicom_ai.config import LimitsSettings, Route, Settings, SRKind
from dicom_ai.exceptions import (
    ConfigError,
    DicomAIError,
    JobError,
    OutOfSpaceError,
    ReportError,
    safe_message,
)
from dicom_ai.inference.postprocess import detections, heat_region, to_image_space
from dicom_ai.inference.registry import Registry
from dicom_ai.inference.runtime import InferenceError, Predictor, load_predictor
from dicom_ai.inference.spec import ModelSpec
from dicom_ai.pipeline.findings import Finding, FindingScope, HeatMap, Location, ModelRun
from dicom_ai.pipeline.loading import (
    DecodeError,
    Frame,
    LoadError,
    check_pixel_limits,
    frames_of,
    read_study,
)
from dicom_ai.pipeline.preprocessing import (
    PreprocessingError,
    luminance,
    preprocess_frame,
    unit_image,
)
from dicom_ai.resources import results_space_problem, space_problem
from storage import jobs
from storage.db import Database, is_resource_error
from storage.filestore import fsync_dir, fsync_file
from storage.models import Job

LOGGER = logging.getLogger(__name__)

__all__ = ["SKIP_REASONS", "WAIT_PREFIX", "Analysis", "JobRunner", "ModelCache",
           "OutOfScopeError", "analyse", "resource_problem", "result_uid", "skip_reasons"]

#: How the ``error`` of a waiting job starts (the rest says which resource, no patient value).
WAIT_PREFIX = "waiting: "
_T = TypeVar("_T")


def resource_problem(exc: BaseException) -> str | None:
    """Why `exc` is an exhausted resource (a wait, not an attempt), or None.

    A full disk (:func:`dicom_ai.resources.space_problem`) or a full or unavailable index
    (:func:`storage.db.is_resource_error`), anywhere in the exception's chain.
    """
    return space_problem(exc) or is_resource_error(exc)

# -- the analysis: frames in, a ModelRun out --------------------------------------------------
@dataclass
class Analysis:
    """A :class:`ModelRun` plus the frames it came from and the time each stage took."""

    run: ModelRun
    datasets: list[Dataset]
    timings: dict[str, float] = field(default_factory=dict)
    #: One line per series with images the model did not take, and why (scope gate,
    #: preprocessing); recorded on the job.
    skipped: list[str] = field(default_factory=list)


def _display(frame: Frame, predictor: Predictor, shape: tuple[int, int]) -> NDArray[np.float32]:
    """The frame as the model saw it (windowed grey 0..1) at the heat-map capture's `shape`:
    the overlay's background, made in bounded memory whatever the frame's size."""
    unit = unit_image(frame.array, frame.dataset, shape,
                      window=predictor.spec.preprocessing.window_values)
    return np.asarray(luminance(unit) if unit.ndim == 3 else unit, dtype=np.float32)


def _frame_number(frame: Frame) -> int | None:
    return frame.frame_index + 1 if int(frame.dataset.get("NumberOfFrames", 1) or 1) > 1 else None


def _tracking_uid(seed: str, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["dicom-ai-tracking", seed, *map(str, parts)]))


class OutOfScopeError(DicomAIError):
    """No image of a job is one the model can take: the job ends without a clinical result.

    Not a failure (nothing to retry): the job completes with no findings and no results, and
    :attr:`reasons` (one line per skipped series) become its visible note.
    """

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("not applicable: " + "; ".join(self.reasons))


def analyse(paths: Sequence[Path], predictor: Predictor, *, seed: str,
            explain: bool = True, explainer: Any = None,
            limits: LimitsSettings | None = None) -> Analysis:
    """Run one model over the images of a study's series and decide its findings.

    The files are grouped by series. Each image passes the model's scope gate
    (:meth:`ModelSpec.scope_problem`: modality, body part, view, photometric interpretation,
    pixel spacing, size) before anything is decoded; an image the gate or the preprocessing
    refuses is skipped with a reason (:attr:`Analysis.skipped`), never failing the run. The
    network runs on every eligible image in one batch. Findings follow the spec's
    ``input_unit``: per image, plus one study-level decision (the spec's ``aggregate`` of the
    image probabilities) when the images come from more than one series; per series (and the
    study, for several series); or per study. All go into one SR (PS3.16 TID 1500, one TID
    1501 group each). A model with training statistics (:mod:`dicom_ai.inference.ood`) scores
    each image in the same forward pass; a finding is flagged out of distribution when its
    image's score (a series or study decision: any of its images') is above the threshold.

    Parameters
    ----------
    paths : sequence of Path
        The instances to analyse, of one or several series of one study.
    predictor : Predictor
        The loaded model.
    seed : str
        Makes tracking UIDs deterministic per job (a retry reports the same UIDs).
    explain : bool
        Compute Grad-CAM heat-maps for classifiers (the heat-map SC and the region location of
        present findings); needs `explainer`.
    explainer : callable, optional
        ``explainer(images, output_index=k) -> (N, H, W)`` maps, e.g. a
        :class:`~dicom_ai.inference.explain.GradCam`.
    limits : LimitsSettings, optional
        ``[limits]``: an image declaring more pixels or bytes is refused before decoding
        (default: the ``[limits]`` defaults).

    Returns
    -------
    Analysis

    Raises
    ------
    OutOfScopeError
        No image is one the model can take (the reasons name each series).
    JobError
        The images cannot be read or decoded, or are above `limits` (not retryable), the
        model is a volume model (not retryable), or the model failed (retryable).
    """
    spec = predictor.spec
    timings: dict[str, float] = {}
    if spec.preprocessing.target_spacing is not None:
        raise JobError(f"{spec.name} {spec.version} is a volume model (target_spacing); "
                       "serving runs 2D models frame by frame", retryable=False)
    started = time.perf_counter()
    try:
        groups = read_study(paths)
    except LoadError as exc:
        raise JobError(f"cannot load the images: {safe_message(exc)}", retryable=False) from exc
    skipped: list[str] = []
    eligible: list[list[Dataset]] = []
    for series_uid, datasets in groups.items():
        problems: dict[str, int] = {}
        kept = []
        for ds in datasets:
            problem = spec.scope_problem(ds)
            if problem is None:
                kept.append(ds)
            else:
                problems[problem] = problems.get(problem, 0) + 1
        if problems:
            skipped.append(_skip_note(series_uid, len(datasets), problems))
        if kept:
            eligible.append(kept)
    if not eligible:
        raise OutOfScopeError(skipped)
    try:
        for datasets in eligible:  # every declared size before anything is decoded
            for ds in datasets:
                check_pixel_limits(ds, limits)
        decoded = [frames_of(datasets, limits=limits) for datasets in eligible]
    except (DecodeError, LoadError) as exc:
        raise JobError(f"cannot load the images: {safe_message(exc)}", retryable=False) from exc
    timings["load"] = time.perf_counter() - started

    started = time.perf_counter()
    frames: list[Frame] = []
    inputs_list: list[NDArray[np.float32]] = []
    for series_frames in decoded:
        problems = {}
        for frame in series_frames:
            try:
                inputs_list.append(preprocess_frame(frame.array, frame.dataset,
                                                    spec.preprocessing))
            except PreprocessingError as exc:
                problem = f"{spec.name} {spec.version} cannot take it: {safe_message(exc)}"
                problems[problem] = problems.get(problem, 0) + 1
                continue
            frames.append(frame)
        if problems:
            first = series_frames[0].dataset
            skipped.append(_skip_note(str(first.get("SeriesInstanceUID", "")),
                                      len(series_frames), problems, unit="frames"))
    if not frames:
        raise OutOfScopeError(skipped)
    inputs = np.stack(inputs_list)
    timings["preprocess"] = time.perf_counter() - started

    started = time.perf_counter()
    # A model with training statistics scores its inputs in the same forward pass.
    stats = getattr(predictor, "ood", None)
    ood_scores: NDArray[np.float32] | None = None
    try:
        if stats is None:
            outputs = predictor.predict(inputs)
        else:
            outputs, ood_scores = predictor.predict_with_ood(inputs)
    except InferenceError as exc:
        raise JobError(safe_message(exc), retryable=True) from exc
    timings["inference"] = time.perf_counter() - started
    ood_flags = (stats.flagged(ood_scores) if stats is not None and ood_scores is not None
                 else None)

    def ood(i: int) -> dict[str, Any]:
        """Finding fields for frame `i`: its out-of-distribution score and flag."""
        if ood_scores is None or ood_flags is None:
            return {}
        return {"ood_score": float(ood_scores[i]), "out_of_distribution": bool(ood_flags[i])}

    started = time.perf_counter()
    findings: list[Finding] = []
    heatmaps: list[HeatMap] = []
    if spec.task == "classification":
        from dicom_ai.reporting.capture import capture_shape

        maps = _explain(explainer, inputs, outputs, spec) if explain else {}
        timings["explain"] = time.perf_counter() - started
        started = time.perf_counter()
        for i, frame in enumerate(frames):
            shape = (int(frame.dataset.Rows), int(frame.dataset.Columns))
            for k, label in enumerate(spec.outputs):
                probability = float(outputs[i, k])
                present = probability >= label.threshold
                location = None
                heat = maps.get((i, k))
                if heat is not None:
                    if k == 0:  # the capture's matrix: at most MAX_CAPTURE_SIDE on a side
                        matrix = capture_shape(shape)
                        heatmaps.append(HeatMap(
                            frame.sop_instance_uid,
                            to_image_space(heat, spec.preprocessing, matrix),
                            _display(frame, predictor, matrix), _frame_number(frame)))
                    region = heat_region(heat, spec.preprocessing, shape) if present else None
                    if region is not None:  # the half-maximum region, not just its peak
                        location = Location("bbox", frame.sop_instance_uid,
                                            _frame_number(frame), point=region.peak,
                                            bbox=region.bbox, area_pixels=region.area_pixels)
                findings.append(Finding(
                    label=label.name, finding=label.finding, finding_site=label.finding_site,
                    probability=probability, threshold=label.threshold, present=present,
                    sop_instance_uids=(frame.sop_instance_uid,), location=location,
                    tracking_uid=_tracking_uid(seed, frame.sop_instance_uid, frame.frame_index,
                                               label.name),
                    **ood(i),
                ))
    else:
        segment = 0
        for i, frame in enumerate(frames):
            shape = (int(frame.dataset.Rows), int(frame.dataset.Columns))
            for k, label in enumerate(spec.outputs):
                prob_map = outputs[i, ..., k]
                found = detections(prob_map, spec.preprocessing, shape,
                                   threshold=label.threshold,
                                   min_component_pixels=spec.min_component_pixels)
                def finding(probability: float, present: bool, n: int,
                            location: Location | None = None,
                            label: Any = label, frame: Frame = frame, i: int = i) -> Finding:
                    return Finding(
                        label=label.name, finding=label.finding,
                        finding_site=label.finding_site, threshold=label.threshold,
                        sop_instance_uids=(frame.sop_instance_uid,),
                        probability=probability, present=present, location=location,
                        tracking_uid=_tracking_uid(seed, frame.sop_instance_uid,
                                                   frame.frame_index, label.name, n),
                        **ood(i),
                    )

                if not found:
                    findings.append(finding(float(prob_map.max()), False, 0))
                for n, det in enumerate(found):
                    segment += 1
                    findings.append(finding(det.max_probability, True, n, Location(
                        "segment", frame.sop_instance_uid, _frame_number(frame),
                        point=det.centroid, bbox=det.bbox, segment_number=segment,
                        mask=det.mask, area_pixels=det.area_pixels)))
    findings = _aggregate(spec, frames, findings, seed)
    timings["findings"] = time.perf_counter() - started
    first = frames[0].dataset
    run = ModelRun(
        model_name=spec.name, model_version=spec.version, task=spec.task,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        findings=findings, heatmaps=heatmaps,
        parameters={"ood_threshold": stats.threshold}
        if stats is not None and ood_scores is not None else {},
    )
    unique: dict[str, Dataset] = {}
    for frame in frames:
        unique.setdefault(frame.sop_instance_uid, frame.dataset)
    return Analysis(run, list(unique.values()), timings, skipped)


def _skip_note(series_uid: str, total: int, problems: dict[str, int], *,
               unit: str = "images") -> str:
    """One line for a series with skipped images: UIDs and the gate's reasons, no values."""
    count = sum(problems.values())
    what = "skipped" if count == total else f"{count} of {total} {unit} skipped"
    return f"series {series_uid} {what}: {'; '.join(problems)}"


#: Reason classes of a skipped series (:func:`skip_reasons`): one per check of the scope gate
#: (:meth:`ModelSpec.scope_problem`), the preprocessing's refusal, and anything else. A fixed
#: set, so a metric labelled with it has bounded cardinality.
SKIP_REASONS = ("modality", "body_part", "view_position", "photometric", "pixel_spacing",
                "size", "preprocessing", "other")
# The texts scope_problem starts its reasons with, and their class.
_SKIP_PREFIXES = (
    ("modality ", "modality"), ("body part ", "body_part"), ("view position ", "view_position"),
    ("photometric interpretation ", "photometric"), ("no pixel spacing", "pixel_spacing"),
    ("pixel spacing ", "pixel_spacing"), ("image ", "size"),
)


def skip_reasons(note: str | None) -> list[frozenset[str]]:
    """The reason classes of each skipped series named in a done job's note.

    The note is what :func:`analyse` records (``[not applicable: ]series UID skipped: reason;
    reason; series UID ...``, see :func:`_skip_note`); each reason maps to one of
    :data:`SKIP_REASONS` by the start :meth:`ModelSpec.scope_problem` gives it (PS3.3 C.7.3.1
    Modality and Body Part Examined, C.8.11.5 View Position, C.7.6.3 Photometric
    Interpretation, Pixel Spacing, Rows/Columns), or ``preprocessing``.

    Parameters
    ----------
    note : str or None
        ``jobs.error`` of a done job.

    Returns
    -------
    list of frozenset of str
        One set of classes per skipped series, in the note's order; empty for no note.
    """
    if not note:
        return []
    found: list[set[str]] = []
    for fragment in note.removeprefix("not applicable: ").split("; "):
        if fragment.startswith("series "):
            found.append(set())
            fragment = fragment.partition(": ")[2]
        if not found:  # not a skip note (nothing else is kept on a done job)
            return []
        classes = found[-1]
        if "preprocessing" in classes:  # a preprocessing line has only such reasons; this
            continue                    # is one of them or the rest of a library's message
        if " cannot take it: " in fragment:
            classes.add("preprocessing")
            continue
        kind = next((k for prefix, k in _SKIP_PREFIXES if fragment.startswith(prefix)), None)
        classes.add(kind or "other")
    return [frozenset(c) for c in found]


def _aggregate(spec: ModelSpec, frames: Sequence[Frame], findings: list[Finding],
               seed: str) -> list[Finding]:
    """The findings at the spec's ``input_unit``, the study's decision last.

    An image's score for a label is its highest probability for it (a classifier's output,
    or a segmentation's strongest detection or map maximum); a series' or the study's is the
    spec's ``aggregate`` of its images' scores, decided at the label's threshold. Image-level
    findings (with their locations) are kept for ``input_unit = "image"``. A study decision
    is added when the images come from more than one series (for ``study``: always); the
    images of one series keep their own decisions only. Image findings come first, in output
    order per image: :func:`~dicom_ai.reporting.capture.heatmap_finding` takes an image's
    first finding as the one its heat-map explains.
    """
    series_of: dict[str, str] = {}
    for frame in frames:
        series_of.setdefault(frame.sop_instance_uid, str(frame.dataset.SeriesInstanceUID))
    images = list(series_of)

    def combined(label: Any, uids: Sequence[str], scope: FindingScope, *key: str) -> Finding:
        wanted = set(uids)
        scores: dict[str, float] = {}
        # A decision combines its images: its OOD score is their highest, flagged if any is.
        ood_scores = [f.ood_score for f in findings if f.label == label.name
                      and f.sop_instance_uids[0] in wanted and f.ood_score is not None]
        flagged = any(f.out_of_distribution for f in findings
                      if f.label == label.name and f.sop_instance_uids[0] in wanted)
        for f in findings:
            uid = f.sop_instance_uids[0]
            if f.label == label.name and uid in wanted:
                scores[uid] = max(scores.get(uid, 0.0), f.probability)
        values = list(scores.values())
        probability = float(max(values) if spec.aggregate == "max" else np.mean(values))
        return Finding(
            label=label.name, finding=label.finding, finding_site=label.finding_site,
            probability=probability, threshold=label.threshold,
            present=probability >= label.threshold, sop_instance_uids=tuple(uids),
            tracking_uid=_tracking_uid(seed, scope, *key, label.name), scope=scope,
            ood_score=max(ood_scores) if ood_scores else None, out_of_distribution=flagged,
        )

    by_series: dict[str, list[str]] = {}
    for uid in images:
        by_series.setdefault(series_of[uid], []).append(uid)
    study: list[Finding] = []
    if spec.input_unit == "study" or len(by_series) > 1:
        study = [combined(label, images, "study") for label in spec.outputs]
    if spec.input_unit == "study":
        return study
    if spec.input_unit == "series":
        return [combined(label, uids, "series", series_uid)
                for series_uid, uids in by_series.items() for label in spec.outputs] + study
    return findings + study


def _explain(explainer: Any, inputs: NDArray[np.float32], outputs: NDArray[np.float32],
             spec: ModelSpec) -> dict[tuple[int, int], NDArray[np.float32]]:
    """Grad-CAM maps keyed (frame, output): output 0 for every frame (the SC), others if present."""
    if explainer is None:
        return {}
    maps: dict[tuple[int, int], NDArray[np.float32]] = {}
    for k, label in enumerate(spec.outputs):
        wanted = list(range(len(inputs))) if k == 0 else [
            i for i in range(len(inputs)) if outputs[i, k] >= label.threshold]
        if not wanted:
            continue
        computed = explainer(inputs[wanted], output_index=k)
        for j, i in enumerate(wanted):
            maps[(i, k)] = np.asarray(computed[j], dtype=np.float32)
    return maps


# The start of a wait reason of the results watermark (dicom_ai.resources).
_WATERMARK = "results store below "


def _kind(reason: str) -> str:
    """A wait reason without its details (free bytes, SQLSTATE): the same outage, or not."""
    return reason.split(" (")[0]


# -- models kept loaded ----------------------------------------------------------------------
class ModelCache:
    """Loaded predictors (and their Grad-CAM) by name and version, kept for the process' life.

    Parameters
    ----------
    registry : Registry
        Where models are found; the active version of a name is looked up per job, so
        activating a new version takes effect at the next job without a restart.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._loaded: dict[tuple[str, str], tuple[Predictor, Any]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> tuple[Predictor, Any]:
        """The active version of `name`, loaded (and its explainer, or None).

        Raises
        ------
        JobError
            Unknown model (not retryable) or a network that cannot load (retryable).
        """
        try:
            entry = self.registry.get(name)
        except ConfigError as exc:
            raise JobError(safe_message(exc), retryable=False) from exc
        key = (entry.name, entry.version)
        with self._lock:
            if key not in self._loaded:
                try:
                    predictor = load_predictor(entry.path)
                except InferenceError as exc:
                    raise JobError(safe_message(exc), retryable=True) from exc
                except ConfigError as exc:
                    raise JobError(safe_message(exc), retryable=False) from exc
                explainer = _explainer_for(predictor)
                if explainer is not None:  # trace the Grad-CAM function now, not in a job
                    explainer(np.zeros((1, *predictor.spec.input_shape), np.float32))
                self._loaded[key] = (predictor, explainer)
                LOGGER.info("loaded %s in %.2f s", predictor.label, predictor.load_seconds)
            return self._loaded[key]


def _explainer_for(predictor: Predictor) -> Any:
    """A compiled Grad-CAM for Keras classifiers; None where it does not apply."""
    if predictor.spec.task != "classification" or predictor.backend != "keras":
        return None
    from dicom_ai.inference.explain import GradCam

    try:
        # Fixed colour scale: the map's top is the model's probability (explain.py).
        return GradCam(predictor.model, scale="probability")  # type: ignore[attr-defined]
    except ValueError as exc:
        LOGGER.warning("no Grad-CAM for %s: %s", predictor.label, exc)
        return None


# -- results -----------------------------------------------------------------------------------
def result_uid(job_seed: str, *parts: object) -> str:
    """A UID for a result object, the same for every attempt of one job."""
    return str(generate_uid(entropy_srcs=["dicom-ai-result", job_seed, *map(str, parts)]))


def _write_atomic(ds: Dataset, path: Path) -> None:
    """Write a DICOM file whole or not at all (tmp, fsync, rename, fsync the folder).

    A failed write (e.g. ``ENOSPC``) removes its temporary file: a job waiting for space must
    not fill the disk further with every try.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def _building(what: str, sources: Sequence[Dataset]) -> Iterator[None]:
    """Turn a result object that cannot be built into a job error naming the rule, not a value.

    The same sources fail the same way on every attempt, so the job fails at once. What
    highdicom and pydicom raise quotes the offending value; :func:`safe_message` names the
    attribute (looked up in `sources`) and the rule instead. Disk and database errors pass
    through (retryable).
    """
    try:
        yield
    except ReportError as exc:
        raise JobError(f"cannot build the {what}: {exc}", retryable=False) from exc
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise JobError(f"cannot build the {what}: {safe_message(exc, sources)}",
                       retryable=False) from exc


# -- the job runner --------------------------------------------------------------------------
class JobRunner:
    """Claims and runs jobs by id; one per worker process.

    Parameters
    ----------
    settings : Settings
        The service settings (store, database, routes, destinations, worker policy).
    owner : str, optional
        The lease owner name; default ``host:pid:random``.
    db : Database, optional
        An open database to share (default: one of its own).
    """

    def __init__(self, settings: Settings, *, owner: str | None = None,
                 db: Database | None = None) -> None:
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.db = db or Database(settings.storage.url)
        self.store = settings.storage.file_store()
        self.models = ModelCache(Registry(settings.storage.root / "models"))

    def preload(self, names: Sequence[str]) -> None:
        """Load the models the routes use now and warm the report builders, so the first job
        pays neither the model's load nor highdicom's first use (about 0.8 s)."""
        for name in names:
            try:
                self.models.get(name)
            except JobError as exc:
                LOGGER.error("cannot preload model %s: %s", name, exc)
        from dicom_ai.pipeline.warmup import warm_up_reports

        try:
            warm_up_reports({d.sr_kind for d in self.settings.destinations} or {"comprehensive"})
        except Exception:  # only a warm-up: the first job pays instead
            LOGGER.exception("warming up the report builders failed")

    def run(self, job_id: int) -> str:
        """Claim job `job_id` and run it to done, a recorded failure, or a wait.

        Returns
        -------
        str
            ``"done"``, ``"pending"`` (will be retried), ``"failed"``, ``"waiting"`` (a
            resource is exhausted: no attempt used, due again after
            ``workers.resource_wait_seconds``), or ``"skipped"`` when the job was not
            claimable (done already, or another worker holds it) or the lease was lost.
        """
        now = datetime.now(UTC)

        def claim(session: jobs.Session) -> Any:
            job = jobs.claim_job(session, job_id, owner=self.owner,
                                 lease_seconds=self.settings.workers.lease_seconds, now=now)
            if job is not None:
                session.expunge(job)
            return job

        job = self._write(job_id, "claiming it", claim)
        if job is None:
            return "skipped"
        waited = job.error[len(WAIT_PREFIX):] if (job.error or "").startswith(WAIT_PREFIX) \
            else None
        LOGGER.info("job %d (%s, model %s) attempt %d", job.id, job.route, job.model_name,
                    job.attempts)
        queued = (now - job.created_at).total_seconds()
        try:
            # Cheap, and before the model: a job that cannot write its results waits unrun.
            problem = results_space_problem(self.store.root,
                                            self.settings.storage.results_min_free_bytes)
            if problem is not None:
                raise OutOfSpaceError(problem)
            if waited is not None and waited.startswith(_WATERMARK):
                LOGGER.info("job %d resumes (it waited: %s)", job.id, waited)
            elif waited is not None:  # whether the disk or index is back shows at the end
                LOGGER.debug("job %d tries again (it waited: %s)", job.id, waited)
            with self._heartbeat(job.id):
                version, findings, results, timings, note = self._execute(job)
        except Exception as exc:
            reason = resource_problem(exc)
            if reason is not None:
                return self._wait(job, reason, waited)
            retryable = exc.retryable if isinstance(exc, JobError) else True
            if not isinstance(exc, DicomAIError):
                LOGGER.exception("job %d crashed", job.id)
            # Library messages may quote attribute values (highdicom: "Unable to convert
            # '1901-12-31' to 'DA' object"): jobs.error, the API and the log get the safe form.
            message = safe_message(exc)

            def fail(session: jobs.Session) -> str | None:
                return jobs.fail_job(
                    session, job.id, owner=self.owner, error=message, retryable=retryable,
                    backoff_seconds=self.settings.workers.retry_backoff_seconds,
                    now=datetime.now(UTC))

            state = self._write(job.id, "recording its failure", fail)
            LOGGER.warning("job %d attempt %d failed (%s): %s", job.id, job.attempts,
                           state or "lease lost", message)
            return state or "skipped"
        timings = {"queue": queued, **timings}
        started = time.perf_counter()

        def complete(session: jobs.Session) -> bool:
            # The result files are written already (their UIDs derive from the job): a retry
            # after an index outage records the same files.
            ok = jobs.complete_job(session, job.id, owner=self.owner, model_version=version,
                                   findings=findings, results=results, timings=timings,
                                   now=datetime.now(UTC),
                                   supersedes_job_id=job.supersedes_job_id)
            if not ok:
                session.rollback()
            elif note:  # why series were skipped (or all were), in the same transaction
                session.execute(update(Job).where(Job.id == job.id).values(error=note[:4000]))
            return ok

        ok = self._write(job.id, "recording its results", complete)
        if not ok:
            LOGGER.warning("job %d: lease lost before completion; another worker has it", job.id)
            return "skipped"
        LOGGER.info("job %d done: %d findings, %d results (commit %.3f s)%s%s", job.id,
                    len(findings), len(results), time.perf_counter() - started,
                    "; not applicable, no result sent" if not findings and note else
                    "; some series skipped" if note else "",
                    f"; resumed after waiting ({waited})" if waited is not None else "")
        return "done"

    def _wait(self, job: Any, reason: str, waited: str | None) -> str:
        """Record that `job` waits for a resource (no attempt used); returns its outcome."""
        retry = self.settings.workers.resource_wait_seconds
        outage = [False]

        def wait(session: jobs.Session) -> str | None:
            # If recording the wait itself had to wait for the index, the resource may well be
            # back: due at once rather than after another resource_wait_seconds.
            return jobs.wait_job(session, job.id, owner=self.owner,
                                 reason=f"{WAIT_PREFIX}{reason}",
                                 retry_seconds=0.0 if outage[0] else retry,
                                 now=datetime.now(UTC))

        state = self._write(job.id, "recording that it waits", wait,
                            on_retry=lambda: outage.__setitem__(0, True))
        if state is None:
            LOGGER.warning("job %d: lease lost while it met an exhausted resource (%s)",
                           job.id, reason)
            return "skipped"
        if waited is not None and _kind(waited) == _kind(reason):
            LOGGER.debug("job %d still waiting: %s", job.id, reason)
        else:
            LOGGER.warning("job %d waits, no attempt used (tried again every %g s): %s",
                           job.id, retry, reason)
        return state

    def _write(self, job_id: int, what: str, work: Callable[[jobs.Session], _T], *,
               on_retry: Callable[[], None] | None = None) -> _T:
        """Run `work` in a write session, retrying while the index is full or unavailable.

        The delay grows from 0.5 s to ``workers.resource_wait_seconds``; the outage is logged
        once, and its end. Any other error is raised.
        """
        delay = 0.5
        since: float | None = None
        while True:
            try:
                with self.db.write_session() as session:
                    done = work(session)
            except Exception as exc:
                reason = is_resource_error(exc)
                if reason is None:
                    raise
                if since is None:
                    since = time.monotonic()
                    LOGGER.warning("job %d: %s while %s; retrying until it is back", job_id,
                                   reason, what)
                if on_retry is not None:
                    on_retry()
                time.sleep(delay)
                delay = min(delay * 2, self.settings.workers.resource_wait_seconds)
                continue
            if since is not None:
                LOGGER.info("job %d: the index is back after %.1f s (%s)", job_id,
                            time.monotonic() - since, what)
            return done

    @contextmanager
    def _heartbeat(self, job_id: int) -> Iterator[None]:
        """Extend the lease every third of its length while the job runs."""
        stop = threading.Event()
        lease = self.settings.workers.lease_seconds

        def beat() -> None:
            while not stop.wait(lease / 3):
                try:
                    with self.db.write_session() as session:
                        until = datetime.now(UTC) + timedelta(seconds=lease)
                        if not jobs.extend_lease(session, job_id, owner=self.owner, until=until):
                            return
                except Exception:  # the next beat retries; an expired lease is the fallback
                    LOGGER.exception("lease extension of job %d failed", job_id)

        thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _route(self, name: str) -> Route:
        for route in self.settings.routes:
            if route.name == name:
                return route
        raise JobError(f"route {name!r} is no longer configured", retryable=False)

    def _execute(self, job: Any) -> tuple[str, list[dict[str, Any]],
                                          list[jobs.ResultToStore], dict[str, float],
                                          str | None]:
        """Analyse the job's series and build its results.

        Returns the model version, finding rows, result files, stage timings and a note for
        the job row: the series the model skipped and why, or, when it took none, ``"not
        applicable: ..."`` with no findings and no results (nothing is sent).
        """
        route = self._route(job.route)
        predictor, explainer = self.models.get(job.model_name)
        series_uids = json.loads(job.series_instance_uids)
        with self.db.sessions() as session:
            relative = jobs.instance_paths(session, series_uids)
            prior_job = jobs.latest_done_job(session, job.study_instance_uid, job.route,
                                             before=job.id)
            previous = jobs.results_of_job(session, prior_job.id) if prior_job else []
            job.supersedes_job_id = prior_job.id if prior_job else None
        if not relative:
            raise JobError("the series have no instances (deleted?)", retryable=False)
        paths = [self.store.absolute(p) for p in relative]
        seed = f"{job.study_instance_uid}/{job.id}/{job.created_at.isoformat()}"
        explain = explainer is not None
        try:
            analysis = analyse(paths, predictor, seed=seed, explain=explain,
                               explainer=explainer, limits=self.settings.limits)
        except OutOfScopeError as exc:
            LOGGER.info("job %d: %s %s takes none of its %d series; no result", job.id,
                        predictor.spec.name, predictor.spec.version, len(series_uids))
            return predictor.spec.version, [], [], {}, str(exc)[:4000]
        started = time.perf_counter()
        flagged = any(f.out_of_distribution for f in analysis.run.findings)
        if flagged:
            LOGGER.warning("job %d: input outside the training distribution of %s %s (route "
                           "%s, ood_policy %s)", job.id, predictor.spec.name,
                           predictor.spec.version, route.name, route.ood_policy)
        results: list[jobs.ResultToStore] = []
        heatmap_paths: dict[str, str] = {}
        # "drop": the flagged findings are kept, no result object is built.
        if not (flagged and route.ood_policy == "drop"):
            results, heatmap_paths = self._build_results(
                job, route, analysis, seed, previous,
                hold=flagged and route.ood_policy == "hold")
        analysis.timings["report"] = time.perf_counter() - started
        series_of = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID)
                     for ds in analysis.datasets}
        findings = [_finding_row(f, analysis.run, heatmap_paths, series_of)
                    for f in analysis.run.findings]
        note = "; ".join(analysis.skipped)[:4000] or None
        return predictor.spec.version, findings, results, analysis.timings, note

    def _build_results(self, job: Any, route: Route, analysis: Analysis, seed: str,
                       previous: Sequence[Any], *, hold: bool = False,
                       ) -> tuple[list[jobs.ResultToStore], dict[str, str]]:
        """The result objects of a run, written under ``results/``, with their destinations.

        `hold` (an out-of-distribution input under ``ood_policy = "hold"``): built and stored,
        listed with the job, sent nowhere.
        """
        from dicom_ai.reporting import (
            PriorReport,
            build_heatmap_capture,
            build_seg,
            build_sr,
        )
        from dicom_ai.reporting.capture import heatmap_finding

        run = analysis.run
        sources = analysis.datasets
        # Checked again before writing (the model ran meanwhile); ENOSPC is the backstop.
        problem = results_space_problem(self.store.root,
                                        self.settings.storage.results_min_free_bytes)
        if problem is not None:
            raise OutOfSpaceError(problem)
        folder = self.store.root / "results" / run.study_instance_uid / str(job.id)
        destinations = {d.name: d for d in self.settings.destinations}
        wanted = [destinations[name] for name in route.destinations if name in destinations]
        if hold:
            wanted = []
        results: list[jobs.ResultToStore] = []

        def keep(ds: Dataset, kind: str, sr_kind: str | None, to: list[str]) -> None:
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            _write_atomic(ds, path)
            results.append(jobs.ResultToStore(
                kind=kind, sr_kind=sr_kind, study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                path=str(path.relative_to(self.store.root)), destinations=to,
            ))

        version = __version__
        seg: Dataset | None = None
        if run.task == "segmentation" and any(
                f.location is not None and f.location.kind == "segment" for f in run.findings):
            with _building("SEG", sources):
                seg = build_seg(run, sources,
                                series_instance_uid=result_uid(seed, "seg-series"),
                                sop_instance_uid=result_uid(seed, "seg"),
                                software_version=version)
                keep(seg, "seg", None, [d.name for d in wanted] if route.send_seg else [])
        heatmap_paths: dict[str, str] = {}
        if route.send_heatmap:
            series_uid = result_uid(seed, "sc-series")
            for n, heat in enumerate(run.heatmaps, start=1):
                explained = heatmap_finding(run, heat)
                # The map of an absent finding shows where the model looked, not a lesion: a
                # PACS user would read it as one, so only on request (heatmap_for = "all").
                if route.heatmap_for == "positive" and not (explained and explained.present):
                    continue
                source = next(s for s in sources if s.SOPInstanceUID == heat.sop_instance_uid)
                with _building("heat-map SC", [source]):
                    sc = build_heatmap_capture(heat, source, run, series_instance_uid=series_uid,
                                               sop_instance_uid=result_uid(seed, "sc", n),
                                               instance_number=n, software_version=version,
                                               finding=explained)
                    keep(sc, "heatmap", None, [d.name for d in wanted])
                heatmap_paths[heat.sop_instance_uid] = results[-1].path
        kinds: list[SRKind] = sorted({d.sr_kind for d in wanted}) or ["comprehensive"]
        for kind in kinds:
            prior = next((p for p in previous if p.kind == "sr" and p.sr_kind == kind), None)
            predecessor = None if prior is None else PriorReport(
                prior.study_instance_uid, prior.series_instance_uid, prior.sop_class_uid,
                prior.sop_instance_uid)
            with _building("SR", sources):
                sr = build_sr(run, sources, kind=kind,
                              series_instance_uid=result_uid(seed, "sr-series", kind),
                              sop_instance_uid=result_uid(seed, "sr", kind),
                              predecessor=predecessor, segmentation=seg,
                              software_version=version)
                keep(sr, "sr", kind, [d.name for d in wanted if d.sr_kind == kind])
        # The SR first: the outbox sends in creation order, and the SR is what a PACS needs.
        results.sort(key=lambda r: r.kind != "sr")
        return results, heatmap_paths


def _finding_row(finding: Finding, run: ModelRun, heatmap_paths: dict[str, str],
                 series_of: dict[str, str]) -> dict[str, Any]:
    """A finding as the columns of :class:`storage.models.FindingRecord`."""
    location = finding.location
    geometry: dict[str, Any] = {}
    if location is not None:
        if location.point is not None:
            geometry["point"] = [round(v, 2) for v in location.point]
        if location.bbox is not None:
            geometry["bbox"] = [round(v, 2) for v in location.bbox]
        if location.area_pixels is not None:
            geometry["area_pixels"] = location.area_pixels
    # A series or study decision names no one image: its row has an empty image UID (and,
    # for the study, an empty series UID); the SR lists all its source images.
    sop_uid = finding.sop_instance_uids[0] if finding.scope == "image" else ""
    series_uid = (series_of.get(finding.sop_instance_uids[0], run.series_instance_uid)
                  if finding.scope != "study" else "")
    return {
        "study_instance_uid": run.study_instance_uid,
        "series_instance_uid": series_uid,
        "sop_instance_uid": sop_uid,
        "frame_number": location.frame_number if location is not None else None,
        "model_name": run.model_name,
        "model_version": run.model_version,
        "label": finding.label,
        "code_value": finding.finding.value,
        "code_scheme": finding.finding.scheme,
        "code_meaning": finding.finding.meaning,
        "probability": finding.probability,
        "threshold": finding.threshold,
        "present": finding.present,
        "location_kind": location.kind if location is not None else None,
        "location": json.dumps(geometry) if geometry else None,
        "segment_number": location.segment_number if location is not None else None,
        "heatmap_path": heatmap_paths.get(sop_uid),
        "tracking_uid": finding.tracking_uid,
        "ood_score": finding.ood_score,
        "out_of_distribution": finding.out_of_distribution,
    }
