"""Ingest throughput at steady state: dicom-ai vs Orthanc vs dcmtk ``storescp``, in one run.

What a user sees is a receiver that has been running: its store and index already hold earlier
studies. So each receiver is started once and kept for the whole measurement (issue 22):

- a warm-up round first (not timed), then ``--rounds`` timed rounds;
- each round pushes never-seen instances (fresh Study/Series/SOP Instance UIDs, the same copy
  to every receiver, none of which has seen it) with dcmtk ``storescu`` (TCP_NODELAY=1), over
  1 association and over 4 parallel senders (``--senders``; the files split between them);
- ``sync`` after writing each round's copy and before each timed push, so the receiver timed
  does not pay for flushing the generator's files or the previous receiver's;
- the receivers' order rotates from round to round (none is always timed first);
- the best and the median of the rounds are reported, with the CPU time (user + system, from
  ``/proc/<pid>/stat``, summed over the receiver's whole process tree: dicom-ai's receiver
  processes, storescp's forked children) per instance of each timed push.

Durable receivers: dicom-ai (file and directory fsync, index commit before success; ``[dicom]
receivers``, local workers off) and Orthanc (fdatasync per file, its default). dcmtk
``storescp --fork`` does not fsync: the ceiling, not a peer.

The old figure, a fresh receiver started for every push (no warm-up; now with the same
``sync``), is kept as a second line (``--fresh``, on by default): a fresh Orthanc is much
slower than a running one. ``--startup`` (on by default) also times ``serve`` start-up.

``--profile DIR`` then samples dicom-ai's process tree with ``py-spy`` (in the ``dev`` extra,
for measuring only) while it receives ``--profile-rounds`` more
rounds with the largest sender count, and writes the raw stacks and a table of where the CPU
goes per instance (:mod:`benchmarks.ingest_profile`).

Run: ``.venv/bin/python -m benchmarks.ingest [--instances 200] [--rounds 3] [--senders 1 4]
[--receivers 4] [--no-fresh] [--no-startup] [--profile DIR] [--out FILE]``. Prints a JSON
document and tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.peers import (
    ENV,
    DicomAIServe,
    Orthanc,
    StoreSCP,
    binary,
    free_port,
    make_ct_series,
    process_tree,
    retag,
)

DICOM_AI = "dicom-ai"
ORTHANC = "orthanc"
STORESCP = "storescp"
RECEIVERS = (DICOM_AI, ORTHANC, STORESCP)
_TICK = os.sysconf("SC_CLK_TCK")


# -- measuring ---------------------------------------------------------------------------------
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


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid` and of the children it has reaped (``/proc``).

    (0, 0) if the process is gone. A zombie child still reports its own times until reaped.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    # Fields after the command name (which may hold spaces): state is field 3, so utime (14),
    # stime (15), cutime (16), cstime (17) are at 11..14 here.
    utime, stime, cutime, cstime = map(int, stat.rsplit(")", 1)[1].split()[11:15])
    return (utime + cutime) / _TICK, (stime + cstime) / _TICK


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid`'s whole tree (live, zombie and reaped descendants)."""
    times = [process_cpu_seconds(p) for p in process_tree(pid)]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children (the storescu senders)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Sample:
    """One timed push to one receiver."""

    rate: float  # instances per second
    cpu_ms: float  # receiver CPU per instance (its process tree), user + system
    sys_ms: float  # of which system (kernel) time
    sender_cpu_ms: float  # storescu CPU per instance


def timed_push(pid: int, port: int, aet: str, files: list[Path], senders: int) -> Sample:
    """`sync`, then push `files` and measure rate and CPU per instance."""
    os.sync()
    (user, system), senders_cpu = tree_cpu_seconds(pid), children_cpu_seconds()
    elapsed = push(port, aet, files, senders)
    # A forked storescp child may still be closing its last file when storescu exits.
    time.sleep(0.2)
    user_after, system_after = tree_cpu_seconds(pid)
    user, system = user_after - user, system_after - system
    senders_cpu = children_cpu_seconds() - senders_cpu
    n = len(files)
    return Sample(n / elapsed, 1000 * (user + system) / n, 1000 * system / n,
                  1000 * senders_cpu / n)


@dataclass
class Series:
    """The samples of one receiver with one sender count, over the rounds."""

    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Best and median rate, median CPU per instance, and every round's figures."""
        rates = [s.rate for s in self.samples]
        cpu = [s.cpu_ms for s in self.samples]
        return {
            "best": round(max(rates), 1),
            "median": round(statistics.median(rates), 1),
            "cpu_ms_per_instance": round(statistics.median(cpu), 2),
            "system_cpu_ms_per_instance": round(
                statistics.median(s.sys_ms for s in self.samples), 2),
            "sender_cpu_ms_per_instance": round(
                statistics.median(s.sender_cpu_ms for s in self.samples), 2),
            "rounds": [{"rate": round(s.rate, 1), "cpu_ms": round(s.cpu_ms, 2),
                        "system_cpu_ms": round(s.sys_ms, 2)}
                       for s in self.samples],
        }


