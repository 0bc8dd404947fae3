"""A fast structural scan of received Part 10 files (the common transfer syntaxes).

Parsing every element with pydicom costs about 2 ms for a typical CT header, the largest share
of a C-STORE's handling time. The receiver needs much less: the structure must be intact (no
element runs past the end of the data) and about twenty top-level values must be read. This
module walks element headers with :mod:`struct` for little-endian datasets (Explicit or Implicit
VR, native or encapsulated pixel data) and returns the raw bytes of the wanted tags.

Anything it does not handle exactly (big-endian datasets, undefined-length UN, non-ASCII text,
odd structures) raises :class:`NeedsFullParse`, and the caller falls back to pydicom. A deflated
file raises :class:`Deflated`: the caller inflates it within bounds and scans the inflated
dataset with :func:`scan_dataset`. ``tests/unit/test_scan.py`` checks the two paths agree on
every pydicom test file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_ai.transfer_syntaxes import LITTLE_ENDIAN

# PS3.5 7.1.2: explicit VRs whose length field is 4 bytes (after 2 reserved bytes).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_HEADER = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class NeedsFullParse(Exception):  # noqa: N818 - a signal to fall back, not an error
    """The scan cannot decide exactly; parse with pydicom instead."""


class Deflated(NeedsFullParse):
    """The dataset is deflated: inflate it within bounds (:mod:`dicom_ai.ingest.deflate`)."""

    def __init__(self, offset: int) -> None:
        super().__init__("deflated dataset")
        #: Where the deflate stream starts in the file.
        self.offset = offset


class Truncated(ValueError):  # noqa: N818 - the name says what the file is
    """An element runs past the end of the data."""


@dataclass(frozen=True)
class Scan:
    """What the scan found: the transfer syntax and the wanted top-level values (raw bytes)."""

    transfer_syntax_uid: str
    values: dict[int, bytes]

    def text(self, tag: int) -> str:
        """A value as text: ASCII, trailing spaces and NULs removed ("" if absent).

        Raises
        ------
        NeedsFullParse
            If the value is not plain ASCII (its character set needs pydicom's decoding).
        """
        raw = self.values.get(tag)
        if raw is None:
            return ""
        if any(b >= 0x80 or b == 0x1B for b in raw):
            raise NeedsFullParse(f"non-ASCII text in ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        return raw.decode("ascii").rstrip(" \x00")


# What the walk reads: the file's bytes, or a memory map of an inflated dataset.
_Data = bytes | mmap.mmap


def _meta(data: _Data) -> tuple[str, int]:
    """The transfer syntax and the dataset's offset, from the file meta group (explicit LE)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise NeedsFullParse("no DICM prefix")
    pos = 132
    transfer_syntax = ""
    while pos + 8 <= len(data):
        group, element = _HEADER.unpack_from(data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length, pos = _U32.unpack_from(data, pos + 8)[0], pos + 12
        else:
            length, pos = _U16.unpack_from(data, pos + 6)[0], pos + 8
        if length == _UNDEFINED or pos + length > len(data):
            raise NeedsFullParse("odd file meta")
        if element == 0x0010:
            transfer_syntax = data[pos : pos + length].decode("ascii", "replace").rstrip(" \x00")
        pos += length
    if not transfer_syntax:
        raise NeedsFullParse("no transfer syntax")
    return transfer_syntax, pos


def _elements(data: _Data, pos: int, implicit: bool, wanted: frozenset[int] | None,
              found: dict[int, bytes]) -> int:
    """Walk elements from `pos` until the data ends or an item/delimiter tag; return the end."""
    size = len(data)
    while pos < size:
        if pos + 8 > size:
            raise Truncated(f"element header at byte {pos} runs past the end")
        group, element = _HEADER.unpack_from(data, pos)
        tag = group << 16 | element
        if group == 0xFFFE:
            return pos
        if implicit:
            length, pos = _U32.unpack_from(data, pos + 4)[0], pos + 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > size:
                    raise Truncated(f"element header at byte {pos} runs past the end")
                length, pos = _U32.unpack_from(data, pos + 8)[0], pos + 12
                if length == _UNDEFINED and vr == b"UN":
                    raise NeedsFullParse("undefined-length UN")
            elif not vr.isalpha() or not vr.isupper():
                raise NeedsFullParse(f"unexpected VR bytes {vr!r}")
            else:
                length, pos = _U16.unpack_from(data, pos + 6)[0], pos + 8
        if length == _UNDEFINED:
            pos = _sequence(data, pos, implicit)
            continue
        if pos + length > size:
            raise Truncated(
                f"element ({group:04X},{element:04X}) declares {length} bytes, "
                f"{size - pos} remain"
            )
        if wanted is not None and tag in wanted:
            found[tag] = data[pos : pos + length]
        pos += length
    return pos


def _sequence(data: _Data, pos: int, implicit: bool) -> int:
    """Skip the items of an undefined-length sequence (or encapsulated pixel data)."""
    size = len(data)
    while True:
        if pos + 8 > size:
            raise Truncated("sequence without its delimiter")
        group, element = _HEADER.unpack_from(data, pos)
        length = _U32.unpack_from(data, pos + 4)[0]
        tag, pos = group << 16 | element, pos + 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise NeedsFullParse(f"unexpected tag ({group:04X},{element:04X}) in a sequence")
        if length != _UNDEFINED:
            if pos + length > size:
                raise Truncated("an item runs past the end")
            pos += length
            continue
        pos = _elements(data, pos, implicit, None, {})
        if pos + 8 > size or (_HEADER.unpack_from(data, pos) != (0xFFFE, 0xE00D)):
            raise Truncated("item without its delimiter")
        pos += 8


def scan_dataset(data: _Data, offset: int, transfer_syntax_uid: str,
                 wanted: frozenset[int]) -> Scan:
    """Check a little-endian dataset's structure and read the wanted top-level values.

    Parameters
    ----------
    data : bytes or mmap.mmap
        The encoded dataset (a whole file, or an inflated deflated dataset mapped from disk).
    offset : int
        Where the dataset starts in `data`.
    transfer_syntax_uid : str
        The file's transfer syntax (only whether it is Implicit VR matters here).
    wanted : frozenset of int
        Tags (``group << 16 | element``) whose raw values to return.

    Returns
    -------
    Scan
        The transfer syntax and the raw values found.

    Raises
    ------
    Truncated
        An element, item or sequence runs past the end of the data.
    NeedsFullParse
        An unusual structure (see the module docstring).
    """
    found: dict[int, bytes] = {}
    end = _elements(data, offset, transfer_syntax_uid == ImplicitVRLittleEndian, wanted, found)
    if end != len(data):
        raise NeedsFullParse("item or delimiter tag at the top level")
    return Scan(transfer_syntax_uid, found)


def scan(path: Path, wanted: frozenset[int]) -> Scan:
    """Check a received file's structure and read the wanted top-level values.

    The file meta group is read here, the dataset by :func:`scan_dataset` when its transfer
    syntax is one of :data:`dicom_ai.transfer_syntaxes.LITTLE_ENDIAN`.

    Parameters
    ----------
    path : Path
        A Part 10 file.
    wanted : frozenset of int
        As for :func:`scan_dataset`.

    Returns
    -------
    Scan
        As from :func:`scan_dataset`.

    Raises
    ------
    Deflated
        The dataset is deflated (never inflated here: see :mod:`dicom_ai.ingest.deflate`).
    NeedsFullParse
        The file needs pydicom (big endian, an unknown syntax, an unusual structure).
    Truncated
        An element, item or sequence runs past the end of the file.
    """
    data = path.read_bytes()
    transfer_syntax, pos = _meta(data)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        raise Deflated(pos)
    if transfer_syntax not in LITTLE_ENDIAN:
        raise NeedsFullParse(f"transfer syntax {transfer_syntax}")
    return scan_dataset(data, pos, transfer_syntax, wanted)
