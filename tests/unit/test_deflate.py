"""Deflated datasets are inflated as a bounded stream: parse, refusals, recovery, memory.

Memory is measured with :mod:`tracemalloc`, which sees zlib's buffers and every bytes object
(pydicom's ``zlib.decompress`` of the whole stream included), so a peak of a few MiB while a
128 MiB bomb is checked shows that nothing was inflated whole.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from dicom_ai.exceptions import IngestError
from dicom_ai.ingest import deflate
from dicom_ai.ingest.index import instance_record, parse_received, read_dataset
from dicom_ai.ingest.recovery import recover
from storage.db import Database
from storage.filestore import FileStore
from tests.deflated import MIB, bomb_dataset, write_bomb, write_deflated
from tests.peers import sample_file

CANNOT_UNDERSTAND = 0xC000
LIMIT = 16 * MIB
BOMB_SIDE = 11586  # 11586^2 bytes of zeros: 128 MiB inflated, about 130 KB on disk
PEAK = 8 * MIB  # what checking or refusing a bomb may allocate at most (steps are 1 MiB)
CHARSETS = Path(pydicom.__file__).parent / "data" / "charset_files"


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """A deflated Secondary Capture inflating to 128 MiB (written once for the module)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    return path, write_bomb(path, BOMB_SIDE)


def _peak(call: Callable[[], Any]) -> tuple[int, Any]:
    """Run `call`; the peak of traced allocations during it, and what it returned or raised."""
    tracemalloc.start()
    try:
        try:
            result: Any = call()
        except Exception as exc:
            result = exc
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def _uids(path: Path) -> tuple[str, str]:
    meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except IngestError as exc:
        return exc.status


