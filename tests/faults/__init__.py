"""The fault suite (issue 19): real faults injected into a running dicom-ai, results checked."""
