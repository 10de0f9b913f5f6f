"""onevlm: one medical vision-language model as a calibrated model-card router and a specialty model.

Research use only: not for clinical diagnosis.
"""

__version__ = "0.1.0"
