"""Shared check: run dciodvfy (Debian dicom3tools) on a file and return its Error lines."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of dciodvfy's report that are errors (warnings are allowed)."""
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is missing: install the Debian package dicom3tools (.ci/run does)")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
