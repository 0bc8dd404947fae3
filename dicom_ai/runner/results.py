"""The result building: a :class:`~dicom_ai.runner.analysis.Analysis` in, DICOM files and rows out.

The SR, SEG and heat-map Secondary Capture of one run (:mod:`dicom_ai.reporting`), written
whole or not at all under ``results/`` with their destinations, and each finding as the row to
store: both handed to :func:`storage.jobs.complete_job` as typed values.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai import __version__
from dicom_ai.config import Route, Settings, SRKind
from dicom_ai.exceptions import (
    JobError,
    OutOfSpaceError,
    ReportError,
    safe_message,
)
from dicom_ai.resources import results_space_problem
from dicom_ai.runner.analysis import Analysis
from dicom_ai.values import Finding, ModelRun, VolumeRegion
from storage import jobs
from storage.filestore import fsync_dir, fsync_file

__all__ = ["build_results", "finding_row", "result_uid", "volume_location"]

LOGGER = logging.getLogger(__name__)


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


def build_results(analysis: Analysis, route: Route, settings: Settings, *, store_root: Path,
                  job_id: int, seed: str, previous: Sequence[Any], hold: bool = False,
                  ) -> tuple[list[jobs.ResultToStore], dict[str, str]]:
    """The result objects of a run, written under ``results/``, with their destinations.

    Returns the results to store (the SR first) and each explained image's heat-map path.

    `hold` (an out-of-distribution input under ``ood_policy = "hold"``): built and stored,
    listed with the job, sent nowhere.

    A volume model's run (findings with a :class:`~dicom_ai.values.VolumeRegion`) gets a
    multi-frame SEG of its lesions (sent where the route sets ``send_seg``) and an SR with one
    TID 1411 group per lesion; a run with only its absent study finding gets the SR alone.
    """
    from dicom_ai.reporting import (
        PriorReport,
        build_heatmap_capture,
        build_seg,
        build_sr,
        has_segments,
    )
    from dicom_ai.reporting.capture import heatmap_finding
    from dicom_ai.reporting.sr import source_headers

    run = analysis.run
    sources = analysis.datasets
    # Checked again before writing (the model ran meanwhile); ENOSPC is the backstop.
    problem = results_space_problem(store_root,
                                    settings.storage.results_min_free_bytes)
    if problem is not None:
        raise OutOfSpaceError(problem)
    folder = store_root / "results" / run.study_instance_uid / str(job_id)
    destinations = {d.name: d for d in settings.destinations}
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
            path=str(path.relative_to(store_root)), destinations=to,
        ))

    version = __version__
    # The sources' evidence headers, built once for the SEG and every SR (0.8 s for 300 CT
    # slices under load); a failure is named after the first object that needs them.
    with _building("SEG" if has_segments(run) else "SR", sources):
        headers = source_headers(sources)
    seg: Dataset | None = None
    if has_segments(run):  # 2D segment locations, or the regions of a volume model
        with _building("SEG", sources):
            seg = build_seg(run, sources,
                            series_instance_uid=result_uid(seed, "seg-series"),
                            sop_instance_uid=result_uid(seed, "seg"),
                            software_version=version, headers=headers)
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
                          software_version=version, headers=headers)
            keep(sr, "sr", kind, [d.name for d in wanted if d.sr_kind == kind])
    # The SR first: the outbox sends in creation order, and the SR is what a PACS needs.
    results.sort(key=lambda r: r.kind != "sr")
    return results, heatmap_paths


def volume_location(region: VolumeRegion) -> dict[str, Any]:
    """The ``findings.location`` JSON of a volume finding (``location_kind`` ``"volume"``).

    Parameters
    ----------
    region : VolumeRegion
        The finding's region.

    Returns
    -------
    dict
        ``volume_mm3``, ``longest_axial_diameter_mm``, ``centroid`` (patient x y z, mm),
        ``mean_intensity`` (HU for CT; None for MR), ``segment_number``, ``tracking_id``,
        ``voxels``, and ``bbox`` (first and last-exclusive slice, row, column on the source
        slices' grid, in load order along the normal).
    """
    return {
        "volume_mm3": round(region.volume_mm3, 2),
        "longest_axial_diameter_mm": round(region.longest_axial_diameter_mm, 2),
        "centroid": [round(v, 2) for v in region.centroid],
        "mean_intensity": (None if region.mean_intensity is None
                           else round(region.mean_intensity, 1)),
        "segment_number": region.segment_number,
        "tracking_id": region.tracking_id,
        "voxels": region.voxels,
        "bbox": [*region.offset, *(o + n for o, n in zip(region.offset, region.mask.shape,
                                                          strict=True))],
    }


def finding_row(finding: Finding, run: ModelRun, heatmap_paths: dict[str, str],
                series_of: dict[str, str]) -> jobs.FindingToStore:
    """A finding as the row to store (the columns of :class:`storage.models.FindingRecord`)."""
    location = finding.location
    geometry: dict[str, Any] = {}
    region = finding.region
    if region is not None:
        geometry = volume_location(region)
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
    if region is not None:
        series_uid = region.series_instance_uid
    return jobs.FindingToStore(
        study_instance_uid=run.study_instance_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        frame_number=location.frame_number if location is not None else None,
        model_name=run.model_name,
        model_version=run.model_version,
        label=finding.label,
        code_value=finding.finding.value,
        code_scheme=finding.finding.scheme,
        code_meaning=finding.finding.meaning,
        probability=finding.probability,
        threshold=finding.threshold,
        present=finding.present,
        location_kind=(location.kind if location is not None
                       else "volume" if region is not None else None),
        location=geometry or None,
        segment_number=(location.segment_number if location is not None
                        else region.segment_number if region is not None else None),
        heatmap_path=heatmap_paths.get(sop_uid),
        tracking_uid=finding.tracking_uid,
        ood_score=finding.ood_score,
        out_of_distribution=finding.out_of_distribution,
    )