# -- receivers ---------------------------------------------------------------------------------
@dataclass
class Running:
    """A receiver that listens: where to push, and the root of its process tree."""

    port: int
    aet: str
    pid: int


@contextmanager
def dicom_ai(work: Path, receivers: int) -> Iterator[Running]:
    """``dicom-ai serve`` with a fresh store, `receivers` receiver processes, workers off."""
    port = free_port()
    root = work / f"dicom-ai-{receivers}-{time.monotonic_ns()}"
    root.mkdir(parents=True)
    config = root / "config.toml"
    config.write_text(
        f'[dicom]\nhost = "127.0.0.1"\nport = {port}\nreceivers = {receivers}\n'
        f'[storage]\nroot = "{root / "store"}"\nmin_free_bytes = 0\n'
        '[workers]\nprocesses = 0\n'
        '[logging]\nlevel = "INFO"\n'
    )
    server = DicomAIServe(config, port)
    server.start()
    try:
        # C-ECHO answers while the rest of the service (the HTTP API's imports, the other
        # receivers) is still starting; measure the service once started, not its start-up.
        server.wait_for_log("ready in")
        if receivers > 1:
            server.wait_for_log(f"all {receivers} receivers ready")
        assert server.process is not None
        yield Running(port, "DICOM_AI", server.process.pid)
    finally:
        server.stop()


@contextmanager
def orthanc(work: Path) -> Iterator[Running]:
    """Orthanc with a fresh storage folder."""
    with Orthanc(work / f"orthanc-{time.monotonic_ns()}") as peer:
        assert peer.process is not None
        yield Running(peer.port, peer.aet, peer.process.pid)


@contextmanager
def storescp(work: Path) -> Iterator[Running]:
    """dcmtk ``storescp --fork`` with a fresh output folder."""
    with StoreSCP(work / f"storescp-{time.monotonic_ns()}", fork=True) as peer:
        assert peer.process is not None
        yield Running(peer.port, "STORESCP", peer.process.pid)


Factory = Callable[[], AbstractContextManager[Running]]


def factories(work: Path, receivers: int) -> dict[str, Factory]:
    """How to start each receiver, by name."""
    return {
        DICOM_AI: lambda: dicom_ai(work, receivers),
        ORTHANC: lambda: orthanc(work),
        STORESCP: lambda: storescp(work),
    }


def fresh_copy(template: list[Path], work: Path, tag: str) -> list[Path]:
    """Copies of the template with new UIDs, flushed to disk (no receiver has seen them)."""
    files = retag(template, work / "copies" / tag)
    os.sync()
    return files


def rotated(names: list[str], offset: int) -> list[str]:
    """`names` starting at `offset`: no receiver is always timed first."""
    k = offset % len(names)
    return names[k:] + names[:k]


# -- the two methods ---------------------------------------------------------------------------
def steady(template: list[Path], work: Path, args: argparse.Namespace,
           profile: Callable[[Running], dict[str, Any]] | None = None
           ) -> tuple[dict[str, dict[int, Series]], dict[str, float], dict[str, Any] | None]:
    """Persistent receivers: warm-up, then timed rounds; optionally profile dicom-ai after.

    Returns the series by receiver and sender count, each receiver's idle CPU (ms per second
    of wall time, measured once warm) and the profile's summary.
    """
    names = list(RECEIVERS)
    results: dict[str, dict[int, Series]] = {n: {s: Series() for s in args.senders}
                                             for n in names}
    with ExitStack() as stack:
        running = {name: stack.enter_context(factory())
                   for name, factory in factories(work, args.receivers).items()}
        for rnd in range(-1, args.rounds):  # round -1: warm-up, not timed
            for senders in args.senders:
                files = fresh_copy(template, work, f"steady-r{rnd}-s{senders}")
                for name in rotated(names, rnd):
                    peer = running[name]
                    sample = timed_push(peer.pid, peer.port, peer.aet, files, senders)
                    if rnd >= 0:
                        results[name][senders].samples.append(sample)
                    _progress(f"steady round {rnd} {senders} sender(s) {name}: "
                              f"{sample.rate:.0f}/s, {sample.cpu_ms:.2f} ms CPU/instance")
                shutil.rmtree(files[0].parent)
        idle = {name: idle_cpu(peer.pid) for name, peer in running.items()}
        summary = profile(running[DICOM_AI]) if profile is not None else None
    return results, idle, summary


