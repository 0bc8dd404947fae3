"""Coded concepts the result objects use (PS3.16 CID 100, CID 7464, TID 1500/1501).

Every concept here is checked against pydicom's or highdicom's code dictionaries, or is one the
standard names explicitly for the template row it fills.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_ai.values import CodedConcept

__all__ = [
    "ABSENT",
    "ALGORITHM_FAMILY",
    "ATTENUATION_COEFFICIENT",
    "CENTER_OF_MASS",
    "CUBIC_MILLIMETER",
    "HOUNSFIELD_UNIT",
    "LONG_AXIS",
    "MEAN",
    "MILLIMETER",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "NO_UNITS",
    "PRESENT",
    "PROBABILITY",
    "VOLUME",
    "from_code",
    "procedure_reported",
    "to_code",
]

#: (122157, DCM, "Probability"): the measurement carrying the model's probability.
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
#: UCUM "1": the unit of a probability (a dimensionless ratio in [0, 1]).
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
#: SCT Present / Absent (CID 230 "Yes-No" style values of a qualitative evaluation).
PRESENT = hd.sr.CodedConcept.from_code(codes.SCT.Present)
ABSENT = hd.sr.CodedConcept.from_code(codes.SCT.Absent)
#: Segmented property category of a finding segment (CID 7150).
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = hd.sr.CodedConcept(
    "49755003", "SCT", "Morphologically abnormal structure"
)
#: Algorithm family of a segment's algorithm identification (CID 7162).
ALGORITHM_FAMILY = hd.sr.CodedConcept.from_code(codes.DCM.ArtificialIntelligence)

# Measurements of a volume region (TID 1411 -> TID 1419 -> TID 300).
#: (118565006, SCT, "Volume") (CID 7472 Volume Measurement), in UCUM mm3.
VOLUME = hd.sr.CodedConcept.from_code(codes.SCT.Volume)
CUBIC_MILLIMETER = hd.sr.CodedConcept.from_code(codes.UCUM.CubicMillimeter)
#: (103339001, SCT, "Long axis") (CID 7470 Linear Measurement): the longest diameter in the
#: image (axial) plane, as RECIST measures it and dcmjs/OHIF code a bidirectional's long axis.
LONG_AXIS = hd.sr.CodedConcept.from_code(codes.SCT.LongAxis)
MILLIMETER = hd.sr.CodedConcept.from_code(codes.UCUM.Millimeter)
#: (112031, DCM, "Attenuation Coefficient") with Derivation (121401, DCM) "Mean" (373098007,
#: SCT; CID 7464): the mean CT number inside a region, in UCUM [hnsf'U].
ATTENUATION_COEFFICIENT = hd.sr.CodedConcept.from_code(codes.DCM.AttenuationCoefficient)
MEAN = hd.sr.CodedConcept.from_code(codes.SCT.Mean)
HOUNSFIELD_UNIT = hd.sr.CodedConcept.from_code(codes.UCUM.HounsfieldUnit)
#: (128138, DCM, "Center of Mass") (CID 219): names the SCOORD3D POINT of a region's centroid.
CENTER_OF_MASS = hd.sr.CodedConcept.from_code(codes.DCM.CenterOfMass)

# Procedure reported (TID 1500 row 2, DCID 100). SCT 168537006 is "Plain radiography" (pydicom's
# dictionary); "Plain chest X-ray" is its own concept, SCT 399208008.
_PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
_PLAIN_RADIOGRAPHY = hd.sr.CodedConcept.from_code(codes.SCT.PlainRadiography)
_CT = hd.sr.CodedConcept("77477000", "SCT", "Computerized axial tomography")
_MR = hd.sr.CodedConcept("113091000", "SCT", "Magnetic resonance imaging")
_IMAGING_PROCEDURE = hd.sr.CodedConcept.from_code(codes.SCT.ImagingProcedure)
_PROJECTION_MODALITIES = frozenset({"CR", "DX", "RG"})


def to_code(concept: CodedConcept) -> hd.sr.CodedConcept:
    """Convert a model spec's concept to a highdicom Code Sequence item (PS3.3 8.8).

    Parameters
    ----------
    concept : CodedConcept
        Code value, coding scheme designator and code meaning.

    Returns
    -------
    highdicom.sr.CodedConcept
    """
    return hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)


def from_code(code: hd.sr.CodedConcept) -> tuple[str, str, str]:
    """The ``(value, scheme, meaning)`` triple of a Code Sequence item (PS3.3 8.8).

    Parameters
    ----------
    code : highdicom.sr.CodedConcept
        A code read from an SR.

    Returns
    -------
    tuple of str
    """
    return (str(code.value), str(code.scheme_designator), str(code.meaning))


def procedure_reported(source: Dataset) -> hd.sr.CodedConcept:
    """The TID 1500 "Procedure reported" for a source image (PS3.16 TID 1500, DCID 100).

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        A source image header (Modality, BodyPartExamined).

    Returns
    -------
    highdicom.sr.CodedConcept
        Plain chest X-ray for CR/DX chest, plain radiography for other projection images,
        CT, MR, else the generic "Imaging procedure".
    """
    modality = str(source.get("Modality", "") or "").strip().upper()
    body_part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    if modality in _PROJECTION_MODALITIES:
        return _PLAIN_CHEST_XRAY if body_part in ("CHEST", "THORAX") else _PLAIN_RADIOGRAPHY
    if modality == "CT":
        return _CT
    if modality == "MR":
        return _MR
    return _IMAGING_PROCEDURE
