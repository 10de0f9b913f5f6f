"""The always-on service: DICOM listener (C-STORE in), study assembly, pipeline, export (C-STORE out)."""
