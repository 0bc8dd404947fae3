"""DICOM networking: the only package that imports pynetdicom."""
