"""Heat-map results at a real PACS (dcmtk storescp): only for positive findings by default, with
the decision in the banner, and the SR locating each positive by a region that validates.

A real service (bundled chest-nodule model in a worker process) gets four synthetic CR studies,
two with nodules, from dcmtk storescu, with a route that asks for heat-maps (``send_heatmap``)
and leaves ``heatmap_for`` at its default.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_ai.config import Settings
from dicom_ai.reporting import summarize_sr
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from tests.conftest import need_binary
from tests.integration.test_loop import (
    arrived,
    assert_iod_valid,
    assert_valid_sr,
    dicom_files,
    loop_settings,
    push,
    received,
    truth_of,
)
from tests.peers import StoreSCP, wait_until

sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def cr_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four easy synthetic CR studies, two with nodules (uncompressed, for storescu)."""
    out = tmp_path_factory.mktemp("cr")
    synthesize(out, studies=4, seed=7, modality="CR", positive_fraction=0.5, difficulty=0.3,
               compress=False)
    return out


@sqlite_only
def test_absent_findings_get_no_heatmap_and_positives_a_banner_and_a_region(
    tmp_path: Path, db_url: str, cr_studies: Path, start_service: Callable[[Settings], Service]
) -> None:
    need_binary("storescu")
    truth = truth_of(cr_studies)
    positives = {study for study, present in truth.items() if present}
    assert len(positives) == 2
    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(
            tmp_path, db_url,
            [{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
            routes=[{"name": "chest", "match": {"Modality": ["CR"]}, "model": "chest-nodule",
                     "destinations": ["pacs"], "send_heatmap": True}])
        assert settings.routes[0].heatmap_for == "positive"
        service = start_service(settings)
        push(service, dicom_files(cr_studies))
        wait_until(arrived(scp.folder, 4, 2), 120, "4 SRs and 2 SCs at storescp")
        time.sleep(2.0)  # the outbox sends an SC right after its SR: nothing more may follow
        got = received(scp.folder)
    counts = {kind: len(paths) for kind, paths in got.items()}
    assert counts["sr"] == 4, counts
    assert counts["sc"] == 2, counts

    masks = {study: cr_studies / mask for study, mask in _masks(cr_studies)}
    for path in got["sc"]:
        assert_iod_valid(path)
        sc = dcmread(path)
        assert str(sc.StudyInstanceUID) in positives, "a heat-map of an absent finding was sent"
        assert sc.BurnedInAnnotation == "YES"
        text = str(sc.ImageComments)
        assert "chest-nodule 1.0.0" in text, text
        assert "Nodule PRESENT p=" in text, text
        assert "NOT FOR DIAGNOSTIC USE" in text
    for path in got["sr"]:
        assert_valid_sr(path)
        ds = dcmread(path)
        study = str(ds.StudyInstanceUID)
        (finding,) = summarize_sr(ds)
        assert finding.present == (study in positives)
        assert finding.location_kind == ("bbox" if finding.present else None)
        if finding.present:
            (top, left, bottom, right) = _box_of(ds)
            mask = np.load(masks[study]) > 0
            assert mask[top:bottom, left:right].any(), "the SR's region misses the lesion"


def _masks(folder: Path) -> list[tuple[str, str]]:
    with (folder / "labels.csv").open() as fh:
        return [(row["StudyInstanceUID"], row["mask_path"]) for row in csv.DictReader(fh)
                if row["mask_path"]]


def _scoord(items: Sequence[Dataset]) -> Dataset | None:
    for item in items:
        if item.ValueType == "SCOORD":
            return item
        found = _scoord(item.get("ContentSequence", []))
        if found is not None:
            return found
    return None


def _box_of(ds: Dataset) -> tuple[int, int, int, int]:
    """The closed POLYLINE's bounding box (rows, columns) from the SR's SCOORD (column, row)."""
    scoord = _scoord(ds.ContentSequence)
    assert scoord is not None
    assert scoord.GraphicType == "POLYLINE"
    points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
    cols, rows = points[:, 0], points[:, 1]
    return (round(rows.min()), round(cols.min()), round(rows.max()), round(cols.max()))
