"""Deflated Explicit VR Little Endian test files, bombs included, written as a stream.

A decompression bomb is a small deflate stream that inflates to a huge dataset: here a
Secondary Capture whose Pixel Data is `side` x `side` zero bytes. The stream is produced
incrementally with :func:`zlib.compressobj`, so writing a 1 GiB bomb (about 1 MB on disk) never
holds more than one chunk of zeros in memory.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, DeflatedExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MIB = 1024 * 1024
_CHUNK = 4 * MIB


def bomb_dataset(side: int, *, study_uid: str | None = None) -> Dataset:
    """A Secondary Capture header declaring `side` x `side` 8-bit pixels (no Pixel Data)."""
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BOMB-1"
    ds.PatientName = "Bomb^Deflate"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = side
    ds.Columns = side
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return ds


def write_deflated(path: Path, ds: Dataset, *, zeros: int = 0, truncate: int = 0,
                   declared: int | None = None) -> Path:
    """Write `ds` as a deflated Part 10 file, with `zeros` bytes of zero Pixel Data after it.

    Parameters
    ----------
    path : Path
        Where to write.
    ds : Dataset
        The dataset (no element above (7FE0,0010) when `zeros` is given).
    zeros : int
        Length of an OB Pixel Data element of zeros appended (0: none).
    truncate : int
        Bytes cut from the end of the deflate stream (a truncated stream).
    declared : int, optional
        The Pixel Data length written in its header, if not `zeros` (a complete stream of a
        truncated dataset).

    Returns
    -------
    Path
        `path`.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    header = encoded.getvalue()
    if zeros:
        length = zeros if declared is None else declared
        header += b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", length)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = [compressor.compress(header)]
    chunk = bytes(min(_CHUNK, zeros))
    left = zeros
    while left:
        piece = chunk if left >= len(chunk) else chunk[:left]
        stream.append(compressor.compress(piece))
        left -= len(piece)
    stream.append(compressor.flush())
    deflated = b"".join(stream)
    if truncate:
        deflated = deflated[:-truncate]
    prefix = DicomBytesIO()
    prefix.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(prefix, meta, enforce_standard=True)
    path.write_bytes(prefix.getvalue() + deflated)
    return path


def write_bomb(path: Path, side: int, *, study_uid: str | None = None) -> Dataset:
    """A deflated Secondary Capture of `side` x `side` zero pixels; its header dataset."""
    ds = bomb_dataset(side, study_uid=study_uid)
    write_deflated(path, ds, zeros=side * side)
    return ds
