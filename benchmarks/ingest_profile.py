"""Where a dicom-ai receiver's CPU goes per instance, from py-spy's raw (collapsed) stacks.

``py-spy record --subprocesses --format raw`` writes one line per distinct stack: frames
separated by ``;`` (the process first, ``process PID:"cmdline"``, then ``function (file:line)``
from the thread's root to its leaf) and the sample count. Sleeping threads are not sampled, but
a thread the kernel shows runnable is, even while it waits for a core: on a loaded machine the
samples over-count, so only their shares are used, applied to the CPU time measured in /proc.
A stack whose leaf is a wait or a wake-up (lock, queue, select) counts as a thread hand-off;
any other goes to the first category (in the order of :data:`CATEGORIES`) one of whose frames
it contains: a fsync called while the DIMSE layer writes a fragment counts as file I/O, a
pydicom call made by the DIMSE layer as DIMSE.

Used by ``benchmarks.ingest --profile DIR``; also on its own:
``.venv/bin/python -m benchmarks.ingest_profile GIL_RAW ON_CPU_RAW INSTANCES RATE``.
"""

from __future__ import annotations

import gzip
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: (function, file) of one frame.
Frame = tuple[str, str]


def _is_file(file: str, tail: str) -> bool:
    # py-spy names a file relative to a sys.path entry; this repository's ingest modules come
    # out bare ("scan.py") in the receiver processes, so a bare name matches its tail too.
    bare = tail.rsplit("/", 1)[-1]
    return tail in file or (bare != "" and file == bare)


def _file_in(*tails: str) -> Callable[[Frame], bool]:
    return lambda frame: any(_is_file(frame[1], tail) for tail in tails)


def _function_in(tail: str, *prefixes: str) -> Callable[[Frame], bool]:
    return lambda frame: _is_file(frame[1], tail) and frame[0].startswith(prefixes)


def _any(*tests: Callable[[Frame], bool]) -> Callable[[Frame], bool]:
    return lambda frame: any(test(frame) for test in tests)


#: Categories in priority order: a stack goes to the first whose test one of its frames passes.
CATEGORIES: list[tuple[str, Callable[[Frame], bool]]] = [
    ("logging", _file_in("logging/__init__.py", "logging/handlers.py", "dicom_ai/logs.py")),
    ("file write + fsync + rename", _any(
        _file_in("storage/filestore.py"),
        _function_in("network/scp.py", "_SpoolFile", "_spool_file"),
        _function_in("ingest/spool.py", "Ingestor._store", "_settle"),
        _file_in("tempfile.py"),
    )),
    ("database (index rows; the serve process's outbox and completion polls)", _any(
        _file_in("storage/", "sqlite3/", "sqlalchemy/", "psycopg/"),
        _function_in("ingest/spool.py", "Ingestor._index", "Ingestor.is_own_result"),
    )),
    ("header parse (scan / pydicom) of the received file", _file_in(
        "ingest/index.py", "ingest/scan.py", "ingest/deflate.py")),
    ("DIMSE decode/encode (command sets, file meta, pydicom)", _any(
        _file_in("pynetdicom/dimse.py", "pynetdicom/dimse_messages.py",
                 "pynetdicom/dimse_primitives.py", "pynetdicom/dsutils.py"),
        _function_in("network/tuning.py", "_write_file_meta", "encode_file_meta", "_short",
                     "_even", "_CheckedUID", "_uid_is_valid", "_cached"),
        _function_in("network/scp.py", "_SpoolGuardDIMSE"),
    )),
    ("pydicom (other)", _file_in("pydicom/")),
    ("PDU reading/writing (socket, DUL, state machine)", _any(
        _file_in("pynetdicom/pdu.py", "pynetdicom/pdu_items.py", "pynetdicom/pdu_primitives.py",
                 "pynetdicom/transport.py", "pynetdicom/dul.py", "pynetdicom/fsm.py",
                 "socket.py", "selectors.py", "ssl.py"),
        _function_in("network/tuning.py", "_read", "_recv", "_PduRead", "_oversized",
                     "read_pdu_data", "_dul_wait", "_wake_dul"),
    )),
    ("association, events, C-STORE handler glue", _any(
        _file_in("pynetdicom/association.py", "pynetdicom/service_class.py",
                 "pynetdicom/events.py", "pynetdicom/ae.py", "pynetdicom/acse.py",
                 "dicom_ai/network/", "network/handlers.py", "network/scp.py",
                 "network/tuning.py", "network/counters.py", "ingest/spool.py"),
    )),
]
OTHER = "other (API, completion monitor, audit, balancer, interpreter)"
WAITS = "thread hand-offs: waits and wake-ups (leaf in a lock, queue, select)"
#: A stack whose leaf is one of these is a thread waiting or being woken (or runnable, waiting
#: for a core), whatever called it: the cost of pynetdicom's threads handing work over.
_WAIT_LEAF = _any(
    _function_in("threading.py", "Condition.", "Event.", "Semaphore.", "Thread.join",
                 "Lock", "_wait_for_tstate_lock"),
    _file_in("queue.py", "selectors.py", "multiprocessing/connection.py",
             "multiprocessing/reduction.py", "multiprocessing/synchronize.py"),
    _function_in("socket.py", "socket.accept"),
    _function_in("concurrent/futures/thread.py", "_worker"),
    _function_in("network/tuning.py", "_dul_wait", "_wake_dul", "_association_wait",
                 "_SleepHook", "_Checkpoint", "_wake_association", "_on_put"),
)


