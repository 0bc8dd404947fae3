"""Build one throwaway SR and heat-map Secondary Capture when a worker starts.

The first SR a process builds costs about 0.8 s more than the next ones (highdicom and pydicom
load their templates, code dictionaries and writers on first use); the benchmark measured the
first study after a worker start at 1.45 s end to end against about 0.15 s for the next. Doing
it at start, on a synthetic phantom (no patient data), moves that cost out of the first job.
Nothing is written to the store or the index.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_ai import __version__
from dicom_ai.config import SRKind
from dicom_ai.inference.spec import FINDING_SITE_LUNG, NODULE
from dicom_ai.values import Finding, HeatMap, Location, ModelRun

LOGGER = logging.getLogger(__name__)

__all__ = ["warm_up_reports"]


def warm_up_reports(sr_kinds: Iterable[SRKind] = ("comprehensive",)) -> float:
    """Build (and discard) an SR of each kind and a heat-map SC for one synthetic image.

    Parameters
    ----------
    sr_kinds : iterable of {"comprehensive", "comprehensive3d"}
        The SR kinds the destinations want.

    Returns
    -------
    float
        Seconds it took.
    """
    from dicom_ai.reporting import build_heatmap_capture, build_sr
    from dicom_ai.training.synth import synthesize

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dicom-ai-warmup-") as tmp:
        synthesize(Path(tmp), studies=1, seed=1, modality="CR", positive_fraction=1.0,
                   compress=False)
        source = dcmread(next(Path(tmp).glob("*/*/*.dcm")))
    uid = str(source.SOPInstanceUID)
    rows, columns = int(source.Rows), int(source.Columns)
    finding = Finding(label="nodule", finding=NODULE, finding_site=FINDING_SITE_LUNG,
                      probability=0.9, threshold=0.5, present=True, sop_instance_uids=(uid,),
                      tracking_uid=str(generate_uid()),
                      location=Location(kind="point", sop_instance_uid=uid,
                                        point=(rows / 2, columns / 2)))
    heat = HeatMap(sop_instance_uid=uid, values=np.zeros((rows, columns), np.float32),
                   display=np.zeros((rows, columns), np.float32))
    run = ModelRun(model_name="warm-up", model_version="0", task="classification",
                   study_instance_uid=str(source.StudyInstanceUID),
                   series_instance_uid=str(source.SeriesInstanceUID), findings=[finding],
                   heatmaps=[heat], parameters={})
    built = [build_heatmap_capture(heat, source, run, series_instance_uid=str(generate_uid()),
                                   sop_instance_uid=str(generate_uid()), instance_number=1,
                                   software_version=__version__)]
    for kind in sorted(set(sr_kinds)):
        built.append(build_sr(run, [source], kind=kind, series_instance_uid=str(generate_uid()),
                              sop_instance_uid=str(generate_uid()),
                              software_version=__version__))
    for ds in built:  # the writer's first use too
        ds.save_as(io.BytesIO(), enforce_file_format=True)
    seconds = time.perf_counter() - started
    LOGGER.info("report builders warmed up in %.2f s", seconds)
    return seconds
