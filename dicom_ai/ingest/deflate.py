"""Bounded inflation of Deflated Explicit VR Little Endian datasets (PS3.5 A.5).

In a deflated file everything after the file meta information is one raw deflate stream
(RFC 1951, no zlib header). pydicom inflates it whole, in memory, with ``zlib.decompress`` of
the rest of the file: a 1 MB stream of zeros that inflates to 1 GiB costs about 2 GB. Every
reader of an untrusted deflated file goes through this module first: the stream is inflated in
steps of at most :data:`STEP` bytes, the output counted (and discarded, or written to a
temporary file on the store's disk), and the reading stops as soon as the count exceeds the
configured ``[limits] max_inflated_bytes``. Memory is bounded by the step, never by what the
stream would inflate to.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
from pydicom.dataset import FileDataset
from pydicom.filereader import read_dataset, read_file_meta_info

from dicom_ai.config import LimitsSettings
from dicom_ai.exceptions import DicomAIError

#: Deflated Explicit VR Little Endian (PS3.5 A.5).
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
#: ``[limits] max_inflated_bytes`` when no settings are given.
DEFAULT_MAX_INFLATED_BYTES = LimitsSettings().max_inflated_bytes
#: Compressed bytes read from the file at a time.
CHUNK = 64 * 1024
#: The most inflated bytes one step produces (zlib's ``max_length``): the memory bound.
STEP = 1024 * 1024

# PS3.5 7.1.2: explicit VRs whose length field is 4 bytes (after 2 reserved bytes).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF


class InflateError(DicomAIError, ValueError):
    """A deflated dataset that cannot be inflated within bounds (the message has no values).

    A ValueError too: readers that refuse a malformed file on ``ValueError`` refuse this one.
    """


class InflateLimitError(InflateError):
    """The dataset inflates to more than the configured limit."""


class CorruptDeflateError(InflateError):
    """The deflate stream is corrupt, or ends before its final block."""


def dataset_start(source: BinaryIO) -> tuple[str, int]:
    """Read the file meta information (PS3.10 7.1) of a Part 10 file from its start.

    Only the element headers and the Transfer Syntax UID are read, so the cost does not depend
    on the length of any value.

    Parameters
    ----------
    source : binary file
        Positioned at the start of the file (the preamble).

    Returns
    -------
    tuple of (str, int)
        The Transfer Syntax UID and the offset of the first byte after the meta group.

    Raises
    ------
    InflateError
        No ``DICM`` prefix, or a meta element of undefined length or running past the end.
    """
    head = source.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise InflateError("not a Part 10 file (no DICM prefix)")
    position = 132
    transfer_syntax = ""
    while True:
        header = source.read(8)
        if len(header) < 8:
            break  # nothing after the meta group (or a fragment pydicom ignores too)
        group, element = struct.unpack("<HH", header[:4])
        if group != 0x0002:
            break
        vr = header[4:6]
        if vr in _LONG_VRS:
            extra = source.read(4)
            if len(extra) < 4:
                raise InflateError("file meta element header runs past the end")
            length, size = struct.unpack("<I", extra)[0], 12
        else:
            length, size = struct.unpack("<H", header[6:8])[0], 8
        if length == _UNDEFINED:
            raise InflateError("file meta element of undefined length")
        value = source.read(length)
        if len(value) < length:
            raise InflateError("file meta element runs past the end")
        if element == 0x0010:
            transfer_syntax = value.decode("ascii", "replace").rstrip(" \x00")
        position += size + length
    source.seek(position)
    return transfer_syntax, position


def inflate(source: BinaryIO, limit: int, sink: Callable[[bytes], object] | None = None) -> int:
    """Inflate a raw deflate stream in bounded steps, counting (and passing on) the output.

    Parameters
    ----------
    source : binary file
        Positioned at the first byte of the stream (the dataset of a deflated file).
    limit : int
        The most inflated bytes allowed (``[limits] max_inflated_bytes``).
    sink : callable, optional
        Receives each inflated piece (at most :data:`STEP` bytes); None: discarded.

    Returns
    -------
    int
        The inflated size (bytes after the end of the stream, such as the pad byte PS3.5 A.5
        allows, are ignored, as pydicom ignores them).

    Raises
    ------
    InflateLimitError
        As soon as the inflated size exceeds `limit` (the rest is not inflated).
    CorruptDeflateError
        Invalid deflate data, or the file ends before the stream's final block.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    full = False
    while not inflater.eof:
        if inflater.unconsumed_tail:
            data = inflater.unconsumed_tail
        elif full:
            data = b""  # all input consumed but the last step was full: output may be pending
        else:
            data = source.read(CHUNK)
            if not data:
                raise CorruptDeflateError(
                    f"the deflate stream ends early (after {total} inflated bytes)")
        try:
            piece = inflater.decompress(data, STEP)
        except zlib.error:
            raise CorruptDeflateError(
                f"the deflate stream is corrupt (invalid data after {total} inflated bytes)"
            ) from None
        full = len(piece) == STEP
        total += len(piece)
        if total > limit:
            raise InflateLimitError(
                f"the deflated dataset inflates to more than {limit} bytes "
                "([limits] max_inflated_bytes)")
        if sink is not None and piece:
            sink(piece)
    return total


