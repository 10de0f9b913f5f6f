"""Route files from disk in batches; a file that cannot be read becomes an error record."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from onevlm.inputs.discovery import discover_files
from onevlm.inputs.routing_input import InputError, RoutingInput, load_input
from onevlm.router.decision import RoutingDecision
from onevlm.router.pipeline import Router


def failed_decision(router: Router, path: Path, error: str) -> RoutingDecision:
    """The decision-log record of an input that could not be routed at all."""
    return RoutingDecision(
        input=str(path),
        reference={"file": path.name, "path": str(path)},
        backend=router.backend.identity(),
        cutoffs=router.cutoffs.as_dict(),
        stages=(),
        stopped_early=False,
        stop_reason=None,
        pipeline_card_id=None,
        seconds=0.0,
        error=error,
        outcome=router.decide((), error=error),
    )


def route_files(
    router: Router,
    paths: Iterable[str | Path],
    hint: str | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> Iterator[RoutingDecision]:
    """Route every file under ``paths``, ``batch_size`` inputs per backend call, in order.

    Parameters
    ----------
    router:
        The router to use.
    paths:
        Files and folders (folders are searched recursively).
    hint:
        Modality hint for ordinary images (PNG/JPEG) that have no DICOM header.
    batch_size:
        Inputs per stage call (a VLM backend batches them).
    progress:
        Show a progress bar on stderr (``None``: only on a terminal).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    files = discover_files(paths)
    bar = tqdm(total=len(files), unit="input", desc="routing", disable=None if progress is None else not progress)
    try:
        for start in range(0, len(files), batch_size):
            chunk: Sequence[Path] = files[start:start + batch_size]
            loaded: list[RoutingInput] = []
            failures: dict[int, RoutingDecision] = {}
            for i, path in enumerate(chunk):
                try:
                    loaded.append(load_input(path, hint=hint))
                except InputError as exc:
                    # Not logged here: the error record carries it and the caller reports it.
                    failures[i] = failed_decision(router, path, str(exc))
            routed = iter(router.route_many(loaded)) if loaded else iter(())
            for i in range(len(chunk)):
                yield failures[i] if i in failures else next(routed)
            bar.update(len(chunk))
    finally:
        bar.close()
