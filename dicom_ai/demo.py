"""``dicom-ai demo``: the whole loop on this machine in about a minute.

It writes a few synthetic chest radiographs (half with nodules), starts a stand-in PACS and the
service on free loopback ports (SQLite, one local worker, the bundled ``chest-nodule`` model, a
route that sends the SR and a heat-map Secondary Capture back), pushes the studies, waits for the
results to arrive at the stand-in PACS, and reports what came back against the ground truth.

``dicom-ai demo --modality CT`` (:func:`run_ct_demo`) runs the CT loop the same way: synthetic
chest CT volumes (the ``synth --phantom chest`` phantom, half with lesions), a route sending CT
series to the bundled ``chest-ct-nodule`` volume model with a SEG and a Comprehensive 3D SR
back, and per study the lesions found against the synthetic truth (``lesions.csv``): a found
lesion matches a true one when its centroid lies within the true lesion's radius plus
:data:`MATCH_MARGIN_MM`.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_ai.config import Settings, load_settings
from dicom_ai.network.scu import Peer, inspect, iter_files, send_files
from dicom_ai.network.standin import StandInPacs
from dicom_ai.service import Service
from dicom_ai.training.synth import ChestCT, synthesize

__all__ = [
    "CT_MODEL",
    "MATCH_MARGIN_MM",
    "CTDemoResult",
    "CTDemoStudy",
    "DemoResult",
    "DemoStudy",
    "FoundLesion",
    "TrueLesion",
    "demo_chest_ct",
    "match_lesions",
    "run_ct_demo",
    "run_demo",
]

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: The bundled volume model the CT demo routes to.
CT_MODEL = "chest-ct-nodule"
#: A found lesion matches a true one when its centroid is within the true radius plus this.
MATCH_MARGIN_MM = 5.0
#: How long to wait for SEGs once every SR has arrived.
SEG_GRACE_SECONDS = 10.0
#: How long to wait for heat-map SCs once every SR has arrived.
HEATMAP_GRACE_SECONDS = 10.0


@dataclass
class DemoStudy:
    """One pushed study and what came back for it."""

    study_instance_uid: str
    truth: bool
    probability: float | None = None
    present: bool | None = None
    sr_path: Path | None = None
    heatmap_paths: list[Path] = field(default_factory=list)

    @property
    def agrees(self) -> bool | None:
        """The model's decision equals the ground truth (None until the SR arrived)."""
        return None if self.present is None else self.present == self.truth


@dataclass
class DemoResult:
    """The demo's studies, where things are, and how long it took."""

    studies: list[DemoStudy]
    work: Path
    pacs_folder: Path
    seconds: float
    complete: bool


def run_demo(work: Path, *, studies: int = 4, seed: int = 7, timeout: float = 300.0,
             quiet_seconds: float = 1.0) -> DemoResult:
    """Run the loop once and return what the stand-in PACS received.

    Parameters
    ----------
    work : Path
        A folder for the synthetic studies, the service's store and the PACS' inbox.
    studies : int
        How many CR studies to push.
    seed : int
        Seed of the synthetic studies.
    timeout : float
        Seconds to wait for every SR.
    quiet_seconds : float
        Completion quiet period (series and study).

    Returns
    -------
    DemoResult
    """
    started = time.monotonic()
    source = work / "studies"
    # A namespace of its own: `dicom-ai synth` never makes the demo's UIDs.
    synthesize(source, studies=studies, seed=seed, modality="CR", positive_fraction=0.5,
               difficulty=0.3, namespace="demo")
    truth: dict[str, bool] = {}
    with (source / "labels.csv").open() as fh:
        for row in csv.DictReader(fh):
            truth[row["StudyInstanceUID"]] = row["label"] == "1"
    # The stand-in follows dicom.tune_network as the service does.
    pacs = StandInPacs(work / "pacs", tune_network=load_settings(None).dicom.tune_network)
    settings = _demo_settings(
        work, pacs, quiet_seconds, destination={},
        route={"name": "chest-xray", "match": {"Modality": ["CR", "DX"]},
               "model": "chest-nodule", "send_heatmap": True})
    service = Service(settings)
    try:
        _push(source, service, settings)
        results = {uid: DemoStudy(uid, t) for uid, t in truth.items()}
        # A study's heat-map SC is its own outbox row and may follow its SR; heat-maps go with
        # present findings only (the route's default heatmap_for).
        _await_results(
            pacs, lambda paths: _collect_cr(paths, results), timeout,
            srs_in=lambda: all(s.sr_path is not None for s in results.values()),
            followers_in=lambda: all(s.heatmap_paths or not s.present
                                     for s in results.values()),
            grace=HEATMAP_GRACE_SECONDS)
    finally:
        service.stop()
        pacs.stop()
    ordered = sorted(results.values(), key=lambda s: s.study_instance_uid)
    return DemoResult(ordered, work, pacs.folder, time.monotonic() - started,
                      all(s.sr_path is not None for s in ordered))