def _deflated_copy(source: Path, target: Path, change: Callable[[Dataset], None] | None = None
                   ) -> Path:
    """`source` re-written as Deflated Explicit VR Little Endian by pydicom."""
    ds = pydicom.dcmread(source)
    if change is not None:
        change(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(target, enforce_file_format=True)
    return target


# -- the stream ---------------------------------------------------------------------------------
def test_inflate_counts_a_bomb_in_bounded_memory(bomb: tuple[Path, Dataset]) -> None:
    """The whole stream is counted (128 MiB) or refused past the limit; memory stays at steps."""
    path, _ = bomb
    peak, size = _peak(lambda: deflate.deflated_size(path, 1024 * MIB))
    assert BOMB_SIDE * BOMB_SIDE < size < BOMB_SIDE * BOMB_SIDE + 1024, size  # + the header
    assert peak < PEAK, peak
    peak, refused = _peak(lambda: deflate.deflated_size(path, LIMIT))
    assert isinstance(refused, deflate.InflateLimitError)
    assert "max_inflated_bytes" in str(refused)
    assert peak < PEAK, peak


def test_reading_for_sending_matches_pydicom_and_refuses_a_bomb(
        tmp_path: Path, bomb: tuple[Path, Dataset]) -> None:
    """dcmread_bounded (C-GET, C-MOVE) gives dcmread's dataset; a bomb is refused unread."""
    normal = Path(sample_file("image_dfl.dcm"))
    ds = deflate.dcmread_bounded(normal, LIMIT, tmp_path)
    expected = pydicom.dcmread(normal)
    assert ds == expected
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert ds.PixelData == expected.PixelData
    ct = Path(sample_file("CT_small.dcm"))
    assert deflate.dcmread_bounded(ct, LIMIT, tmp_path) == pydicom.dcmread(ct)
    peak, refused = _peak(lambda: deflate.dcmread_bounded(bomb[0], LIMIT, tmp_path))
    assert isinstance(refused, deflate.InflateLimitError)
    assert isinstance(refused, ValueError)  # what the C-GET reader already refuses on
    assert peak < PEAK, peak
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_other_transfer_syntaxes_are_not_inflated() -> None:
    """A file that is not deflated is left to its reader (None)."""
    assert deflate.deflated_size(Path(sample_file("CT_small.dcm")), LIMIT) is None


# -- the C-STORE parse ---------------------------------------------------------------------------
def test_a_bomb_is_refused_before_the_index_parse_in_bounded_memory(
        bomb: tuple[Path, Dataset]) -> None:
    """parse_received refuses it with 0xC000 (the old parse inflated it whole with pydicom)."""
    path, ds = bomb
    peak, refused = _peak(lambda: parse_received(
        path, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
        max_inflated_bytes=LIMIT))
    assert isinstance(refused, IngestError), refused
    assert refused.status == CANNOT_UNDERSTAND
    assert "max_inflated_bytes" in refused.reason
    assert peak < PEAK, peak
    # Below the limit it is accepted, still without holding the inflated dataset.
    peak, record = _peak(lambda: parse_received(
        path, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
        max_inflated_bytes=1024 * MIB))
    assert not isinstance(record, Exception), record
    assert record.sop_instance_uid == ds.SOPInstanceUID
    assert peak < PEAK, peak
    # pydicom's own reader is guarded too.
    peak, refused = _peak(lambda: read_dataset(path, max_inflated_bytes=LIMIT))
    assert isinstance(refused, IngestError)
    assert refused.status == CANNOT_UNDERSTAND
    assert peak < PEAK, peak
    assert [p.name for p in path.parent.iterdir()] == ["bomb.dcm"]  # no temporary file left


def _latin1(ds: Dataset) -> None:
    ds.SeriesDescription = "Série ç"  # non-ASCII text: the scan hands over to pydicom


DEFLATED_SOURCES: list[tuple[str, Callable[[Dataset], None] | None]] = [
    ("CT_small.dcm", None),
    ("MR_small.dcm", None),
    ("rtplan.dcm", None),  # nested sequences
    ("test-SR.dcm", None),
    ("chrFren.dcm", None),  # ISO_IR 100 names: pydicom's fallback on the inflated copy
    ("CT_small.dcm", _latin1),
]


@pytest.mark.parametrize(("name", "change"), DEFLATED_SOURCES,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(DEFLATED_SOURCES)])
def test_deflated_files_give_the_index_what_pydicom_gives(
        tmp_path: Path, name: str, change: Callable[[Dataset], None] | None) -> None:
    """The bounded parse of a deflated file equals pydicom's complete parse of it."""
    source = CHARSETS / name if name.startswith("chr") else Path(sample_file(name))
    path = _deflated_copy(source, tmp_path / "deflated.dcm", change)
    cls, inst = _uids(path)
    expected = _outcome(lambda: instance_record(pydicom.dcmread(path), sop_class_uid=cls,
                                                sop_instance_uid=inst))
    assert not isinstance(expected, int), expected
    assert parse_received(path, sop_class_uid=cls, sop_instance_uid=inst) == expected
    # The pad byte PS3.5 A.5 allows after an odd-length stream is accepted.
    with path.open("ab") as padded:
        padded.write(b"\0")
    assert parse_received(path, sop_class_uid=cls, sop_instance_uid=inst) == expected


def test_pydicoms_deflated_example_is_parsed_like_pydicom() -> None:
    """``image_dfl.dcm`` (pydicom's deflated test file): the same index fields."""
    path = Path(sample_file("image_dfl.dcm"))
    cls, inst = _uids(path)
    expected = instance_record(pydicom.dcmread(path), sop_class_uid=cls, sop_instance_uid=inst)
    assert parse_received(path, sop_class_uid=cls, sop_instance_uid=inst) == expected


def _nasty(ds: Dataset) -> None:
    ds.PatientName = "Nørgård^Åse"
    ds.SpecificCharacterSet = "ISO_IR 100"


