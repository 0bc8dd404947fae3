"""Ingest throughput: dicom-ai vs dcmtk ``storescp`` vs Orthanc, in one run, on the same data.

The same CT 512x512 instances are pushed by dcmtk ``storescu`` (TCP_NODELAY=1) over one
association, and by 4 parallel senders (the files split in four), to each receiver in turn;
each round uses fresh UIDs, and the best of ``--rounds`` counts. Durable receivers: dicom-ai
(fsync of file and directory, index commit before success) and Orthanc (fdatasync per file).
dcmtk storescp does not fsync: it is the ceiling, not a peer.

Run: ``.venv/bin/python -m benchmarks.ingest [--instances 200] [--rounds 3] [--out FILE]``.
Prints a JSON document and a table (instances/s and ratios to Orthanc and storescp).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from tests.peers import ENV, DicomAIServe, Orthanc, StoreSCP, binary, free_port, make_ct_series


def push(port: int, aet: str, files: list[Path], senders: int) -> float:
    """Send `files` with `senders` parallel storescu processes; return elapsed seconds."""
    chunks = [files[i::senders] for i in range(senders)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen([binary("storescu") or "storescu", "-aec", aet, "127.0.0.1", str(port),
                          *map(str, chunk)], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
        for chunk in chunks
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - started


def fresh_copy(template: list[Path], work: Path, tag: str) -> list[Path]:
    """Copies of the template files with new UIDs, so no receiver sees duplicates."""
    from tests.peers import retag

    return retag(template, work / tag)


@contextmanager
def dicom_ai(work: Path, receivers: int) -> Iterator[tuple[int, str]]:
    """A dicom-ai receiver with a fresh store."""
    port = free_port()
    root = work / f"dicom-ai-{receivers}-{time.monotonic_ns()}"
    root.mkdir(parents=True)
    config = root / "config.toml"
    config.write_text(
        f'[dicom]\nhost = "127.0.0.1"\nport = {port}\nreceivers = {receivers}\n'
        f'[storage]\nroot = "{root / "store"}"\nmin_free_bytes = 0\n'
        '[logging]\nlevel = "INFO"\n'
    )
    server = DicomAIServe(config, port)
    server.start()
    # C-ECHO answers while the rest of the service (the HTTP API's imports, the pool) is still
    # starting; measure the service once started, not its start-up.
    server.wait_for_log("ready in")
    if receivers > 1:
        server.wait_for_log(f"all {receivers} receivers ready")
    try:
        yield port, "DICOM_AI"
    finally:
        server.stop()


@contextmanager
def orthanc(work: Path) -> Iterator[tuple[int, str]]:
    """Orthanc with a fresh storage folder."""
    with Orthanc(work / f"orthanc-{time.monotonic_ns()}") as peer:
        yield peer.port, peer.aet


@contextmanager
def storescp(work: Path, fork: bool) -> Iterator[tuple[int, str]]:
    """dcmtk storescp with a fresh output folder."""
    with StoreSCP(work / f"storescp-{time.monotonic_ns()}", fork=fork) as peer:
        yield peer.port, "STORESCP"


def main() -> None:
    """Run the benchmark and print JSON plus a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--receivers", type=int, default=4, help="dicom-ai receivers in the "
                        "pooled configuration")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dicom-ai-bench-") as tmp:
        work = Path(tmp)
        template = make_ct_series(work / "template", args.instances)
        receivers: dict[str, Callable[[], AbstractContextManager[tuple[int, str]]]] = {
            "dicom-ai (1 process)": lambda: dicom_ai(work, 1),
            f"dicom-ai ({args.receivers} receivers)": lambda: dicom_ai(work, args.receivers),
            "orthanc": lambda: orthanc(work),
            "storescp": lambda: storescp(work, fork=True),
        }
        results: dict[str, dict[str, float]] = {name: {} for name in receivers}
        for rnd in range(args.rounds):
            for senders in (1, 4):
                for name, factory in receivers.items():
                    files = fresh_copy(template, work, f"r{rnd}-{senders}-{name}")
                    with factory() as (port, aet):
                        elapsed = push(port, aet, files, senders)
                    rate = len(files) / elapsed
                    key = f"{senders}_sender" + ("s" if senders > 1 else "")
                    results[name][key] = max(results[name].get(key, 0.0), rate)
                    shutil.rmtree(files[0].parent)

        startup = {f"receivers={n}": min(startup_seconds(work, n) for _ in range(3))
                   for n in (1, args.receivers)}
        startup["receivers=1, restart"] = min(startup_seconds(work, 1, restart=True)
                                              for _ in range(3))

    report: dict[str, Any] = {
        "benchmark": "ingest",
        "instances": args.instances,
        "rounds": args.rounds,
        "image": "CT 512x512 16-bit, Explicit VR Little Endian",
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "instances_per_second": results,
        "serve_start_to_first_echo_seconds": startup,
        "ratios": {
            name: {
                key: {
                    "vs_orthanc": round(rates[key] / results["orthanc"][key], 2),
                    "vs_storescp": round(rates[key] / results["storescp"][key], 2),
                }
                for key in rates
            }
            for name, rates in results.items()
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    print()
    print("| receiver | 1 sender (inst/s) | vs Orthanc | vs storescp | "
          "4 senders (inst/s) | vs Orthanc | vs storescp |")
    print("|---|---|---|---|---|---|---|")
    for name, rates in results.items():
        r = report["ratios"][name]
        print(f"| {name} | {rates['1_sender']:.0f} | {r['1_sender']['vs_orthanc']:.2f}x | "
              f"{r['1_sender']['vs_storescp']:.2f}x | {rates['4_senders']:.0f} | "
              f"{r['4_senders']['vs_orthanc']:.2f}x | {r['4_senders']['vs_storescp']:.2f}x |")
    print()
    for name, seconds in startup.items():
        print(f"serve start to first C-ECHO ({name}): {seconds:.2f} s")


def startup_seconds(work: Path, receivers: int, restart: bool = False) -> float:
    """Seconds from launching `dicom-ai serve` to its first C-ECHO answer.

    A fresh store, or with `restart` the second start of a store (its index already migrated).
    """
    port = free_port()
    root = work / f"startup-{time.monotonic_ns()}"
    root.mkdir()
    config = root / "config.toml"
    config.write_text(f'[dicom]\nhost = "127.0.0.1"\nport = {port}\nreceivers = {receivers}\n'
                      f'[storage]\nroot = "{root / "store"}"\nmin_free_bytes = 0\n')
    if restart:
        first = DicomAIServe(config, port)
        first.start()
        first.wait_for_log("ready in")
        first.stop()
    server = DicomAIServe(config, port)
    try:
        return server.start()
    finally:
        server.stop()


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
