"""The fast scan and pydicom agree: same index fields, same refusals, on every test file."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_ai.exceptions import IngestError
from dicom_ai.ingest.index import _WANTED, instance_record, parse_received, read_dataset
from dicom_ai.ingest.scan import NeedsFullParse, Truncated, scan
from tests.peers import make_ct_series, sample_file


def _request_uids(path: Path) -> tuple[str, str]:
    meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)


def _corpus() -> list[Path]:
    """Every .dcm file in pydicom's test files and the pydicom-data package (found on disk:
    pydicom's own listing would try to download files that are not installed)."""
    import data_store  # the pydicom-data package

    folders = [Path(pydicom.__file__).parent / "data" / "test_files",
               Path(data_store.__file__).parent / "data"]
    return sorted(p for folder in folders for p in folder.rglob("*.dcm") if _receivable(p))


def _receivable(path: Path) -> bool:
    """A Part 10 file whose meta names its SOP class and instance (what a C-STORE carries)."""
    try:
        _request_uids(path)
    except Exception:
        return False
    return True


FILES = _corpus()


def _pydicom_outcome(path: Path, cls: str, inst: str) -> object:
    try:
        return instance_record(read_dataset(path), sop_class_uid=cls, sop_instance_uid=inst)
    except IngestError as exc:
        return exc.status


def test_there_are_many_files_to_compare() -> None:
    """pydicom and pydicom-data provide the corpus (over 100 Part 10 files)."""
    assert len(FILES) > 100


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_scan_matches_pydicom(path: Path) -> None:
    """Where the scan decides, it gives what the pydicom path gives (record or refusal)."""
    cls, inst = _request_uids(path)
    try:
        scan(path, _WANTED)
    except NeedsFullParse:
        return  # parse_received uses pydicom itself for this file: nothing to compare
    except Truncated:
        # The scan also checks nested items and encapsulated fragments, which pydicom reads
        # lazily (it only warns): the scan may say 0xC000 where pydicom refuses otherwise, but
        # a file the scan refuses is never one the pydicom path would store.
        assert isinstance(_pydicom_outcome(path, cls, inst), int)
        return
    try:
        fast: object = parse_received(path, sop_class_uid=cls, sop_instance_uid=inst)
    except IngestError as exc:
        fast = exc.status
    assert fast == _pydicom_outcome(path, cls, inst)


def test_scan_takes_the_fast_path_for_common_files(tmp_path: Path) -> None:
    """Uncompressed CT and the usual compressed files are scanned without pydicom."""
    ct = make_ct_series(tmp_path, 1, size=16)[0]
    for path in [ct, *map(Path, map(sample_file, ["CT_small.dcm", "JPEG2000.dcm",
                                                   "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"]))]:
        found = scan(path, _WANTED)
        assert found.text(0x0020000D) == pydicom.dcmread(path).StudyInstanceUID


def test_truncation_anywhere_is_caught(tmp_path: Path) -> None:
    """Cutting a file at any point in its dataset is refused, by scan or by pydicom."""
    source = Path(sample_file("CT_small.dcm"))
    data = source.read_bytes()
    cls, inst = _request_uids(source)
    for cut in range(400, len(data) - 1, 997):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(IngestError):
            parse_received(path, sop_class_uid=cls, sop_instance_uid=inst)
