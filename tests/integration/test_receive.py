"""Receiving with real peers: dcmtk and pynetdicom senders, real files, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileDataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config, build_context

from dicom_ai.config import Settings
from dicom_ai.network.contexts import VERIFICATION
from dicom_ai.service import Service
from storage.db import Database
from tests.conftest import need_binary
from tests.peers import ENV, REPO, Orthanc, make_ct_series, retag, sample_file, storescu

SUCCESS = 0x0000
COMPRESSED = [
    "JPEG2000.dcm",
    "US1_J2KR.dcm",
    "MR_small_RLE.dcm",
    "emri_small_RLE.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG-lossy.dcm",
    "JPEG-LL.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "color3d_jpeg_baseline.dcm",
    "image_dfl.dcm",
    "MR_small_bigendian.dcm",
]


def port_of(service: Service) -> int:
    """The port a started service listens on."""
    assert service.address is not None
    return service.address[1]


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta group (the dataset as encoded)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, explicit VR LE
    return data[144 + group_length :]


def stored_path(settings: Settings, ds: pydicom.Dataset) -> Path:
    """Where the store keeps an instance."""
    folder = settings.storage.root / "instances" / str(ds.StudyInstanceUID)
    return folder / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"


def index_count(settings: Settings, table: str = "instances") -> int:
    """Rows in an index table."""
    from sqlalchemy import text

    db = Database(settings.storage.url)
    try:
        with db.engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        db.dispose()


def send_paths(port: int, paths: list[Path], calling: str = "PYNETDICOM") -> list[int]:
    """C-STORE files with pynetdicom (each in its own transfer syntax); the statuses.

    Files are streamed as they are (file meta gives the request's UIDs), like `dicom-ai send`.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = [pydicom.filereader.read_file_meta_info(p) for p in paths]
    pairs = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    ae = AE(ae_title=calling)
    ae.requested_contexts = [build_context(c, [t]) for c, t in pairs]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_AI")
    assert assoc.is_established
    try:
        statuses = []
        for path in paths:
            rsp = assoc.send_c_store(path)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
        return statuses
    finally:
        assoc.release()


def echo_status(port: int) -> int:
    """C-ECHO with pynetdicom; -1 if there was no answer."""
    ae = AE(ae_title="ECHOTEST")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_AI")
    if not assoc.is_established:
        return -1
    rsp = assoc.send_c_echo()
    assoc.release()
    return int(rsp.Status) if "Status" in rsp else -1


def write_variant(tmp: Path, name: str, change: Callable[[FileDataset], None],
                  source: str = "CT_small.dcm") -> Path:
    """A copy of a test file with `change` applied, written without validation."""
    ds = pydicom.dcmread(sample_file(source))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    change(ds)
    path = tmp / name
    with pydicom.config.disable_value_validation():
        ds.save_as(path)
    return path


# -- tests ------------------------------------------------------------------------------------
def test_echo_dcmtk_and_pynetdicom(service: Service) -> None:
    """C-ECHO is answered to dcmtk echoscu and to a pynetdicom requestor."""
    echoscu = need_binary("echoscu")
    result = subprocess.run([echoscu, "-aec", "DICOM_AI", "127.0.0.1", str(port_of(service))],
                            env=ENV, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    assert echo_status(port_of(service)) == SUCCESS


def test_storescu_series_is_stored_indexed_and_identical(
    service: Service, tmp_path: Path
) -> None:
    """dcmtk storescu pushes a CT series; every file is stored as sent and indexed."""
    need_binary("storescu")
    files = make_ct_series(tmp_path / "ct", 12, size=128)
    result = storescu(port_of(service), files)
    assert result.returncode == 0, result.stderr
    for path in files:
        ds = pydicom.dcmread(path)
        stored = stored_path(service.settings, ds)
        copy = pydicom.dcmread(stored)
        # dcmtk re-encodes the header (group lengths); the pixel data must be untouched.
        assert copy.PixelData == ds.PixelData
        assert copy.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert index_count(service.settings) == 12
    assert not [p for p in (service.settings.storage.root / "incoming").rglob("*") if p.is_file()]


def test_compressed_transfer_syntaxes_stored_exactly_as_sent(
    service: Service, tmp_path: Path
) -> None:
    """Real compressed files (JPEG, JPEG-LS, J2K, RLE, deflate, big endian) are byte-identical."""
    paths = [Path(sample_file(name)) for name in COMPRESSED]
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    seen: set[str] = set()
    unique = []
    for path, uid in zip(paths, uids, strict=True):
        if uid not in seen:
            seen.add(uid)
            unique.append(path)
    statuses = send_paths(port_of(service), unique)
    assert statuses == [SUCCESS] * len(unique)
    for path in unique:
        original = pydicom.dcmread(path)
        stored = stored_path(service.settings, original)
        copy = pydicom.dcmread(stored)
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert copy.PixelData == original.PixelData, path.name
        assert dataset_bytes(stored) == dataset_bytes(path), path.name
    # dcmtk storescu proposing the compressed syntax itself (one flag per syntax).
    need_binary("storescu")
    dcmtk = {"MR_small_RLE.dcm": "-xr", "US1_J2KR.dcm": "-xv", "JPEG2000.dcm": "-xw",
             "MR_small_jpeg_ls_lossless.dcm": "-xt", "JPGLosslessP14SV1_1s_1f_8b.dcm": "-xs"}
    retagged = []
    for i, (name, flag) in enumerate(dcmtk.items()):
        copy_path = retag([Path(sample_file(name))], tmp_path / f"dcmtk-{i}")[0]
        result = storescu(port_of(service), [copy_path], extra=["-R", flag])
        assert result.returncode == 0, result.stderr
        retagged.append(copy_path)
    for path in retagged:
        ds = pydicom.dcmread(path)
        copy = pydicom.dcmread(stored_path(service.settings, ds))
        assert copy.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert copy.PixelData == ds.PixelData
    assert index_count(service.settings) == len(unique) + len(retagged)


def _del(keyword: str) -> Callable[[FileDataset], None]:
    def change(ds: FileDataset) -> None:
        delattr(ds, keyword)

    return change


def _set(keyword: str, value: str) -> Callable[[FileDataset], None]:
    def change(ds: FileDataset) -> None:
        setattr(ds, keyword, value)

    return change


def _meta_instance(ds: FileDataset) -> None:
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()


def _meta_class(ds: FileDataset) -> None:
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")  # MR; dataset: CT


BAD_INPUTS: list[tuple[str, Callable[[FileDataset], None], int]] = [
    ("no-study-uid", _del("StudyInstanceUID"), 0xA900),
    ("no-series-uid", _del("SeriesInstanceUID"), 0xA900),
    ("bad-uid-syntax", _set("StudyInstanceUID", "1.2.abc.4"), 0xA900),
    ("path-traversal", _set("SeriesInstanceUID", "../../../../tmp/evil"), 0xA900),
    ("uid-too-long", _set("SeriesInstanceUID", "1." + "2" * 70), 0xA900),
    ("instance-mismatch", _meta_instance, 0xA900),
    ("class-mismatch", _meta_class, 0xA900),
]


def test_bad_input_refused_quarantined_and_service_stays_up(
    service: Service, tmp_path: Path
) -> None:
    """Each malformed instance gets its failure status, lands in quarantine with its reason."""
    port = port_of(service)
    root = service.settings.storage.root
    expected = []
    paths = []
    for name, change, status in BAD_INPUTS:
        paths.append(write_variant(tmp_path, f"{name}.dcm", change))
        expected.append(status)
    paths.append(Path(sample_file("MR_truncated.dcm")))  # pixel data shorter than declared
    expected.append(0xC000)
    garbage = write_variant(tmp_path, "garbage.dcm", lambda ds: None)
    data = bytearray(garbage.read_bytes())
    start = len(data) - len(dataset_bytes(garbage))
    data[start:start + 8] = b"\x08\x00\x16\x00UI\xff\xff"  # an element longer than the file
    garbage.write_bytes(bytes(data))
    paths.append(garbage)
    expected.append(0xC000)

    for path, status in zip(paths, expected, strict=True):
        assert send_paths(port, [path]) == [status], path.name
        assert echo_status(port) == SUCCESS
    assert index_count(service.settings) == 0
    records = sorted((root / "quarantine").rglob("*.json"))
    assert len(records) == len(paths)
    reasons = [json.loads(r.read_text()) for r in records]
    assert sorted(r["status"] for r in reasons) == sorted(f"0x{s:04X}" for s in expected)
    assert sum(1 for r in reasons if "truncated" in r["reason"]) == 2
    assert sum(1 for r in reasons if "not valid DICOM UID syntax" in r["reason"]) == 2
    assert index_count(service.settings, "quarantine") == len(paths)
    assert not (root / "tmp" / "evil").exists()
    assert not Path("/tmp/evil").exists()
    assert list((root / "instances").iterdir()) == []


def test_disk_below_minimum_answers_out_of_resources(
    make_settings: Callable[..., Settings],
    start_service: Callable[[Settings], Service],
    tmp_path: Path,
) -> None:
    """Free space under storage.min_free_bytes -> 0xA700, nothing kept, C-ECHO still fine."""
    service = start_service(make_settings(storage={"min_free_bytes": 10**18}))
    path = write_variant(tmp_path, "ct.dcm", lambda ds: None)
    assert send_paths(port_of(service), [path]) == [0xA700]
    assert echo_status(port_of(service)) == SUCCESS
    assert index_count(service.settings) == 0
    assert list((service.settings.storage.root / "quarantine").iterdir()) == []


@pytest.mark.parametrize("policy", ["keep-first", "replace"])
def test_duplicate_policy(
    policy: str,
    make_settings: Callable[..., Settings],
    start_service: Callable[[Settings], Service],
    tmp_path: Path,
) -> None:
    """A re-sent SOP Instance UID adds no row; the policy decides which copy is kept."""
    service = start_service(make_settings(storage={"duplicates": policy}))
    first = write_variant(tmp_path, "first.dcm", _set("SeriesDescription", "FIRST"))
    ds = pydicom.dcmread(first)
    ds.SeriesDescription = "SECOND"
    second = tmp_path / "second.dcm"
    ds.save_as(second)
    port = port_of(service)
    assert send_paths(port, [first]) == [SUCCESS]
    assert send_paths(port, [second, second]) == [SUCCESS, SUCCESS]
    assert index_count(service.settings) == 1
    kept = pydicom.dcmread(stored_path(service.settings, ds))
    assert kept.SeriesDescription == ("FIRST" if policy == "keep-first" else "SECOND")
    assert not [p for p in (service.settings.storage.root / "incoming").rglob("*") if p.is_file()]


def test_fifty_concurrent_associations(make_settings: Callable[..., Settings],
                                       start_service: Callable[[Settings], Service],
                                       tmp_path: Path) -> None:
    """50 associations at once, 4 instances each: every one stored, nothing lost."""
    # All from one host: above the default per-host cap (32), which this test is not about.
    service = start_service(make_settings(dicom={"max_connections_per_host": 64}))
    port = port_of(service)
    batches = [make_ct_series(tmp_path / f"s{i}", 4, size=32, seed=i) for i in range(50)]
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(50)

    def push(i: int) -> None:
        barrier.wait()
        results[i] = send_paths(port, batches[i], calling=f"SENDER{i}")

    threads = [threading.Thread(target=push, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == list(range(50))
    assert all(statuses == [SUCCESS] * 4 for statuses in results.values())
    assert index_count(service.settings) == 200


def _config_file(settings: Settings, path: Path) -> Path:
    path.write_text(
        f'[dicom]\nhost = "127.0.0.1"\nport = {settings.dicom.port}\n'
        f'[storage]\nroot = "{settings.storage.root}"\n'
        f'database_url = "{settings.storage.url}"\nmin_free_bytes = 0\n'
    )
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_ai.cli", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, check=False, timeout=120)


def test_send_and_studies_commands(service: Service, tmp_path: Path) -> None:
    """`dicom-ai send` pushes a folder (own transfer syntaxes); `studies --json` lists it."""
    folder = tmp_path / "upload"
    make_ct_series(folder / "ct", 5, size=64)
    (folder / "notes.txt").write_text("not DICOM")
    jpeg = retag([Path(sample_file("SC_rgb_jpeg_dcmtk.dcm"))], folder / "sc")[0]
    config = _config_file(service.settings, tmp_path / "config.toml")
    sent = _cli("send", "--config", str(config), "--to",
                f"DICOM_AI@127.0.0.1:{port_of(service)}", str(folder))
    assert sent.returncode == 0, sent.stderr
    assert "success\t6" in sent.stdout  # the summary is on stdout (tab-separated when piped)
    listed = _cli("studies", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    studies = json.loads(listed.stdout)
    assert sorted(s["instances"] for s in studies) == [1, 5]
    by_count = {s["instances"]: s for s in studies}
    assert by_count[5]["modalities"] == ["CT"]
    assert by_count[5]["state"] == "receiving"
    assert by_count[1]["study_instance_uid"] == pydicom.dcmread(jpeg).StudyInstanceUID
    assert {"series", "accession_number", "study_instance_uid"} <= set(by_count[5])
    table = _cli("studies", "--config", str(config))
    assert table.returncode == 0
    assert "receiving" in table.stdout


def test_send_command_to_orthanc(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """`dicom-ai send` stores plain and compressed files in a real PACS (Orthanc)."""
    need_binary("Orthanc")
    folder = tmp_path / "upload"
    make_ct_series(folder / "ct", 3, size=64)
    retag([Path(sample_file("JPEG2000.dcm"))], folder / "j2k")
    settings = make_settings()
    with Orthanc(tmp_path / "orthanc") as pacs:
        config = _config_file(settings, tmp_path / "config.toml")
        sent = _cli("send", "--config", str(config), "--to",
                    f"{pacs.aet}@127.0.0.1:{pacs.port}", str(folder))
        assert sent.returncode == 0, sent.stderr
        assert len(pacs.rest("/instances")) == 4
    bad = _cli("send", "--config", str(config), "--to", "NOPE@127.0.0.1:1", str(folder))
    assert bad.returncode == 1
    assert "failure\t4" in bad.stdout


def test_logs_carry_no_patient_data(
    make_settings: Callable[..., Settings],
    start_service: Callable[[Settings], Service],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG, storing, refusing and duplicates log UIDs and AE titles, never patient data."""
    caplog.set_level("DEBUG")
    service = start_service(make_settings())

    def phi(ds: FileDataset) -> None:
        ds.PatientName = "Secretname^Verity"
        ds.PatientID = "PID-7731-SECRET"
        ds.PatientBirthDate = "19010203"

    good = write_variant(tmp_path, "good.dcm", phi)

    def bad(ds: FileDataset) -> None:
        phi(ds)
        del ds.StudyInstanceUID

    refused = write_variant(tmp_path, "bad.dcm", bad)
    port = port_of(service)
    assert send_paths(port, [good, good, refused]) == [SUCCESS, SUCCESS, 0xA900]
    text = caplog.text + "".join(
        p.read_text() for p in (service.settings.storage.root / "quarantine").rglob("*.json")
    )
    assert pydicom.dcmread(good).SOPInstanceUID in text
    for secret in ("Secretname", "Verity", "PID-7731-SECRET", "19010203"):
        assert secret not in text


def test_environment_has_no_tensorflow_in_receiver() -> None:
    """The receiver's import graph never pulls TensorFlow (start-up stays fast)."""
    code = ("import sys, dicom_ai.service, dicom_ai.cli; "
            "print('tensorflow' in sys.modules or 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**os.environ})
    assert out.stdout.strip() == "False"


def test_resend_restores_a_file_removed_from_the_store(service: Service, tmp_path: Path) -> None:
    """Keep-first: if the first copy's file is gone, a re-send stores the instance again."""
    first = write_variant(tmp_path, "first.dcm", lambda ds: None)
    port = port_of(service)
    assert send_paths(port, [first]) == [SUCCESS]
    stored = stored_path(service.settings, pydicom.dcmread(first))
    stored.unlink()
    ds = pydicom.dcmread(first)
    ds.SeriesInstanceUID = generate_uid()  # re-sent under a corrected series, even
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved)
    assert send_paths(port, [moved]) == [SUCCESS]
    assert stored_path(service.settings, ds).is_file()
    assert index_count(service.settings) == 1