@pytest.mark.parametrize("change", [None, _nasty], ids=["scan", "pydicom-fallback"])
def test_broken_streams_and_truncated_datasets_are_refused(
        tmp_path: Path, change: Callable[[Dataset], None] | None) -> None:
    """A cut or corrupt stream, and a complete stream of a truncated dataset: 0xC000."""
    ds = bomb_dataset(64)
    if change is not None:
        change(ds)
    cls, inst = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    cut = write_deflated(tmp_path / "cut.dcm", ds, zeros=64 * 64, truncate=5)
    corrupt = write_deflated(tmp_path / "corrupt.dcm", ds, zeros=64 * 64)
    data = bytearray(corrupt.read_bytes())
    offset = 132 + 12 + struct.unpack("<I", data[140:144])[0]
    data[offset:offset + 16] = b"\xff" * 16  # invalid block types
    corrupt.write_bytes(bytes(data))
    # Pixel Data declares 4096 bytes; the stream (complete) holds 4000 of them.
    short = write_deflated(tmp_path / "short.dcm", ds, zeros=4000, declared=4096)
    reasons = {}
    for path in (cut, corrupt, short):
        with pytest.raises(IngestError) as refused:
            parse_received(path, sop_class_uid=cls, sop_instance_uid=inst)
        assert refused.value.status == CANNOT_UNDERSTAND
        reasons[path.name] = refused.value.reason
    assert "ends early" in reasons["cut.dcm"]
    assert "corrupt" in reasons["corrupt.dcm"]
    assert "truncated" in reasons["short.dcm"]
    for reason in reasons.values():
        assert "Åse" not in reason
        assert "Bomb" not in reason


# -- recovery and reconcile -----------------------------------------------------------------------
def _plant(store: FileStore, ds: Dataset, source: Path) -> Path:
    """Copy `source` to where the store keeps `ds` (no index row: recovery must find it)."""
    target = store.absolute(store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                                ds.SOPInstanceUID))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return target


def test_recovery_quarantines_a_planted_bomb_in_bounded_memory(
        store: FileStore, db: Database, bomb: tuple[Path, Dataset]) -> None:
    """A bomb found among the instances at start is quarantined, a normal deflated file indexed.

    Before the fix, recovery parsed every orphan with pydicom: the bomb was inflated whole
    (about twice its 128 MiB) and indexed.
    """
    path, ds = bomb
    _plant(store, ds, path)
    normal = Path(sample_file("image_dfl.dcm"))
    _plant(store, pydicom.dcmread(normal, stop_before_pixels=True), normal)
    peak, report = _peak(lambda: recover(store, db, max_inflated_bytes=LIMIT))
    assert not isinstance(report, Exception), report
    assert (report.files_indexed, report.files_quarantined) == (1, 1)
    assert peak < 2 * PEAK, peak  # the index writes add their own allocations
    records = [json.loads(p.read_text()) for p in store.quarantine_dir.rglob("*.json")]
    assert len(records) == 1
    assert records[0]["status"] == "0xC000"
    assert "max_inflated_bytes" in records[0]["reason"]
    assert not [p for p in store.incoming.iterdir()]  # the temporary copies are gone
    with db.sessions() as session:
        from storage import repository

        assert repository.find_instance_path(session, str(ds.SOPInstanceUID)) is None
        assert repository.find_instance_path(
            session, "1.3.6.1.4.1.5962.1.1.0.0.0.977067309.6001.0") is not None


def test_a_deflated_orphan_under_the_limit_is_indexed(store: FileStore, db: Database,
                                                    tmp_path: Path) -> None:
    """A deflated orphan under the limit is indexed at its path, like any other file."""
    ds = bomb_dataset(32)
    ds.StudyInstanceUID = generate_uid()
    source = write_deflated(tmp_path / "small.dcm", ds, zeros=32 * 32)
    _plant(store, ds, source)
    report = recover(store, db, max_inflated_bytes=LIMIT)
    assert (report.files_indexed, report.files_quarantined) == (1, 0)
