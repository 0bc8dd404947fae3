"""Transfer syntaxes, listed once: what the receiver accepts, what a retrieve offers.

pydicom's names (``pydicom.uid``), no pynetdicom: :mod:`dicom_ai.network` builds its presentation
contexts from these lists. As an acceptor pynetdicom picks, per proposed context, the first
syntax of its own list that the requestor offered: the order of :data:`ACCEPTED` is our
preference. Compressed syntaxes are accepted and stored exactly as sent (never transcoded).
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = ["ACCEPTED", "NATIVE", "RETRIEVE", "UNCOMPRESSED"]

#: The native (not encapsulated, not deflated) syntaxes: a dataset stored in one can be sent in
#: any other (pynetdicom re-encodes it).
NATIVE: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)

#: The uncompressed syntaxes in the receiver's order of preference.
UNCOMPRESSED: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                 DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)

#: Every transfer syntax pydicom knows, uncompressed first (what the receiver accepts).
ACCEPTED: tuple[str, ...] = UNCOMPRESSED + tuple(
    str(ts) for ts in AllTransferSyntaxes if ts not in UNCOMPRESSED)

#: What a C-GET offers to receive: uncompressed, then the lossless and lossy syntaxes archives
#: store most. Offering all ~35 syntaxes for 127 classes makes a ~150 kB association request
#: that costs the archive and us a quarter of a second per study; an archive holding another
#: syntax transcodes or reports a failed sub-operation.
RETRIEVE: tuple[str, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless,
    RLELossless, JPEGLosslessSV1, JPEGLossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000,
    JPEGLSNearLossless, DeflatedExplicitVRLittleEndian,
)
