"""``dicom-ai demo``: the whole loop on this machine in about a minute.

It writes a few synthetic chest radiographs (half with nodules), starts a stand-in PACS and the
service on free loopback ports (SQLite, one local worker, the bundled ``chest-nodule`` model, a
route that sends the SR and a heat-map Secondary Capture back), pushes the studies, waits for the
results to arrive at the stand-in PACS, and reports what came back against the ground truth.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from dicom_ai.config import load_settings
from dicom_ai.network.scu import Peer, inspect, iter_files, send_files
from dicom_ai.network.standin import StandInPacs
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize

__all__ = ["DemoResult", "DemoStudy", "run_demo"]

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
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
    from dicom_ai.reporting import summarize_sr

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
    pacs_host, pacs_port = pacs.start()
    settings = load_settings(
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
                       "port": pacs_port}],
        routes=[{"name": "chest-xray", "match": {"Modality": ["CR", "DX"]},
                 "model": "chest-nodule", "destinations": ["pacs"], "send_heatmap": True}],
    )
    service = Service(settings)
    try:
        service.start()
        assert service.address is not None
        files = [f for f in (inspect(p) for p in iter_files([source])) if f is not None]
        report = send_files(files, Peer(settings.dicom.ae_title, *service.address),
                            settings.dicom)
        if not report.ok:
            raise RuntimeError(f"pushing the studies failed: {report.failures[:3]}")
        results = {uid: DemoStudy(uid, t) for uid, t in truth.items()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in pacs.received():
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
            if all(s.sr_path is not None for s in results.values()):
                # A study's heat-map SC is its own outbox row and may follow its SR: give the
                # stragglers a few seconds rather than stopping the service under them.
                # Heat-maps go with present findings only (the route's default heatmap_for).
                if all(s.heatmap_paths or not s.present for s in results.values()):
                    break
                deadline = min(deadline, time.monotonic() + HEATMAP_GRACE_SECONDS)
            time.sleep(0.5)
    finally:
        service.stop()
        pacs.stop()
    ordered = sorted(results.values(), key=lambda s: s.study_instance_uid)
    return DemoResult(ordered, work, pacs.folder, time.monotonic() - started,
                      all(s.sr_path is not None for s in ordered))