def fresh(template: list[Path], work: Path, args: argparse.Namespace
          ) -> dict[str, dict[int, Series]]:
    """The old method: a receiver started afresh for every push (no warm-up)."""
    names = list(RECEIVERS)
    results: dict[str, dict[int, Series]] = {n: {s: Series() for s in args.senders}
                                             for n in names}
    start = factories(work, args.receivers)
    for rnd in range(args.rounds):
        for senders in args.senders:
            files = fresh_copy(template, work, f"fresh-r{rnd}-s{senders}")
            for name in rotated(names, rnd):
                with start[name]() as peer:
                    sample = timed_push(peer.pid, peer.port, peer.aet, files, senders)
                results[name][senders].samples.append(sample)
                _progress(f"fresh round {rnd} {senders} sender(s) {name}: {sample.rate:.0f}/s")
            shutil.rmtree(files[0].parent)
    return results


def idle_cpu(pid: int, seconds: float = 2.0) -> float:
    """CPU milliseconds per second a receiver's tree spends with nothing to receive."""
    before = sum(tree_cpu_seconds(pid))
    time.sleep(seconds)
    return round(1000 * (sum(tree_cpu_seconds(pid)) - before) / seconds, 1)


def profiler(template: list[Path], work: Path, args: argparse.Namespace
             ) -> Callable[[Running], dict[str, Any]]:
    """Sample dicom-ai's tree with py-spy during pushes with the most senders; summarise.

    Two samplings of ``--profile-rounds`` pushes each, both ``--nonblocking`` (the receiver is
    never paused): ``gil``, the thread holding each process's GIL (Python's own time; it also
    counts a holder the kernel has preempted, e.g. right after it woke another thread), and
    ``on_cpu``, every thread the kernel shows running or runnable (also the time outside the
    GIL: socket and file syscalls, fsync, SQLite's C engine; on a loaded machine it over-counts
    threads waiting for a core). Both over-count on a busy machine, so only their shares are
    used, applied to the CPU time measured in /proc (:func:`benchmarks.ingest_profile.breakdown`).
    """
    from benchmarks.ingest_profile import compress, summarize

    def sample(peer: Running, mode: str, extra: list[str]) -> dict[str, Any]:
        out: Path = args.profile
        raw = out / f"dicom-ai.{mode}.raw.txt"
        senders = max(args.senders)
        batches = [fresh_copy(template, work, f"profile-{mode}-{i}")
                   for i in range(args.profile_rounds)]
        proc = subprocess.Popen(
            [binary_in_venv("py-spy"), "record", "--pid", str(peer.pid), "--subprocesses",
             "--nonblocking", *extra, "--format", "raw", "--rate", str(args.profile_rate),
             "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.5)  # py-spy finds every process of the tree
        samples = [timed_push(peer.pid, peer.port, peer.aet, files, senders)
                   for files in batches]
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        _, err = proc.communicate(timeout=60)
        if not raw.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode()[-500:]}")
        for files in batches:
            shutil.rmtree(files[0].parent)
        instances = sum(len(b) for b in batches)
        summary = summarize(raw.read_text(), instances, args.profile_rate)
        summary.update({
            "senders": senders,
            "instances": instances,
            "rate_while_sampled": round(statistics.median(s.rate for s in samples), 1),
            "cpu_ms_per_instance_while_sampled": round(
                statistics.median(s.cpu_ms for s in samples), 2),
            "raw_stacks": str(compress(raw)),
        })
        _progress(f"profile {mode}: {summary['samples']} samples, "
                  f"{summary['rate_while_sampled']:.0f}/s while sampled")
        return summary

    def run(peer: Running) -> dict[str, Any]:
        args.profile.mkdir(parents=True, exist_ok=True)
        return {"senders": max(args.senders),
                "gil": sample(peer, "gil", ["--gil"]),
                "on_cpu": sample(peer, "on_cpu", [])}

    return run


def binary_in_venv(name: str) -> str:
    """An executable installed next to this interpreter (py-spy), else on PATH."""
    import sys

    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.is_file() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: make .venv/.installed (the dev extra has it)")
    return found


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


# -- report ------------------------------------------------------------------------------------
def _progress(text: str) -> None:
    print(f"# {text}", flush=True)


def summarize_method(results: dict[str, dict[int, Series]]) -> dict[str, Any]:
    """Rates and CPU by receiver and sender count, and the ratios of dicom-ai to the others."""
    table = {name: {str(s): series.summary() for s, series in by.items()}
             for name, by in results.items()}
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for other in (ORTHANC, STORESCP):
        ratios[f"{DICOM_AI} / {other}"] = {
            s: {stat: round(table[DICOM_AI][s][stat] / table[other][s][stat], 2)
                for stat in ("best", "median")}
            for s in table[DICOM_AI]
        }
    return {"receivers": table, "ratios": ratios}


def markdown(method: dict[str, Any], senders: list[int]) -> list[str]:
    """One row per receiver: best and median rate, ratios, CPU ms per instance, per sender count."""
    head = "| receiver |"
    rule = "|---|"
    for s in senders:
        label = f"{s} sender{'s' if s > 1 else ''}"
        head += (f" {label}: best (median) inst/s | median vs Orthanc | median vs storescp |"
                 f" CPU ms/inst |")
        rule += "---|---|---|---|"
    lines = [head, rule]
    for name, by in method["receivers"].items():
        row = f"| {name}{' (no fsync)' if name == STORESCP else ''} |"
        for key in map(str, senders):
            stats = by[key]
            vs_o = stats["median"] / method["receivers"][ORTHANC][key]["median"]
            vs_s = stats["median"] / method["receivers"][STORESCP][key]["median"]
            row += (f" {stats['best']:.0f} ({stats['median']:.0f}) | {vs_o:.2f}x | {vs_s:.2f}x |"
                    f" {stats['cpu_ms_per_instance']:.2f} |")
        lines.append(row)
    return lines


def main() -> None:
    """Run the benchmark and print JSON plus tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, default=200, help="instances per push")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4],
                        help="parallel storescu processes per push (each count is measured)")
    parser.add_argument("--receivers", type=int, default=4,
                        help="dicom-ai's receiver processes ([dicom] receivers)")
    parser.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure a fresh receiver per push (the old method)")
    parser.add_argument("--startup", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure serve start to first C-ECHO")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample dicom-ai with py-spy after the steady rounds; write here")
    parser.add_argument("--profile-rounds", type=int, default=3,
                        help="pushes sampled in each of the two py-spy modes")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dicom-ai-bench-") as tmp:
        work = Path(tmp)
        template = make_ct_series(work / "template", args.instances)
        prof = profiler(template, work, args) if args.profile else None
        steady_results, idle, profile_summary = steady(template, work, args, prof)
        fresh_results = fresh(template, work, args) if args.fresh else None
        startup: dict[str, float] = {}
        if args.startup:
            startup = {f"receivers={n}": min(startup_seconds(work, n) for _ in range(3))
                       for n in sorted({1, args.receivers})}
            startup["receivers=1, restart"] = min(startup_seconds(work, 1, restart=True)
                                                  for _ in range(3))

    report: dict[str, Any] = {
        "benchmark": "ingest",
        "instances": args.instances,
        "rounds": args.rounds,
        "senders": args.senders,
        "dicom_ai_receivers": args.receivers,
        "image": "CT 512x512 16-bit, Explicit VR Little Endian",
        "machine": {"cpus": os.cpu_count() or 0, "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "method": "persistent receivers (warm-up round untimed), fresh UIDs per round, sync "
                  "before each timed push; rates best and median of the rounds; CPU = user + "
                  "system of the receiver's process tree per instance (median of the rounds)",
        "steady": summarize_method(steady_results),
        "idle_cpu_ms_per_second": idle,
    }
    if fresh_results is not None:
        report["fresh_start"] = summarize_method(fresh_results)
    if startup:
        report["serve_start_to_first_echo_seconds"] = startup
    if profile_summary is not None:
        from benchmarks.ingest_profile import breakdown, write_tables

        # Shares applied to the CPU measured without the sampler (steady, same sender count).
        measured = report["steady"]["receivers"][DICOM_AI][str(profile_summary["senders"])]
        profile_summary["ms_per_instance"] = breakdown(
            profile_summary, measured["cpu_ms_per_instance"],
            measured["system_cpu_ms_per_instance"])
        write_tables(profile_summary, measured, args.profile / "dicom-ai.md")
        report["profile"] = profile_summary
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print()
    print("Steady state (receivers running for the whole run):")
    print("\n".join(markdown(report["steady"], args.senders)))
    if fresh_results is not None:
        print()
        print("Fresh start (a new receiver for every push, the old method):")
        print("\n".join(markdown(report["fresh_start"], args.senders)))
    for name, seconds in startup.items():
        print(f"serve start to first C-ECHO ({name}): {seconds:.2f} s")
    if profile_summary is not None:
        print()
        with contextlib.suppress(OSError):
            print((args.profile / "dicom-ai.md").read_text())


if __name__ == "__main__":
    main()
