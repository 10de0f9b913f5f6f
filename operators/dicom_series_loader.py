"""MONAI Deploy operator: the DICOM files of the input folder, grouped into series.

Research use only: not for clinical use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from onevlm.imaging.series import load_study


class DicomSeriesLoaderOperator(Operator):
    """Read the headers of every DICOM file under a folder and group them into series.

    Why not the SDK's ``DICOMDataLoaderOperator``: it reads every file with its pixels into
    memory and stops the application on a truncated file; this one reads headers only and
    reports an unreadable file (naming it) while the rest of the study goes on.

    Named output:
        study: :class:`onevlm.imaging.series.StudyFiles` — the series (sorted in reading order)
            and the files that could not be read.
    """

    OUTPUT_NAME = "study"

    def __init__(self, fragment: Fragment, *args: Any, input_folder: str | Path, **kwargs: Any) -> None:
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output(self.OUTPUT_NAME)

    def compute(self, op_input, op_output, context) -> None:
        if not self.input_folder.exists():
            raise FileNotFoundError(f"input folder not found: {self.input_folder}")
        study = load_study([self.input_folder])
        self._logger.info("%d series and %d unreadable file(s) under %s", len(study.series), len(study.problems),
                          self.input_folder)
        op_output.emit(study, self.OUTPUT_NAME)
