"""The analysis: one model over a study's images, frames in, a :class:`ModelRun` out.

Load and scope-gate the frames (:mod:`dicom_ai.pipeline.loading`), preprocess them, run the
model and Grad-CAM (:mod:`dicom_ai.inference`), and decide the findings per image, series or
study (:mod:`dicom_ai.values`). No database, no result files: :mod:`dicom_ai.runner.results`
builds those and :mod:`dicom_ai.runner.run` stores them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.config import LimitsSettings
from dicom_ai.exceptions import (
    DicomAIError,
    JobError,
    safe_message,
)
from dicom_ai.inference.postprocess import detections, heat_region, to_image_space
from dicom_ai.inference.runtime import InferenceError, Predictor
from dicom_ai.inference.spec import ModelSpec
from dicom_ai.inference.volumes import analyse_volumes
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
from dicom_ai.values import Finding, FindingScope, HeatMap, Location, ModelRun

__all__ = ["SKIP_REASONS", "Analysis", "OutOfScopeError", "analyse", "skip_reasons"]


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
            limits: LimitsSettings | None = None, route: str = "") -> Analysis:
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

    A volume model (``input_kind`` ``volume`` or ``slices``) runs over each eligible series
    that forms a volume instead (:mod:`dicom_ai.inference.volumes`): one finding per lesion with
    its :class:`~dicom_ai.values.VolumeRegion`, or an absent study finding per label; a series
    that is not a volume is skipped with its reason.

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
    route : str
        The job's route: volume models key their lesions' tracking identifiers on it (the
        same in a superseding run).

    Returns
    -------
    Analysis

    Raises
    ------
    OutOfScopeError
        No image is one the model can take (the reasons name each series).
    JobError
        The images cannot be read or decoded, or are above `limits` (not retryable), or
        the model failed (retryable).
    """
    spec = predictor.spec
    timings: dict[str, float] = {}
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
    if spec.input_kind != "image":
        timings["load"] = time.perf_counter() - started
        volumes = analyse_volumes(eligible, predictor, seed=seed, route=route, limits=limits,
                                  skipped=skipped, timings=timings)
        if volumes is None:
            raise OutOfScopeError(skipped)
        return Analysis(ModelRun(
            model_name=spec.name, model_version=spec.version, task=spec.task,
            study_instance_uid=str(volumes.datasets[0].StudyInstanceUID),
            series_instance_uid=volumes.series_instance_uid, findings=volumes.findings,
            parameters={"input_kind": spec.input_kind},
        ), volumes.datasets, timings, skipped)
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
