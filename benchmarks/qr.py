"""Batch retrieval rate: dicom-ai's batch (C-MOVE into its receiver, or C-GET) vs dcmtk alone.

An Orthanc archive on loopback holds ``--studies`` CT studies of ``--slices`` 256x256 slices.
Each round retrieves all of them, one study per retrieve request, one at a time unless the name
says ``xN`` (N studies in flight):

* ``movescu``: dcmtk ``movescu`` with its own storage SCP as the move destination (writes files,
  no fsync, no index): the reference;
* ``dicom-ai move``: a ``dicom-ai batch`` (C-FIND, then C-MOVE of each study) into a running
  dicom-ai receiver (fsync, index) with a fresh store;
* ``getscu`` and ``dicom-ai get``: the same with C-GET;
* ``dicom-ai get xN``: the batch with ``max_associations = N`` (``--in-flight``), each study on
  its own C-GET association; ``getscu xN``: N ``getscu`` processes at once, for comparison.

The rate is instances/s from the first retrieve request to the last instance stored (dicom-ai's
C-FIND time excluded: the dcmtk runs are given the study UIDs). The best of ``--rounds`` counts.
Run: ``.venv/bin/python -m benchmarks.qr [--studies 8] [--slices 25] [--rounds 3] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dicom_ai.batch.run import BatchQuery, BatchRunner
from dicom_ai.config import load_settings
from dicom_ai.service import Service
from storage import batches
from storage.db import Database
from tests.peers import ENV, Orthanc, binary, free_port, make_ct_series, storescu


def dcmtk_retrieve(tool: str, orthanc: Orthanc, uids: list[str], folder: Path,
                   port: int, in_flight: int = 1) -> float:
    """Seconds for dcmtk movescu/getscu to retrieve each study into `folder` (`in_flight`
    processes at once)."""
    folder.mkdir(parents=True)

    def one(uid: str) -> None:
        args = [binary(tool) or tool, "-S", "-aec", orthanc.aet, "-od", str(folder),
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}"]
        if tool == "movescu":
            args += ["-aet", "MOVESCU", "-aem", "MOVESCU", "--port", str(port)]
        result = subprocess.run([*args, "127.0.0.1", str(orthanc.port)], env=ENV,
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stderr[-500:]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        list(pool.map(one, uids))
    return time.perf_counter() - started


def dicom_ai_retrieve(retrieve: str, orthanc: Orthanc, root: Path, port: int,
                      in_flight: int = 1) -> tuple[float, int, float]:
    """Seconds for a dicom-ai batch to retrieve every study (`in_flight` at once), instances
    stored, and this process's CPU seconds (user + system) meanwhile."""
    settings = load_settings(
        None,
        dicom={"host": "127.0.0.1", "port": port, "receivers": 1},
        storage={"root": root, "min_free_bytes": 0},
        logging={"level": "WARNING"},
        api={"enabled": False},
        sources=[{"name": "archive", "ae_title": orthanc.aet, "host": "127.0.0.1",
                  "port": orthanc.port, "retrieve": retrieve,
                  "max_associations": in_flight}],
    )
    service = Service(settings)
    service.start()
    db = Database(settings.storage.url)
    try:
        runner = BatchRunner(settings, db, "archive")
        batch_id = runner.create(BatchQuery(study_date="19000101-29991231"))
        # Find first (not timed, as the dcmtk runs are given the UIDs), then retrieve.
        found = runner.find(BatchQuery(study_date="19000101-29991231"))
        with db.write_session() as session:
            from datetime import UTC, datetime

            batches.add_found(session, batch_id, found)
            batches.set_state(session, batch_id, "retrieving", datetime.now(UTC), found=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        counts = runner.run(batch_id, wait_processing=False)
        elapsed = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        if counts.failed or counts.retrieved != len(found):
            raise RuntimeError(f"dicom-ai batch failed: {counts}")
        with db.sessions() as session:
            stored = sum(r.retrieved_instances for r in batches.studies(session, batch_id))
        return elapsed, stored, cpu_seconds
    finally:
        db.dispose()
        service.stop()


def main() -> None:
    """Run the benchmark and print JSON plus a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--slices", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=4,
                        help="studies retrieved at once in the xN runs")
    parser.add_argument("--only", default=None,
                        help="comma-separated retrievals to run (default: all), e.g. "
                             "'getscu,dicom-ai get,dicom-ai get x4'")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicom-ai-qr-"))
    try:
        files: list[Path] = []
        uids: list[str] = []
        for i in range(args.studies):
            series = make_ct_series(work / "data" / f"s{i}", args.slices, size=256, seed=i)
            files += series
            from pydicom import dcmread

            uids.append(str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID))
        instances = len(files)
        ours, movescu_port = free_port(), free_port()
        with Orthanc(work / "orthanc", modalities={
                "dicomai": ("DICOM_AI", "127.0.0.1", ours),
                "movescu": ("MOVESCU", "127.0.0.1", movescu_port),
                # Orthanc answers C-GET only from known modalities.
                "getscu": ("GETSCU", "127.0.0.1", free_port())}) as orthanc:
            sent = storescu(orthanc.port, files, aet=orthanc.aet)
            if sent.returncode != 0:
                raise RuntimeError(sent.stderr)
            n = args.in_flight
            names: tuple[str, ...] = ("movescu", "dicom-ai move", "getscu", "dicom-ai get",
                                      f"dicom-ai get x{n}", f"getscu x{n}")
            if args.only:
                wanted = {w.strip() for w in args.only.split(",")}
                names = tuple(k for k in names if k in wanted)
            runs: dict[str, list[float]] = {k: [] for k in names}
            cpu: dict[str, list[float]] = {k: [] for k in names}
            for r in range(args.rounds):
                for name in runs:
                    target = work / f"round{r}-{name.replace(' ', '-')}"
                    in_flight = n if name.endswith(f" x{n}") else 1
                    if name.startswith(("movescu", "getscu")):
                        seconds = dcmtk_retrieve(name.split()[0], orthanc, uids, target,
                                                 movescu_port, in_flight)
                        got = sum(1 for p in target.iterdir() if p.is_file())
                    else:
                        seconds, got, cpu_seconds = dicom_ai_retrieve(
                            name.split()[1], orthanc, target, ours, in_flight)
                        cpu[name].append(1000 * cpu_seconds / max(got, 1))
                    if got != instances:
                        raise RuntimeError(f"{name} stored {got} of {instances} instances")
                    runs[name].append(instances / seconds)
                    shutil.rmtree(target, ignore_errors=True)
        best = {name: max(rates) for name, rates in runs.items()}
        result: dict[str, Any] = {
            "benchmark": "qr",
            "machine": platform.platform(),
            "studies": args.studies, "instances": instances, "rounds": args.rounds,
            "in_flight": n,
            "instances_per_second": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
            "best": {k: round(v, 1) for k, v in best.items()},
        }
        ratios = {"ratio_move": ("dicom-ai move", "movescu"),
                  "ratio_get": ("dicom-ai get", "getscu"),
                  # The target: the batch as run (N in flight) against getscu alone.
                  f"ratio_get_x{n}": (f"dicom-ai get x{n}", "getscu"),
                  f"ratio_get_x{n}_vs_getscu_x{n}": (f"dicom-ai get x{n}", f"getscu x{n}")}
        for key, (ours_name, theirs) in ratios.items():
            if ours_name in best and theirs in best:
                result[key] = round(best[ours_name] / best[theirs], 3)
        # CPU of this process (the batch: C-GET SCU, ingest, index) per instance stored.
        result["cpu_ms_per_instance"] = {k: [round(v, 2) for v in vs]
                                         for k, vs in cpu.items() if vs}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(f"\n{'retrieval':<18}{'inst/s (best)':>14}{'vs getscu/movescu':>19}")
    for name in runs:
        ref = best.get("movescu" if "move" in name else "getscu")
        ratio = f"{best[name] / ref:>19.2f}" if ref else f"{'-':>19}"
        print(f"{name:<18}{best[name]:>14.1f}{ratio}")


if __name__ == "__main__":
    main()
