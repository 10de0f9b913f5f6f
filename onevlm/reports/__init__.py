"""Results written for other systems: routing metadata now; DICOM SR / SEG in later issues."""
