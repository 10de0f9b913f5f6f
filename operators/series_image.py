"""MONAI Deploy operator: each series to the image the router sees (DICOM or whole-slide).

Research use only: not for clinical use.
"""

from __future__ import annotations

from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from onevlm.study.preparation import PreparedStudy, prepare_series


class SeriesImageOperator(Operator):
    """Pick each series' representative image and decode it when the backend reads pixels.

    Non-image series (SR, RT plan, ECG…) are recognised and skipped; a whole-slide series is
    shown as a thumbnail of the slide; undecodable pixels become an error for that series only.

    Named input:
        study: :class:`onevlm.imaging.series.StudyFiles`.
    Named output:
        prepared: :class:`onevlm.study.preparation.PreparedStudy`.
    """

    INPUT_NAME = "study"
    OUTPUT_NAME = "prepared"

    def __init__(self, fragment: Fragment, *args: Any, decode_pixels: bool, **kwargs: Any) -> None:
        self.decode_pixels = decode_pixels
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT_NAME)
        spec.output(self.OUTPUT_NAME)

    def compute(self, op_input, op_output, context) -> None:
        study = op_input.receive(self.INPUT_NAME)
        prepared = prepare_series(study.series, self.decode_pixels)
        op_output.emit(PreparedStudy(tuple(prepared), study.problems), self.OUTPUT_NAME)
