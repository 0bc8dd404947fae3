"""A multi-series MR study over real DICOM: routed per series (issue 21, MR).

dcmtk ``storescu`` pushes a brain-like MR study to a service running in this process: a
localizer, T1, T2 and FLAIR axials (single-frame) and the T1 again as one Legacy Converted
Enhanced MR object. Routes on SeriesDescription and on sequence attributes each get a job over
exactly their series; the localizer is recorded as unrouted with each route's failing keys; the
enhanced object is one instance of one series and is routed on the attributes inside its
functional groups. No worker runs (``workers.processes = 0``): this is about routing, and the
jobs stay pending.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread

from dicom_ai.config import Settings
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import jobs
from storage.db import Database
from storage.models import RoutingDecision
from tests.conftest import need_binary
from tests.integration.test_loop import db_jobs, loop_settings, sqlite_only
from tests.peers import storescu, wait_until
from tests.unit.test_routing_mr import ROUTES, enhanced_from, mr_brain_study


def _decisions(db_url: str, study_uid: str, count: int) -> Callable[[], list[RoutingDecision]]:
    def check() -> list[RoutingDecision]:
        db = Database(db_url)
        try:
            with db.sessions() as session:
                found = jobs.decisions_of_study(session, study_uid)
                session.expunge_all()
        finally:
            db.dispose()
        return found if len(found) >= count else []

    return check


@sqlite_only
def test_mr_study_series_go_to_their_routes_and_the_rest_is_recorded_unrouted(
    tmp_path: Path, db_url: str, start_service: Callable[[Settings], Service],
) -> None:
    need_binary("storescu")
    source = tmp_path / "synth"
    synthesize(source, studies=1, seed=21, modality="MR", compress=False)
    files = mr_brain_study(source, tmp_path / "study")
    files["T1_MF"] = [enhanced_from(files["T1"], tmp_path / "study" / "T1_MF" / "mf.dcm")]
    series = {name: str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
              for name, paths in files.items()}
    study_uid = str(dcmread(files["T1"][0], stop_before_pixels=True).StudyInstanceUID)

    routes = [{"name": name, "match": dict(match), "model": "chest-nodule"}
              for name, match in ROUTES]
    settings = loop_settings(tmp_path, db_url, [], routes=routes, workers={"processes": 0})
    service = start_service(settings)
    assert service.address is not None
    sent = storescu(service.address[1], [p for paths in files.values() for p in paths],
                    calling="MR_SCANNER", extra=["-R"])  # -R: propose the files' own classes
    assert sent.returncode == 0, sent.stderr

    decided = wait_until(_decisions(db_url, study_uid, len(files)), 30,
                         "a routing decision per series")
    by_series = {d.series_instance_uid: d for d in decided}
    assert len(decided) == len(files) == 5  # one decision per series, nothing twice
    assert {name: by_series[uid].route for name, uid in series.items()} == {
        "LOC": None, "T1": "t1", "T2": "t2", "FLAIR": "flair", "T1_MF": "t1"}

    # One job per route, over exactly the series that route matched.
    made = {j.route: j for j in db_jobs(db_url)}
    assert set(made) == {"t1", "t2", "flair"}
    assert sorted(made["t1"].series_instance_uids) == sorted([series["T1"], series["T1_MF"]])
    assert made["t2"].series_instance_uids == [series["T2"]]
    assert made["flair"].series_instance_uids == [series["FLAIR"]]
    assert all(j.study_instance_uid == study_uid and j.state == "pending"
               for j in made.values())
    for name in ("T1", "T2", "FLAIR", "T1_MF"):
        assert by_series[series[name]].job_id == made[by_series[series[name]].route].id

    # The localizer: unrouted, with every route's failing keys.
    localizer = by_series[series["LOC"]]
    assert localizer.job_id is None
    assert localizer.reason.startswith("unrouted (t2: SeriesDescription 'LOCALIZER' ~ '*T2*': no")
    assert "flair: ScanningSequence 'GR' ~ 'IR': no" in localizer.reason
    assert "EchoTime '1.54' ~ '14': no" in localizer.reason
    # The enhanced object matched on attributes inside its functional groups.
    assert "ScanningSequence 'SE' ~ 'SE': yes" in by_series[series["T1_MF"]].reason
    assert "EchoTime '14.000' ~ '14': yes" in by_series[series["T1_MF"]].reason

    # The enhanced object is one instance of one complete series.
    db = Database(db_url)
    try:
        with db.sessions() as session:
            counts = {s.series_instance_uid: s.instance_count
                      for s in jobs.series_of_study(session, study_uid)}
    finally:
        db.dispose()
    assert counts[series["T1_MF"]] == 1
    assert counts[series["T1"]] == len(files["T1"])
    assert counts[series["LOC"]] == 3
