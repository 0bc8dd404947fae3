"""The analysis of volume models: a series in, lesions out (model input kinds ``volume`` and
``slices``, issue 21).

Per eligible series (CT or MR slices with Image Position and Orientation, or an enhanced
multi-frame object), the chain of :mod:`dicom_ai.pipeline.volume`::

    load_volume -> modality values (float32, HU for CT) -> resample to target_spacing
      -> window + normalise (in place) -> sliding window through the predictor (batched)
      -> source_lesions (components mapped back to the source slices' grid where a lesion
         can be, see pipeline.volume.source_lesions) -> one Finding each

The window and normalisation run on the resampled volume (resample, then window): the training
and serving inputs stay the same, and the in-place window touches the smaller of the two grids.
:func:`prepare_volume_input` is that chain up to the sliding window, shared with
``dicom-ai preview`` (:func:`~dicom_ai.pipeline.preview.volume_montage`), so the preview shows
the numbers the model gets; :func:`volume_window` is the window rule (the spec's, else the
first slice's LINEAR window, :func:`~dicom_ai.pipeline.preprocessing.linear_window_of`).
Each lesion becomes a present :class:`~dicom_ai.values.Finding` with a
:class:`~dicom_ai.values.VolumeRegion` (its mask cropped to its bounding box on the source grid,
volume, longest axial diameter, centroid, mean HU for CT); a label with no lesion in any series
gives one absent study finding, as the 2D models report absent findings. Segments are numbered
1..n over the run, labels in output order and lesions by size (largest first) within each.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.config import LimitsSettings
from dicom_ai.exceptions import JobError, safe_message
from dicom_ai.inference.runtime import InferenceError, Predictor
from dicom_ai.pipeline.loading import DecodeError, LoadError, Volume, load_volume
from dicom_ai.pipeline.volume import (
    Grid,
    ModalityValues,
    Resampled,
    VolumeError,
    add_timing,
    forms_volume,
    prepare_volume_input,
    sliding_window,
    sliding_window_slices,
    source_lesions,
)
from dicom_ai.values import Finding, VolumeRegion

__all__ = ["VolumeResult", "analyse_volumes", "tracking_id"]

#: 3D patches per forward pass: a 64 x 128 x 128 float32 patch is 4 MiB in and out.
VOLUME_BATCH = 4
#: The longest Tracking Identifier (TID 1411, LO: 64 characters).
TRACKING_ID_LENGTH = 64


@dataclass(frozen=True)
class VolumeResult:
    """What :func:`analyse_volumes` found, before the :class:`~dicom_ai.values.ModelRun`.

    Attributes
    ----------
    findings : list of Finding
        Present lesions (with regions) in segment order, then an absent study finding per label
        that found none.
    datasets : list of Dataset
        The source headers of every analysed slice (one per SOP instance), for the results.
    series_instance_uid : str
        The first analysed series.
    """

    findings: list[Finding]
    datasets: list[Dataset]
    series_instance_uid: str


def tracking_id(route: str, label: str, rank: int) -> str:
    """The Tracking Identifier of a lesion: the route, the label and its size rank.

    The same in every run of one study and route (a superseding run after a late slice reports
    ``"lung-ct nodule 1"`` again for its largest nodule), at most 64 characters (LO).
    """
    text = f"{route} {label} {rank}" if route else f"{label} {rank}"
    if len(text) <= TRACKING_ID_LENGTH:
        return text
    tail = f" {label} {rank}"
    return route[:TRACKING_ID_LENGTH - len(tail)] + tail


def _tracking_uid(key: str, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["dicom-ai-tracking", key, *map(str, parts)]))


def _probabilities(predictor: Predictor, volume: Volume, grid: Grid,
                   timings: dict[str, float], started: float
                   ) -> tuple[NDArray[np.float32], Resampled | None, ModalityValues]:
    """The model's output on the resampled grid, its resampling, and the source HU volume."""
    spec = predictor.spec
    prep = spec.preprocessing
    add_timing(timings, "load", started)  # reading the files, before the chain below
    prepared = prepare_volume_input(volume, grid, prep, timings=timings)
    model_input, resampled, hu = prepared.array, prepared.resampled, prepared.modality
    assert hu is not None
    started = time.perf_counter()

    def predict(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        # The forward passes alone, within "inference" (benchmarks/volume.py splits them off).
        begun = time.perf_counter()
        try:
            return predictor.predict(batch)
        finally:
            add_timing(timings, "forward", begun)

    try:
        if prep.input_kind == "volume":
            assert prep.patch_size is not None  # the spec's validator
            output = sliding_window(model_input, predict, prep.patch_size, overlap=prep.overlap,
                                    blend=prep.blend,
                                    batch_size=min(VOLUME_BATCH, predictor.batch_size))
        else:
            output = sliding_window_slices(model_input, predict, prep.input_shape,
                                           k=prep.slices_k, overlap=prep.overlap,
                                           blend=prep.blend, batch_size=predictor.batch_size)
    except InferenceError as exc:
        raise JobError(safe_message(exc), retryable=True) from exc
    except VolumeError as exc:  # an output of the wrong shape: the model, not the data
        raise JobError(f"{predictor.label}: {safe_message(exc)}", retryable=False) from exc
    add_timing(timings, "inference", started)
    return output, resampled, hu


def analyse_volumes(eligible: Sequence[Sequence[Dataset]], predictor: Predictor, *,
                    seed: str, route: str = "", limits: LimitsSettings | None = None,
                    skipped: list[str], timings: dict[str, float]) -> VolumeResult | None:
    """Run a volume model over each series that forms a volume, and find its lesions.

    Parameters
    ----------
    eligible : sequence of sequence of Dataset
        Per series, the instances the scope gate kept (headers from
        :func:`~dicom_ai.pipeline.loading.read_study`, read from files).
    predictor : Predictor
        A loaded model whose spec's ``input_kind`` is ``volume`` or ``slices``.
    seed : str
        The job's seed: the absent findings' tracking UIDs, as for 2D models.
    route : str
        The job's route: with the study, the key of each lesion's Tracking Identifier and
        Tracking UID, the same across superseding runs (:func:`tracking_id`).
    limits : LimitsSettings, optional
        ``[limits]``, checked before decoding (as for 2D models).
    skipped : list of str
        Receives a line per series that is not a volume (the job's note).
    timings : dict
        Receives seconds per stage: ``load``, ``resample``, ``window``, ``inference``,
        ``post``; ``forward`` is the model's forward passes, part of ``inference``.

    Returns
    -------
    VolumeResult or None
        None when no series forms a volume (then every series is in `skipped`).

    Raises
    ------
    JobError
        Unreadable or undecodable pixels and pixel limits (not retryable), the model failing
        (retryable) or returning outputs of the wrong shape (not retryable).
    """
    spec = predictor.spec
    analysed: list[Dataset] = []  # every analysed series' instances, in order
    all_uids: dict[str, None] = {}  # their slices' SOP Instance UIDs, in load order
    present: list[tuple[int, int, Finding]] = []  # (label index, voxels, finding)
    best: dict[int, float] = {}  # per label, the highest output anywhere (absent findings)
    started = time.perf_counter()
    # One series at a time, loaded, run and reduced to its lesions before the next is read:
    # the peak memory is one series' arrays, whatever the number of series.
    for datasets in eligible:
        series_uid = str(datasets[0].get("SeriesInstanceUID", ""))
        why = forms_volume(datasets)
        if why is None:
            try:
                volume = load_volume([ds.filename for ds in datasets], limits=limits)
            except DecodeError as exc:  # pixel limits included: the job fails, as for 2D
                raise JobError(f"cannot load the images: {safe_message(exc)}",
                               retryable=False) from exc
            except LoadError as exc:  # no geometry, mixed or duplicate slices: this series
                why = f"not a volume: {safe_message(exc)}"
        if why is not None:
            skipped.append(f"series {series_uid} skipped: {spec.name} {spec.version} cannot "
                           f"take it: {why}")
            continue
        grid = Grid.of(volume)
        output, resampled, hu = _probabilities(predictor, volume, grid, timings, started)
        started = time.perf_counter()
        uids = tuple(volume.sop_instance_uids)
        del volume  # its pixel values live on in `hu` (read lazily) until the series is done
        # Mean attenuation means something for CT (HU); MR intensities are arbitrary units.
        ct = str(datasets[0].get("Modality", "")).strip().upper() == "CT"
        for k, label in enumerate(spec.outputs):
            channel = output if output.ndim == 3 else output[..., k]
            # Mapped back to the source slices only where a lesion can be (source_lesions).
            found = source_lesions(channel, resampled, grid, threshold=label.threshold,
                                   intensity=hu if ct else None,
                                   min_voxels=spec.min_component_pixels)
            best[k] = max(best.get(k, 0.0), found.peak)
            for item in found.lesions:
                lesion, mask = item.lesion, item.mask
                region = VolumeRegion(
                    series_instance_uid=series_uid, sop_instance_uids=uids, shape=grid.shape,
                    offset=(lesion.bbox[0][0], lesion.bbox[1][0], lesion.bbox[2][0]),
                    mask=np.ascontiguousarray(mask), voxels=lesion.voxels,
                    volume_mm3=lesion.volume_mm3,
                    longest_axial_diameter_mm=lesion.longest_axial_diameter_mm,
                    centroid=lesion.centroid_patient, mean_intensity=lesion.mean_intensity,
                )
                touched = tuple(dict.fromkeys(uids[lesion.bbox[0][0]:lesion.bbox[0][1]]))
                present.append((k, lesion.voxels, Finding(
                    label=label.name, finding=label.finding, finding_site=label.finding_site,
                    probability=item.probability, threshold=label.threshold,
                    present=True, sop_instance_uids=touched, tracking_uid="", scope="series",
                    region=region,
                )))
            del found
        del output, resampled, hu
        analysed.extend(datasets)
        all_uids.update(dict.fromkeys(uids))
        started = add_timing(timings, "post", started)
    if not analysed:
        return None
    first = analysed[0]
    key = f"{first.get('StudyInstanceUID', '')}/{route}"

    # Segments 1..n: labels in output order, lesions largest first within each (stable over
    # series in their order); the tracking identity follows the rank within the label.
    present.sort(key=lambda item: (item[0], -item[1]))
    findings: list[Finding] = []
    rank: dict[int, int] = {}
    for segment, (k, _, finding) in enumerate(present, start=1):
        rank[k] = rank.get(k, 0) + 1
        name = spec.outputs[k].name
        findings.append(_with(finding, segment, tracking_id(route, name, rank[k]),
                              _tracking_uid(key, "lesion", name, rank[k])))
    for k, label in enumerate(spec.outputs):
        if k in rank:
            continue
        probability = best.get(k, 0.0)
        findings.append(Finding(
            label=label.name, finding=label.finding, finding_site=label.finding_site,
            probability=probability, threshold=label.threshold, present=False,
            sop_instance_uids=tuple(all_uids), scope="study",
            tracking_uid=_tracking_uid(seed, "study", label.name)))
    add_timing(timings, "post", started)
    unique: dict[str, Dataset] = {}
    for ds in analysed:
        unique.setdefault(str(ds.SOPInstanceUID), ds)
    return VolumeResult(findings, list(unique.values()), str(first.SeriesInstanceUID))


def _with(finding: Finding, segment: int, identifier: str, uid: str) -> Finding:
    """`finding` numbered as segment `segment`, with its tracking identity."""
    assert finding.region is not None
    return replace(finding, tracking_uid=uid,
                   region=replace(finding.region, segment_number=segment,
                                  tracking_id=identifier))
