"""Where dcmtk's programs are (used by the tests and by bench/ingest_bench.py; no pytest needed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def find_dcmtk(name: str) -> str | None:
    """dcmtk's program ``name`` on PATH, or ``None``.

    pynetdicom installs apps of the same names (storescu, storescp, echoscu) into the virtual
    environment's bin; with the environment activated they would shadow dcmtk's, so that folder
    is skipped.
    """
    venv_bin = Path(sys.executable).parent.resolve()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / name
        if folder and Path(folder).resolve() != venv_bin and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None