def parse_frame(text: str) -> Frame:
    """``function (file:line)`` -> (function, file)."""
    match = _FRAME.match(text)
    if match is None:
        return (text, "")
    return (match["function"], match["file"])


_PROCESS = re.compile(r'process \d+:"[^"]*"(?:;|$)')


def parse(raw: str) -> list[tuple[str, list[Frame], int]]:
    """py-spy raw lines -> (process command line, frames root..leaf, samples).

    The process frames come first and are quoted (a command line may hold ``;``).
    """
    stacks = []
    for line in raw.splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        process = "?"
        while (match := _PROCESS.match(body)) is not None:
            process, body = match.group(0).rstrip(";"), body[match.end():]
        frames = [parse_frame(part) for part in body.split(";") if part]
        stacks.append((process, frames, int(count)))
    return stacks


def categorize(frames: list[Frame]) -> str:
    """The category of one stack: :data:`WAITS` by its leaf, else see :data:`CATEGORIES`."""
    if frames and _WAIT_LEAF(frames[-1]):
        return WAITS
    for name, test in CATEGORIES:
        if any(test(frame) for frame in frames):
            return name
    return OTHER


def _role(process: str) -> str:
    if "spawn_main" in process or "multiprocessing" in process:
        return "receiver processes (spawned)" if "spawn_main" in process else "multiprocessing"
    return "serve process (receiver 0, balancer, API, monitor)"


def summarize(raw: str, instances: int, rate: int | None = None) -> dict[str, Any]:
    """Samples and percentages by category, by process and by leaf function.

    Parameters
    ----------
    raw : str
        py-spy's raw output.
    instances : int
        Instances received while it sampled.
    rate : int, optional
        py-spy's sampling rate: converts samples to sampled CPU ms per instance.

    Returns
    -------
    dict
        ``categories`` (name -> samples, percent), ``processes``, ``top_leaf_functions``
        (self samples), ``samples``; with `rate`, ``sampled_cpu_ms_per_instance``.
    """
    stacks = parse(raw)
    total = sum(count for _, _, count in stacks) or 1
    by_category: Counter[str] = Counter()
    by_process: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    for process, frames, count in stacks:
        by_category[categorize(frames)] += count
        by_process[_role(process)] += count
        leaf = frames[-1] if frames else ("(no Python frame)", "")
        by_leaf[f"{leaf[0]} ({leaf[1]})"] += count
    order = [name for name, _ in CATEGORIES] + [WAITS, OTHER]
    summary: dict[str, Any] = {
        "samples": total,
        "categories": {name: {"samples": by_category[name],
                              "percent": round(100 * by_category[name] / total, 1)}
                       for name in order},
        "processes": {name: round(100 * n / total, 1) for name, n in by_process.most_common()},
        "top_leaf_functions": {name: round(100 * n / total, 1)
                               for name, n in by_leaf.most_common(25)},
    }
    if rate:
        summary["sampled_ms_per_instance"] = round(1000 * total / rate / instances, 2)
        for name in order:
            summary["categories"][name]["sampled_ms_per_instance"] = round(
                1000 * by_category[name] / rate / instances, 2)
    return summary


