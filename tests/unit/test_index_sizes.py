"""The index fields are clipped to the sizes the index's columns declare (one declaration)."""

from __future__ import annotations

import dataclasses

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_ai.ingest.index import FIELD_SIZES, instance_record
from storage.repository import InstanceRecord

CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.mark.filterwarnings("ignore:.*(exceeds the maximum|Invalid value for VR)")
def test_every_text_field_is_clipped_to_its_column() -> None:
    texts = [f.name for f in dataclasses.fields(InstanceRecord) if f.type in (str, "str")]
    assert set(texts) <= set(FIELD_SIZES), set(texts) - set(FIELD_SIZES)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_uid = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CR, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                    "StudyDescription", "ReferringPhysicianName", "Modality",
                    "BodyPartExamined", "SeriesDescription", "SeriesDate"):
        setattr(ds, keyword, "9" * 400)  # vendors break VR length rules: read tolerantly
    record = instance_record(ds, sop_class_uid=CR, sop_instance_uid=sop_uid)  # type: ignore[arg-type]
    for name in texts:
        if name.endswith("_uid"):
            continue
        assert len(getattr(record, name)) == FIELD_SIZES[name], name
