"""Real DICOM peers for tests and benchmarks: dcmtk, Orthanc and dicom-ai itself as processes.

Every peer listens on a free loopback port and keeps its files under a folder the caller owns.
dcmtk and Orthanc need ``TCP_NODELAY=1`` on loopback or Nagle's algorithm costs 20-40x
(docs/notes.md), so every process started here gets it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_ai.config import Settings

REPO = Path(__file__).resolve().parent.parent
# `serve` subprocesses put their HTTP API on a free port (never a fixed one tests could share).
ENV = {**os.environ, "TCP_NODELAY": "1", "DICOM_AI_API__PORT": "0"}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy; that value (else AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def port_open(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:`port` (a broker, say)."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def settings_toml(settings: Settings) -> str:
    """The settings as a TOML file, for a ``dicom-ai worker`` or ``serve`` process."""
    data = settings.model_dump(mode="json", exclude_none=True)
    lines: list[str] = []
    for section in ("dicom", "storage", "completion", "workers", "delivery", "logging"):
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in data[section].items()]
    for kind in ("destinations", "routes"):
        for item in data[kind]:
            lines.append(f"[[{kind}]]")
            for key, value in item.items():
                if isinstance(value, dict):
                    inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                    lines.append(f"{key} = {{ {inner} }}")
                else:
                    lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen[Any] | None = None
                  ) -> None:
    """Block until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def binary(name: str) -> str | None:
    """Path of an executable (dcmtk, Orthanc, dciodvfy), or None.

    The system folders come first: pynetdicom installs look-alike ``storescu``/``echoscu``
    scripts into the virtual environment, and the tests mean dcmtk's.
    """
    for folder in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        if Path(folder, name).is_file():
            return str(Path(folder, name))
    return shutil.which(name)


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a process, escalating to SIGKILL."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sample_file(name: str) -> str:
    """The path of one of pydicom's (or pydicom-data's) test files."""
    path = get_testdata_file(name)
    assert isinstance(path, str), f"test file {name} not found"
    return path


# -- data --------------------------------------------------------------------------------------
def make_ct_series(out: Path, count: int, *, size: int = 512, seed: int = 0,
                   study_uid: str | None = None) -> list[Path]:
    """Write `count` CT slices of `size` x `size` (one new study and series) into `out`.

    The header is pydicom's CT_small test file; UIDs, geometry and pixels are new.
    """
    out.mkdir(parents=True, exist_ok=True)
    template = dcmread(sample_file("CT_small.dcm"))
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i in range(count):
        ds = template.copy()
        ds.file_meta = FileMetaDataset(template.file_meta)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.SliceLocation = float(i)
        ds.Rows = ds.Columns = size
        ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()
        path = out / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def retag(paths: Sequence[Path], out: Path) -> list[Path]:
    """Copies of `paths` with fresh Study/Series/SOP Instance UIDs (pixel data untouched)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for i, path in enumerate(paths):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out / f"{i:04d}.dcm"
        ds.save_as(target)
        copies.append(target)
    return copies


def mpps_dataset(study_uid: str, status: str, referenced: Sequence[Dataset] = ()) -> Dataset:
    """An MPPS attribute list (PS3.3 C.4.13-C.4.15) for N-CREATE/N-SET tests."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    step = Dataset()
    step.StudyInstanceUID = study_uid
    step.AccessionNumber = ""
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedStationAETitle = "MODALITY"
    now = datetime.now()
    ds.PerformedProcedureStepStartDate = now.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = now.strftime("%H%M%S")
    ds.Modality = "CT"
    if referenced:
        series = Dataset()
        series.SeriesInstanceUID = referenced[0].SeriesInstanceUID
        series.ReferencedImageSequence = []
        for inst in referenced:
            ref = Dataset()
            ref.ReferencedSOPClassUID = inst.SOPClassUID
            ref.ReferencedSOPInstanceUID = inst.SOPInstanceUID
            series.ReferencedImageSequence.append(ref)
        ds.PerformedSeriesSequence = [series]
    return ds


# -- peers ------------------------------------------------------------------------------------
class StoreSCP:
    """dcmtk ``storescp`` writing received files to a folder."""

    def __init__(self, folder: Path, *, fork: bool = False) -> None:
        self.folder = folder
        self.fork = fork
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [binary("storescp") or "storescp", "-aet", "STORESCP", "-od", str(self.folder),
                "-uf", "--max-pdu", "131072"]
        if self.fork:
            args.append("--fork")
        self.process = subprocess.Popen([*args, str(self.port)], env=ENV,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, process=self.process)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop(self.process)


