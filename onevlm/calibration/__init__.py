"""Calibration: stage cutoffs (Algorithm 2), ECE and reliability diagrams."""

from onevlm.calibration.cutoffs import CutoffFit, CutoffRow, Cutoffs, fit_cutoffs, label_for, sweep
from onevlm.calibration.ece import EceResult, bin_index, expected_calibration_error

__all__ = [
    "CutoffFit",
    "CutoffRow",
    "Cutoffs",
    "EceResult",
    "bin_index",
    "expected_calibration_error",
    "fit_cutoffs",
    "label_for",
    "sweep",
]
