"""A de-identified training set from an archive: ``dicom-ai batch export``.

::

    batch (kind "export": studies are retrieved but never routed to models)
      -> every retrieved instance de-identified (:mod:`dicom_ai.batch.deidentify`, PS3.15
         Basic Application Level Confidentiality Profile, dates shifted per patient, UIDs
         remapped consistently); burned-in-annotation images excluded
      -> OUT/<study>/<series>/<sop>.dcm and OUT/labels.csv, which ``dicom-ai train`` reads
      -> the re-identification mapping (salt, UIDs, pseudonyms, shifts) written OUTSIDE OUT

Labels come from a CSV keyed by ``AccessionNumber`` or ``StudyInstanceUID`` (one ``label`` per
study, 0 or 1); a study without a label is left out and counted.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from dicom_ai.batch.deidentify import DeidentificationRefused, Deidentifier
from dicom_ai.exceptions import ConfigError
from storage import batches, jobs
from storage.db import Database
from storage.filestore import FileStore

__all__ = ["ExportReport", "export_training_set", "read_study_labels"]


def read_study_labels(path: Path) -> dict[str, str]:
    """``{AccessionNumber or StudyInstanceUID: "0"|"1"}`` from a labels CSV.

    Raises
    ------
    ConfigError
        No ``label`` column, no key column, or a label that is not 0/1.
    """
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        keys = [k for k in ("StudyInstanceUID", "AccessionNumber") if k in columns]
        if "label" not in columns or not keys:
            raise ConfigError(f"{path}: needs a label column and an AccessionNumber or "
                              "StudyInstanceUID column")
        labels: dict[str, str] = {}
        for row in reader:
            value = (row.get("label") or "").strip()
            if value not in ("0", "1"):
                raise ConfigError(f"{path}: label {value!r} is not 0 or 1")
            for key in keys:
                if (row.get(key) or "").strip():
                    labels[(row[key] or "").strip()] = value
    return labels


@dataclass
class ExportReport:
    """What an export wrote and left out."""

    out: Path
    mapping: Path
    studies: int = 0
    instances: int = 0
    excluded: Counter[str] = field(default_factory=Counter)
    unlabelled_studies: int = 0


def export_training_set(db: Database, store: FileStore, batch_id: int, labels_csv: Path,
                        out: Path, mapping_path: Path) -> ExportReport:
    """Write the de-identified training set of a retrieved export batch.

    Parameters
    ----------
    db : Database
        The shared database (the batch and the index of its studies).
    store : FileStore
        Where the retrieved instances are.
    batch_id : int
        An export batch whose studies were retrieved.
    labels_csv : Path
        Study labels (see :func:`read_study_labels`).
    out : Path
        The export folder (created; must be empty or new).
    mapping_path : Path
        Where the re-identification mapping goes; must not be inside `out`.

    Returns
    -------
    ExportReport

    Raises
    ------
    ConfigError
        Bad labels, a mapping path inside the export, or a non-empty export folder.
    """
    out, mapping_path = out.resolve(), mapping_path.resolve()
    if mapping_path.is_relative_to(out):
        raise ConfigError(f"the re-identification mapping {mapping_path} must be outside the "
                          f"export folder {out}")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export folder {out} is not empty")
    labels = read_study_labels(labels_csv)
    out.mkdir(parents=True, exist_ok=True)
    deid = Deidentifier(salt=secrets.token_bytes(32))
    report = ExportReport(out=out, mapping=mapping_path)
    rows: list[dict[str, str]] = []
    with db.sessions() as session:
        found = [r for r in batches.studies(session, batch_id)
                 if r.state == batches.RETRIEVED]
        session.expunge_all()
    for study in found:
        label = labels.get(study.study_instance_uid) or labels.get(study.accession_number)
        if label is None:
            report.unlabelled_studies += 1
            continue
        with db.sessions() as session:
            series_uids = [s.series_instance_uid
                           for s in jobs.series_of_study(session, study.study_instance_uid)]
            paths = jobs.instance_paths(session, series_uids)
        wrote = 0
        for relative in paths:
            ds = dcmread(store.absolute(relative))
            try:
                clean = deid.deidentify(ds)
            except DeidentificationRefused as exc:
                report.excluded[str(exc)] += 1
                continue
            target = (out / str(clean.StudyInstanceUID) / str(clean.SeriesInstanceUID)
                      / f"{clean.SOPInstanceUID}.dcm")
            target.parent.mkdir(parents=True, exist_ok=True)
            clean.save_as(target, enforce_file_format=True)
            rows.append({"StudyInstanceUID": str(clean.StudyInstanceUID),
                         "SeriesInstanceUID": str(clean.SeriesInstanceUID),
                         "SOPInstanceUID": str(clean.SOPInstanceUID), "label": label})
            wrote += 1
        report.instances += wrote
        report.studies += wrote > 0
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["StudyInstanceUID", "SeriesInstanceUID",
                                                "SOPInstanceUID", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "EXPORT.json").write_text(json.dumps({
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile, "
                   "Retain Longitudinal Temporal Information with Modified Dates",
        "studies": report.studies, "instances": report.instances,
        "excluded": dict(report.excluded), "unlabelled_studies": report.unlabelled_studies,
    }, indent=2) + "\n")
    mapping_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(mapping_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:  # readable by its owner only: it re-identifies
        json.dump({"salt": deid.salt.hex(), "mapping": deid.mapping}, fh, indent=1,
                  default=str)
    return report
