"""MONAI Deploy operators that wrap the onevlm core for an application package.

These operators are thin: the logic lives in :mod:`onevlm` (which never imports
``monai.deploy``); here it is only adapted to the MONAI Deploy App SDK 4.x operator API.

Research use only: nothing these operators emit or write is for clinical use.
"""

from operators.dicom_series_loader import DicomSeriesLoaderOperator
from operators.router_operator import RouterOperator
from operators.dicom_results_writer import DicomResultsWriterOperator
from operators.series_image import SeriesImageOperator
from operators.specialty_operator import SpecialtyOperator

__all__ = ["DicomSeriesLoaderOperator", "RouterOperator", "DicomResultsWriterOperator", "SeriesImageOperator",
           "SpecialtyOperator"]
