"""A bounding box found by a model, as every result object (SR, SEG, bulk annotations) takes it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Labels end up in LO attributes (Code Meaning, Segment Label): at most 64 characters.
MAX_LABEL = 64


@dataclass(frozen=True)
class ImageBox:
    """An axis-aligned box in pixel coordinates: columns ``x0``..``x1``, rows ``y0``..``y1``.

    Coordinates are measured from the top-left corner of the top-left pixel, so a box covering
    pixels 0..9 is ``x0=0, x1=10``. For a whole slide they are level-0 pixels of the Total Pixel
    Matrix. ``confidence`` is the model's score in [0, 1] (or ``None``); ``frame`` the 1-based
    frame of a multi-frame image (``None`` for single-frame images and slides).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    label: str
    confidence: float | None = None
    frame: int | None = None

    def __post_init__(self) -> None:
        for name in ("x0", "y0", "x1", "y1"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if not self.x0 < self.x1 or not self.y0 < self.y1:
            raise ValueError(f"box ({self.x0}, {self.y0}, {self.x1}, {self.y1}) must have x0 < x1 and y0 < y1")
        if not isinstance(self.label, str) or not self.label.strip():
            raise ValueError("box label must be a non-empty string")
        if len(self.label) > MAX_LABEL:
            raise ValueError(f"box label must have at most {MAX_LABEL} characters, got {len(self.label)}")
        if self.confidence is not None:
            if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float, np.floating)):
                raise TypeError(f"confidence must be a number or None, got {type(self.confidence).__name__}")
            if not 0.0 <= self.confidence <= 1.0:
                raise ValueError(f"box confidence must lie in [0, 1], got {self.confidence!r}")
        if self.frame is not None and self.frame < 1:
            raise ValueError("frame numbers start at 1")

    def corners(self) -> np.ndarray:
        """Top-left, top-right, bottom-right, bottom-left (x, y): a RECTANGLE's graphic data."""
        return np.array([[self.x0, self.y0], [self.x1, self.y0], [self.x1, self.y1], [self.x0, self.y1]], dtype=np.float64)

    def polyline(self) -> np.ndarray:
        """The closed rectangle as a POLYLINE: the four corners and the first one again."""
        corners = self.corners()
        return np.vstack([corners, corners[:1]]).astype(np.float32)
