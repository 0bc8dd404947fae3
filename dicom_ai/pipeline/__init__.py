"""From received DICOM to model input: loading (series -> frames/volume) and preprocessing."""