class Orthanc:
    """A real Orthanc PACS on loopback with its own storage folder and config."""

    def __init__(self, folder: Path, *, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.aet = aet
        self.extra = extra or {}
        self.port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicom-ai-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [],
            "StableAge": 1,
            **self.extra,
        }
        conf = self.folder / "orthanc.json"
        conf.write_text(json.dumps(config))
        self.log = (self.folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen([binary("Orthanc") or "Orthanc", str(conf)], env=ENV,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, process=self.process)
        wait_for_port(self.http_port, process=self.process)
        return self

    def rest(self, path: str) -> Any:
        """GET a REST resource as JSON."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def study_files(self, study_uid: str) -> list[bytes]:
        """The DICOM files Orthanc stores for a study (none when it has none), via REST."""
        query = json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/tools/find",
                                         data=query.encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            found: list[str] = json.loads(response.read())
        files = []
        for instance in found:
            url = f"http://127.0.0.1:{self.http_port}/instances/{instance}/file"
            with urllib.request.urlopen(url, timeout=30) as response:
                files.append(response.read())
        return files

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop(self.process)
        self.log.close()


class DicomAIServe:
    """``dicom-ai serve`` as a separate process (so it can be killed with SIGKILL)."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = config.with_suffix(".log")

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait until C-ECHO is answered; returns seconds to the first answer."""
        started = time.monotonic()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_ai.cli", "serve", "--config", str(self.config)],
            env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        log.close()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}: "
                                   f"{self.log_path.read_text()[-3000:]}")
            if echo_ok(self.port):
                return time.monotonic() - started
            time.sleep(0.02)
        raise TimeoutError(f"serve did not answer C-ECHO within {timeout} s")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Block until the serve log contains `text` (e.g. "all 4 receivers ready")."""
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged within {timeout} s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM: clean shutdown."""
        if self.process is not None:
            stop(self.process)

    def __enter__(self) -> DicomAIServe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def echo_ok(port: int, aet: str = "DICOM_AI") -> bool:
    """True if a C-ECHO to 127.0.0.1:`port` succeeds (dcmtk ``echoscu``)."""
    result = subprocess.run(
        [binary("echoscu") or "echoscu", "-to", "2", "-aec", aet, "127.0.0.1", str(port)],
        env=ENV, capture_output=True, check=False,
    )
    return result.returncode == 0


def storescu(
    port: int, files: Sequence[Path], *, aet: str = "DICOM_AI",
    calling: str = "STORESCU", extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Push `files` with dcmtk ``storescu`` over one association."""
    return subprocess.run(
        [binary("storescu") or "storescu", "-aet", calling, "-aec", aet, *extra, "127.0.0.1",
         str(port), *map(str, files)],
        env=ENV, capture_output=True, text=True, check=False,
    )


# -- memory of a process tree (/proc) ----------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in children.read_text().split()]
    return pids


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in KiB (0 if the process is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def tree_rss(pid: int) -> int:
    """Resident memory of `pid`'s process tree now, bytes (VmRSS of each)."""
    return sum(status_kib(p, "VmRSS") for p in process_tree(pid)) * 1024


class PeakGrowth:
    """How far the peak RSS of a process tree rose above its RSS at entry, in bytes.

    Each process's peak (VmHWM) is reset to its RSS at entry (``clear_refs``), so start-up peaks
    hide nothing. The sum over the processes of (peak after - RSS at entry): an upper bound of
    the tree's.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0
        self.by_process: dict[int, int] = {}

    def __enter__(self) -> PeakGrowth:
        pids = process_tree(self.pid)
        self.base = {p: status_kib(p, "VmRSS") for p in pids}
        for p in pids:  # "5": reset the peak RSS (VmHWM) to the current RSS
            with contextlib.suppress(OSError):
                Path(f"/proc/{p}/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc: object) -> None:
        self.by_process = {p: max(status_kib(p, "VmHWM") - self.base.get(p, 0), 0) * 1024
                           for p in process_tree(self.pid)}
        self.growth = sum(self.by_process.values())

    def __str__(self) -> str:
        mib = 1024 * 1024
        return f"{self.growth / mib:.0f} MiB (" + ", ".join(
            f"{'root' if p == self.pid else p}: {g / mib:.0f}"
            for p, g in self.by_process.items()) + ")"


# -- a small filesystem -----------------------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(mount_point: Path, size: int, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of `size` bytes (and `inodes` inodes) at `mount_point`, unmounted on exit.

    Mounting needs root: where it is refused, the test is skipped with the reason (a failure
    under ``DICOM_AI_REQUIRE_PEERS``). Enter it before the service that uses it, so it is
    unmounted after the service stopped.
    """
    from tests.conftest import missing

    mount_point.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0700" + (f",nr_inodes={inodes}" if inodes else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        missing(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on `path`'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
