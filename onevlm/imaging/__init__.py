"""Inputs to the images a VLM sees."""

from onevlm.imaging.dicom_to_image import ImageConversionError, dicom_to_image, load_image

__all__ = ["ImageConversionError", "dicom_to_image", "load_image"]
