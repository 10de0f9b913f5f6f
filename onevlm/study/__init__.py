"""A study (a folder or a C-STORE batch of DICOM files) routed series by series, and its outputs."""

from onevlm.study.outputs import StudyOutputs, write_study_outputs
from onevlm.study.routing import SeriesRouting, StudyRouting, route_study

__all__ = ["SeriesRouting", "StudyOutputs", "StudyRouting", "route_study", "write_study_outputs"]
