"""dicom-ai: a DICOM-native PACS integration service for medical-imaging AI."""

__version__ = "0.1.0"
