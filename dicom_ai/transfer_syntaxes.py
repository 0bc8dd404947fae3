"""Transfer syntaxes, listed once: what the receiver accepts, what a retrieve offers, which
ones the header scan reads itself, and which package decodes each.

pydicom's names (``pydicom.uid``), no pynetdicom: :mod:`dicom_ai.network` builds its presentation
contexts from these lists. As an acceptor pynetdicom picks, per proposed context, the first
syntax of its own list that the requestor offered: the order of :data:`ACCEPTED` is our
preference. Compressed syntaxes are accepted and stored exactly as sent (never transcoded).
:mod:`dicom_ai.ingest.scan` uses :data:`LITTLE_ENDIAN`; :mod:`dicom_ai.pipeline.loading` uses
:data:`JPEG2000_FAMILY`, :data:`JPEG_FAMILY` and :data:`DECODERS`.
"""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = ["ACCEPTED", "DECODERS", "DECODER_12BIT_JPEG", "JPEG2000_FAMILY", "JPEG_FAMILY",
           "LITTLE_ENDIAN", "NATIVE", "RETRIEVE", "UNCOMPRESSED"]

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

#: Every syntax pydicom knows whose dataset is little endian and not deflated (Implicit VR Little
#: Endian, Explicit VR Little Endian and the encapsulated ones): what the header scan reads
#: itself; anything else goes to pydicom.
LITTLE_ENDIAN: frozenset[str] = frozenset(
    str(uid) for uid in AllTransferSyntaxes if uid.is_little_endian and not uid.is_deflated)

#: JPEG 2000 and High-Throughput JPEG 2000 (PS3.5 A.4): each frame is a codestream whose SIZ
#: marker segment declares the image size (ISO/IEC 15444-1 A.5.1).
JPEG2000_FAMILY: frozenset[str] = frozenset({
    JPEG2000Lossless, JPEG2000, JPEG2000MCLossless, JPEG2000MC, HTJ2KLossless,
    HTJ2KLosslessRPCL, HTJ2K,
})
#: JPEG (ITU-T T.81) and JPEG-LS (ITU-T T.87) (PS3.5 A.4): each frame is a codestream whose SOF
#: marker segment declares the image size.
JPEG_FAMILY: frozenset[str] = frozenset({
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
    JPEGLSNearLossless,
})

_GDCM = "python-gdcm"
_OPENJPEG = "pylibjpeg-openjpeg"
_NATIVE_PIXELS = "pydicom itself (uncompressed)"

#: The package that decodes each syntax's pixel data, among those the project installs (PS3.5
#: section 10): named in the error when decoding fails.
DECODERS: dict[str, str] = {
    JPEGBaseline8Bit: f"pillow or {_GDCM}",
    JPEGExtended12Bit: f"pillow or {_GDCM}",  # 8-bit samples; 12-bit: DECODER_12BIT_JPEG
    JPEGLossless: _GDCM,
    JPEGLosslessSV1: _GDCM,
    JPEGLSLossless: f"pyjpegls or {_GDCM}",
    JPEGLSNearLossless: f"pyjpegls or {_GDCM}",
    **dict.fromkeys(sorted(JPEG2000_FAMILY), _OPENJPEG),
    RLELossless: "pylibjpeg-rle (pydicom also decodes RLE natively)",
    **dict.fromkeys(NATIVE, _NATIVE_PIXELS),
    DeflatedExplicitVRLittleEndian: "pydicom itself (deflated, uncompressed pixels)",
}
#: JPEG Extended with 12-bit samples: gdcm refuses it, pylibjpeg-libjpeg is GPL (not installed).
DECODER_12BIT_JPEG = "pylibjpeg-libjpeg (GPL, not installed by default)"
