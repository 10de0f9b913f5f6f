"""MONAI Deploy applications built on onevlm. Research use only: not for clinical use."""
