"""Expand the paths a user gives into the files to route, in a stable order."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

#: Files that are never inputs even when they sit in an input folder.
IGNORED_NAMES = frozenset({"DICOMDIR", "README", "README.md", "LICENSE", ".DS_Store", "Thumbs.db"})
IGNORED_SUFFIXES = frozenset({".md", ".txt", ".json", ".jsonl", ".csv", ".yaml", ".yml", ".py", ".zip"})


def discover_files(paths: Iterable[str | Path]) -> list[Path]:
    """Return the files named by ``paths``, recursing into folders.

    Files named directly are always returned (even if they do not exist, so the caller can
    report them); inside folders, hidden files, DICOMDIRs and documentation are skipped.
    Order: as given, each folder sorted.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if not child.is_file():
                    continue
                if any(part.startswith(".") for part in child.relative_to(path).parts):
                    continue
                if child.name in IGNORED_NAMES or child.suffix.lower() in IGNORED_SUFFIXES:
                    continue
                found.append(child)
        else:
            found.append(path)
    return found
