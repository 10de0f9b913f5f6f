"""DICOM header reading and SOP-class knowledge shared by the router and the app."""
