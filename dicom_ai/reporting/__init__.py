"""Result objects of a model run: TID 1500 SR, SEG and heat-map Secondary Capture.

Builders take a :class:`~dicom_ai.values.ModelRun` plus the source image headers (pixel
data not needed) and return pydicom datasets built with highdicom that pass ``dsrdump -v +Pt`` and
``dciodvfy``; :func:`summarize_sr` reads an SR back.
"""

from dicom_ai.reporting.capture import build_heatmap_capture
from dicom_ai.reporting.codes import procedure_reported, to_code
from dicom_ai.reporting.seg import build_seg, has_segments
from dicom_ai.reporting.sr import PriorReport, ReportedFinding, SRKind, build_sr, summarize_sr

__all__ = [
    "PriorReport",
    "ReportedFinding",
    "SRKind",
    "build_heatmap_capture",
    "build_seg",
    "build_sr",
    "has_segments",
    "procedure_reported",
    "summarize_sr",
    "to_code",
]