def _await_results(pacs: StandInPacs, collect: Callable[[list[Path]], None], timeout: float,
                   *, srs_in: Callable[[], bool], followers_in: Callable[[], bool],
                   grace: float) -> None:
    """Poll the stand-in PACS until every study's SR is in and what follows it (heat-maps,
    SEGs), or `grace` seconds after the last SR, or `timeout`: rather than stopping the
    service under objects still in its outbox."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        collect(pacs.received())
        if srs_in():
            if followers_in():
                return
            deadline = min(deadline, time.monotonic() + grace)
        time.sleep(0.5)


def _collect_cr(paths: list[Path], results: dict[str, DemoStudy]) -> None:
    """Record what the stand-in PACS received for each CR demo study (SR, heat-map SCs)."""
    from dicom_ai.reporting import summarize_sr

    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        study = results.get(str(ds.StudyInstanceUID))
        if study is None:
            continue
        if str(ds.SOPClassUID) in SR_CLASSES and study.sr_path is None:
            found = summarize_sr(ds)
            study.sr_path = path
            study.probability = max((f.probability for f in found), default=None)
            study.present = any(f.present for f in found)
        elif str(ds.SOPClassUID) == SC_CLASS and path not in study.heatmap_paths:
            study.heatmap_paths.append(path)


def _demo_settings(work: Path, pacs: StandInPacs, quiet_seconds: float, *,
                   destination: dict[str, Any], route: dict[str, Any]) -> Settings:
    """The demo service's settings (SQLite, one receiver, one local worker, free loopback
    ports) with `pacs`, started here, as its one destination and `route` sending to it."""
    pacs_host, pacs_port = pacs.start()
    return load_settings(
        None,
        dicom={"host": "127.0.0.1", "port": 0, "receivers": 1},
        storage={"root": work / "store", "min_free_bytes": 0},
        completion={"series_quiet_seconds": quiet_seconds,
                    "study_quiet_seconds": quiet_seconds, "poll_seconds": 0.2},
        workers={"backend": "local", "processes": 1, "poll_seconds": 0.5},
        delivery={"poll_seconds": 0.5, "retry_initial_seconds": 1.0},
        logging={"level": "WARNING"},
        api={"host": "127.0.0.1", "port": 0},
        destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": pacs_host,
                       "port": pacs_port, **destination}],
        routes=[{**route, "destinations": ["pacs"]}],
    )


def _push(source: Path, service: Service, settings: Settings) -> None:
    """Start `service` and push every DICOM file under `source` to it."""
    service.start()
    assert service.address is not None
    files = [f for f in (inspect(p) for p in iter_files([source])) if f is not None]
    report = send_files(files, Peer(settings.dicom.ae_title, *service.address), settings.dicom)
    if not report.ok:
        raise RuntimeError(f"pushing the studies failed: {report.failures[:3]}")


# -- the CT loop ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrueLesion:
    """A lesion the synthetic CT holds (a ``lesions.csv`` row)."""

    volume_mm3: float
    diameter_mm: float
    centroid: tuple[float, float, float]


@dataclass(frozen=True)
class FoundLesion:
    """A lesion the SR reports (a TID 1411 group with Present)."""

    volume_mm3: float | None
    longest_axial_diameter_mm: float | None
    centroid: tuple[float, float, float] | None
    probability: float
    segment_number: int | None


@dataclass
class CTDemoStudy:
    """One pushed CT study, its true lesions and what came back for it."""

    study_instance_uid: str
    truth: list[TrueLesion]
    found: list[FoundLesion] = field(default_factory=list)
    sr_path: Path | None = None
    seg_path: Path | None = None
    #: ``(true index, found index)`` pairs, nearest first (None until the SR arrived).
    matches: list[tuple[int, int]] | None = None

    @property
    def hits(self) -> int | None:
        """True lesions found (None until the SR arrived)."""
        return None if self.matches is None else len(self.matches)

    @property
    def false_positives(self) -> int | None:
        """Found lesions matching no true one (None until the SR arrived)."""
        return None if self.matches is None else len(self.found) - len(self.matches)


@dataclass
class CTDemoResult:
    """The CT demo's studies, where things are, and how long it took."""

    studies: list[CTDemoStudy]
    work: Path
    pacs_folder: Path
    seconds: float
    complete: bool