KERNEL = "kernel (system CPU: socket reads and writes, file writes, fsync, futex)"


def breakdown(profile: dict[str, Any], cpu_ms: float, system_ms: float) -> dict[str, float]:
    """Milliseconds of CPU per instance by category.

    The user time (`cpu_ms` - `system_ms`, measured in /proc) split by the GIL-held samples'
    shares (the receiver's user time is nearly all interpreter time: it does no heavy C work
    outside the GIL but SQLite's), plus the system time as its own row.
    """
    user = max(cpu_ms - system_ms, 0.0)
    rows = {name: round(entry["percent"] * user / 100, 2)
            for name, entry in profile["gil"]["categories"].items()}
    rows[KERNEL] = round(system_ms, 2)
    return rows


def _percent(summary: dict[str, Any], category: str) -> str:
    entry = summary["categories"].get(category)
    return "" if entry is None else f"{entry['percent']:.1f}%"


def tables(profile: dict[str, Any], measured: dict[str, Any] | None = None) -> str:
    """The profile of :func:`benchmarks.ingest.profiler` as Markdown.

    With `measured` (a steady-state summary of the same sender count), one row per category:
    ms per instance (:func:`breakdown`) and its share; always the shares of the GIL-held and of
    the on-CPU samples; then the top leaf functions and the processes.
    """
    gil, on_cpu = profile["gil"], profile["on_cpu"]
    lines = ["Where dicom-ai's CPU goes per instance (py-spy, whole process tree, "
             f"{profile['senders']} senders):", ""]
    rows: dict[str, float] = {}
    if measured is not None:
        cpu, system = measured["cpu_ms_per_instance"], measured["system_cpu_ms_per_instance"]
        rows = breakdown(profile, cpu, system)
        lines += [f"Measured (/proc, steady rounds): {cpu:.2f} ms CPU per instance, of which "
                  f"{system:.2f} ms system. Sampled (over-counts on a loaded machine): on CPU "
                  f"{on_cpu['sampled_ms_per_instance']:.2f} ms, GIL held "
                  f"{gil['sampled_ms_per_instance']:.2f} ms.", ""]
    lines += ["| category | ms/instance | share | GIL-held samples | on-CPU samples |",
              "|---|---|---|---|---|"]
    for name in [*gil["categories"], KERNEL]:
        ms = rows.get(name)
        share = "" if ms is None or not measured else \
            f"{100 * ms / measured['cpu_ms_per_instance']:.0f}%"
        lines.append(f"| {name} | {'' if ms is None else f'{ms:.2f}'} | {share} | "
                     f"{_percent(gil, name)} | {_percent(on_cpu, name)} |")
    for mode, title in (("gil", "GIL held"), ("on_cpu", "on CPU")):
        lines += ["", f"| leaf function ({title}, self) | share |", "|---|---|"]
        lines += [f"| `{name}` | {share:.1f}% |"
                  for name, share in profile[mode]["top_leaf_functions"].items()]
    lines += ["", "| process (on CPU) | share |", "|---|---|"]
    lines += [f"| {name} | {share:.1f}% |" for name, share in on_cpu["processes"].items()]
    return "\n".join(lines) + "\n"


def read_raw(path: Path) -> str:
    """A raw py-spy file, plain or gzip-compressed (``.gz``)."""
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode()
    return path.read_text()


def compress(path: Path) -> Path:
    """Replace `path` by `path`.gz (raw stacks compress about tenfold); return the new path."""
    target = path.with_name(path.name + ".gz")
    target.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    path.unlink()
    return target


def write_tables(profile: dict[str, Any], measured: dict[str, Any] | None, path: Path) -> None:
    """Write :func:`tables` to `path`."""
    path.write_text(tables(profile, measured))


def main() -> None:
    """Summarise a GIL and an on-CPU raw py-spy file given on the command line."""
    gil, on_cpu, instances, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    profile = {"senders": "?", "gil": summarize(read_raw(Path(gil)), instances, rate),
               "on_cpu": summarize(read_raw(Path(on_cpu)), instances, rate)}
    print(tables(profile))


if __name__ == "__main__":
    main()