def deflated_size(path: Path, limit: int) -> int | None:
    """Check a file before any whole read: the inflated size if deflated, else None.

    The stream is inflated and counted, the output discarded: memory stays at one step
    whatever the stream inflates to.

    Parameters
    ----------
    path : Path
        A Part 10 file.
    limit : int
        ``[limits] max_inflated_bytes``.

    Returns
    -------
    int or None
        The inflated dataset size of a deflated file; None for any other transfer syntax (and
        for a file whose meta cannot be read: its reader refuses it).

    Raises
    ------
    InflateError
        Deflated, and above `limit` or corrupt.
    OSError
        The file cannot be read.
    """
    with path.open("rb") as source:
        try:
            transfer_syntax, _ = dataset_start(source)
        except InflateError:
            return None
        if transfer_syntax != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            return None
        return inflate(source, limit)


@contextmanager
def inflated_copy(path: Path, offset: int, limit: int, directory: Path
                  ) -> Iterator[tuple[BinaryIO, int]]:
    """The inflated dataset of a deflated file, in an anonymous temporary file.

    Call after :func:`deflated_size` accepted the file (a bomb is then refused before any disk
    write); the limit is enforced again here all the same.

    Parameters
    ----------
    path : Path
        The deflated Part 10 file.
    offset : int
        Where its dataset (the deflate stream) starts.
    limit : int
        ``[limits] max_inflated_bytes``.
    directory : Path
        Where the temporary file goes: a folder on the store's disk, never a RAM-backed /tmp.

    Yields
    ------
    tuple of (binary file, int)
        The temporary file (flushed, at offset 0) and the inflated size. It is deleted on exit.
    """
    with path.open("rb") as source, tempfile.TemporaryFile(dir=directory) as inflated:
        source.seek(offset)
        size = inflate(source, limit, inflated.write)
        inflated.flush()
        inflated.seek(0)
        yield cast(BinaryIO, inflated), size


def dcmread_bounded(path: Path, limit: int, directory: Path) -> FileDataset:
    """pydicom's ``dcmread``, with a deflated dataset inflated within `limit` first.

    For a file about to be sent (C-GET, C-MOVE). Any other transfer syntax is read by
    ``dcmread`` unchanged. A deflated one is inflated and counted (a bomb is refused before
    anything is written), then inflated to an anonymous temporary file in `directory`, from
    which pydicom reads the dataset: the inflated dataset is held once (its values), where
    ``dcmread`` holds it twice (the inflated buffer, which it keeps, and the values).

    Parameters
    ----------
    path : Path
        A stored Part 10 file.
    limit : int
        ``[limits] max_inflated_bytes``.
    directory : Path
        Where the temporary file goes (the store's ``incoming/`` folder).

    Returns
    -------
    FileDataset
        The dataset with its file meta (the transfer syntax as stored).

    Raises
    ------
    InflateError
        Deflated, and above `limit` or corrupt (a ValueError, as pydicom's own refusals).
    """
    with path.open("rb") as source:
        try:
            transfer_syntax, offset = dataset_start(source)
        except InflateError:
            transfer_syntax = ""  # not a Part 10 file this reader understands: pydicom decides
        if transfer_syntax != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            return pydicom.dcmread(path)
        inflate(source, limit)
    meta = read_file_meta_info(path)
    with inflated_copy(path, offset, limit, directory) as (inflated, _):
        dataset = read_dataset(inflated, is_implicit_VR=False, is_little_endian=True)
    ds = FileDataset(path, dataset, file_meta=meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset.original_character_set)
    return ds