def match_lesions(truth: list[TrueLesion], found: list[FoundLesion]) -> list[tuple[int, int]]:
    """Pair found lesions with true ones: nearest centroids first, each used once.

    A pair counts when the found centroid lies within the true lesion's radius plus
    :data:`MATCH_MARGIN_MM`; found lesions without a centroid match nothing.

    Parameters
    ----------
    truth : list of TrueLesion
    found : list of FoundLesion

    Returns
    -------
    list of tuple of int
        ``(true index, found index)`` pairs.
    """
    candidates: list[tuple[float, int, int]] = []
    for t, lesion in enumerate(truth):
        for f, seen in enumerate(found):
            if seen.centroid is None:
                continue
            distance = math.dist(lesion.centroid, seen.centroid)
            if distance <= lesion.diameter_mm / 2.0 + MATCH_MARGIN_MM:
                candidates.append((distance, t, f))
    pairs: list[tuple[int, int]] = []
    used_t: set[int] = set()
    used_f: set[int] = set()
    for _, t, f in sorted(candidates):
        if t not in used_t and f not in used_f:
            pairs.append((t, f))
            used_t.add(t)
            used_f.add(f)
    return sorted(pairs)


def _read_truth(source: Path) -> dict[str, list[TrueLesion]]:
    """Per study, the lesions of ``lesions.csv`` (an empty list for a study without)."""
    truth: dict[str, list[TrueLesion]] = {}
    with (source / "labels.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            truth.setdefault(row["StudyInstanceUID"], [])
    lesions = source / "lesions.csv"
    if lesions.is_file():
        with lesions.open(newline="") as fh:
            for row in csv.DictReader(fh):
                truth.setdefault(row["StudyInstanceUID"], []).append(TrueLesion(
                    float(row["volume_mm3"]), float(row["diameter_mm"]),
                    (float(row["centroid_x_mm"]), float(row["centroid_y_mm"]),
                     float(row["centroid_z_mm"]))))
    return truth


def demo_chest_ct(matrix: int = 256) -> ChestCT:
    """The demo's chest CT: ``matrix`` x ``matrix`` slices 2.5 mm apart (about 130 of them),
    1-3 lesions of 8-25 mm: what the bundled model finds, in a volume quick to push."""
    return replace(ChestCT.for_matrix(matrix), slice_spacings=(2.5,), lesions=(1, 3),
                   lesion_diameter_mm=(8.0, 25.0))


def run_ct_demo(work: Path, *, studies: int = 2, seed: int = 7, matrix: int = 256,
                timeout: float = 600.0, quiet_seconds: float = 1.0,
                chest_ct: ChestCT | None = None, model: str = CT_MODEL) -> CTDemoResult:
    """Run the CT loop once and return what the stand-in PACS received against the truth.

    Synthetic chest CT studies (one series each, compressed slices as a scanner's archive
    sends them, half of them with lesions; a single study always has lesions) go to the
    service, whose route sends CT series to the volume model `model` and a SEG and a
    Comprehensive 3D SR (with each lesion's centroid) to the stand-in PACS.

    Parameters
    ----------
    work : Path
        A folder for the synthetic studies, the service's store and the PACS' inbox.
    studies : int
        How many CT studies to push.
    seed : int
        Seed of the synthetic studies.
    matrix : int
        Rows and columns of each slice (:func:`demo_chest_ct`).
    timeout : float
        Seconds to wait for every SR.
    quiet_seconds : float
        Completion quiet period (series and study).
    chest_ct : ChestCT, optional
        The phantom's options instead of :func:`demo_chest_ct` (`matrix` then unused).
    model : str
        The volume model the route names.

    Returns
    -------
    CTDemoResult
    """
    started = time.monotonic()
    source = work / "studies"
    synthesize(source, studies=studies, seed=seed, modality="CT",
               positive_fraction=1.0 if studies == 1 else 0.5, difficulty=0.3,
               namespace="demo", chest_ct=chest_ct or demo_chest_ct(matrix))
    truth = _read_truth(source)
    pacs = StandInPacs(work / "pacs", tune_network=load_settings(None).dicom.tune_network)
    settings = _demo_settings(
        work, pacs, quiet_seconds, destination={"sr_kind": "comprehensive3d"},
        route={"name": "chest-ct", "match": {"Modality": "CT", "BodyPartExamined": "CHEST"},
               "model": model, "send_seg": True})
    results = {uid: CTDemoStudy(uid, lesions) for uid, lesions in truth.items()}
    service = Service(settings)
    try:
        _push(source, service, settings)
        # The SEG is its own outbox row and may follow the SR; it goes with studies that have
        # lesions only.
        _await_results(
            pacs, lambda paths: _collect_ct(paths, results), timeout,
            srs_in=lambda: all(s.sr_path is not None for s in results.values()),
            followers_in=lambda: all(s.seg_path or not s.found for s in results.values()),
            grace=SEG_GRACE_SECONDS)
    finally:
        service.stop()
        pacs.stop()
    ordered = sorted(results.values(), key=lambda s: s.study_instance_uid)
    return CTDemoResult(ordered, work, pacs.folder, time.monotonic() - started,
                        all(s.sr_path is not None for s in ordered))


def _collect_ct(paths: list[Path], results: dict[str, CTDemoStudy]) -> None:
    """Read the SRs and SEGs the stand-in PACS received into `results`."""
    from dicom_ai.reporting import summarize_sr

    for path in paths:
        if path in {s.sr_path for s in results.values()} | {
                s.seg_path for s in results.values()}:
            continue
        ds = dcmread(path, stop_before_pixels=True)
        study = results.get(str(ds.StudyInstanceUID))
        if study is None:
            continue
        if str(ds.SOPClassUID) in SR_CLASSES and study.sr_path is None:
            reported = summarize_sr(ds)
            study.found = [
                FoundLesion(f.volume_mm3, f.longest_axial_diameter_mm,
                            None if f.centroid is None else _xyz(f.centroid), f.probability,
                            f.segment_number)
                for f in reported if f.present and f.segment_number is not None]
            study.matches = match_lesions(study.truth, study.found)
            study.sr_path = path
        elif str(ds.SOPClassUID) == SEG_CLASS and study.seg_path is None:
            study.seg_path = path


def _xyz(values: Any) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return (x, y, z)
