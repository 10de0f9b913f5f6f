"""The adapter manifest: what a fine-tuned specialty adapter is, written next to its weights.

``onevlm_adapter.json`` records the base model (identity and fingerprint, so an adapter is never
applied to a different base), the specialty, its tasks with their prompt ids and the prompt
version, a summary of the data (counts per dataset, split and class: no sample identifiers),
the training settings and the final losses and validation accuracy. Research use only.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from onevlm import __version__
from onevlm.specialty.tasks import TASK_PROMPT_VERSION, TaskExample

logger = logging.getLogger(__name__)

MANIFEST_NAME = "onevlm_adapter.json"
MANIFEST_SCHEMA = 1
#: Identity fields of the base model that must be present.
BASE_MODEL_REQUIRED = ("fingerprint", "model_type", "model_class")
#: Result fields that must be present (values may be ``None`` when there was no validation set).
RESULT_REQUIRED = ("steps", "train_loss", "val_loss", "val_accuracy")


class ManifestError(ValueError):
    """An adapter manifest is missing, unreadable or invalid; the message names the field."""


@dataclass(frozen=True)
class AdapterManifest:
    """The content of ``onevlm_adapter.json``.

    Attributes
    ----------
    specialty:
        The specialty the adapter serves (e.g. ``pathology``).
    base_model:
        Identity of the base model (:func:`onevlm.vlm.loading.load_model`'s ``identity``), with
        at least ``fingerprint``, ``model_type`` and ``model_class``.
    tasks:
        One entry per dataset: ``dataset``, ``task``, ``prompt_id``, ``markers``, ``class_names``
        and ``description`` (the dataset line of the prompt; inference must render it the same).
    prompt_version:
        :data:`onevlm.specialty.tasks.TASK_PROMPT_VERSION` at training time.
    data:
        ``{dataset: {split: {"examples": n, "classes": {name: count}}}}``.
    training:
        The training settings (as a JSON object).
    results:
        ``steps``, ``train_loss``, ``val_loss``, ``val_accuracy`` (overall) and more
        (per-dataset accuracy, seconds, loss history).
    """

    specialty: str
    base_model: dict[str, Any]
    tasks: list[dict[str, Any]]
    prompt_version: str
    data: dict[str, Any]
    training: dict[str, Any]
    results: dict[str, Any]
    schema_version: int = MANIFEST_SCHEMA
    onevlm_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        validate_manifest(asdict(self))

    def as_dict(self) -> dict[str, Any]:
        """The manifest as a JSON-ready object."""
        return asdict(self)


def _require(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    name = f"{where}{key}"
    if key not in obj:
        raise ManifestError(f"manifest field {name!r} is missing")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise ManifestError(f"manifest field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _optional_number(results: Mapping[str, Any], key: str) -> None:
    value = results[key]
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
        raise ManifestError(f"manifest field 'results.{key}' must be a finite number or null")


def validate_manifest(obj: Mapping[str, Any]) -> None:
    """Raise :class:`ManifestError` (naming the field) unless ``obj`` is a valid manifest object."""
    if not isinstance(obj, Mapping):
        raise ManifestError("manifest must be a JSON object")
    version = _require(obj, "schema_version", int)
    if version != MANIFEST_SCHEMA:
        raise ManifestError(f"manifest field 'schema_version' is {version}; this onevlm reads {MANIFEST_SCHEMA}")
    if not _require(obj, "specialty", str).strip():
        raise ManifestError("manifest field 'specialty' must not be empty")
    _require(obj, "prompt_version", str)
    _require(obj, "onevlm_version", str)
    _require(obj, "created", str)
    base = _require(obj, "base_model", dict)
    for key in BASE_MODEL_REQUIRED:
        _require(base, key, str, "base_model.")
    tasks = _require(obj, "tasks", list)
    if not tasks:
        raise ManifestError("manifest field 'tasks' must list at least one task")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise ManifestError(f"manifest field 'tasks[{i}]' must be an object")
        for key in ("dataset", "task", "prompt_id", "markers"):
            _require(task, key, str, f"tasks[{i}].")
        names = _require(task, "class_names", list, f"tasks[{i}].")
        if not names or not all(isinstance(n, str) for n in names):
            raise ManifestError(f"manifest field 'tasks[{i}].class_names' must be a non-empty list of strings")
        if not isinstance(task.get("description", ""), str):
            raise ManifestError(f"manifest field 'tasks[{i}].description' must be a string")
    _require(obj, "data", dict)
    _require(obj, "training", dict)
    results = _require(obj, "results", dict)
    for key in RESULT_REQUIRED:
        if key not in results:
            raise ManifestError(f"manifest field 'results.{key}' is missing")
    if not isinstance(results["steps"], int) or isinstance(results["steps"], bool) or results["steps"] < 0:
        raise ManifestError("manifest field 'results.steps' must be an integer >= 0")
    for key in ("train_loss", "val_loss", "val_accuracy"):
        _optional_number(results, key)


def manifest_path(adapter_dir: str | Path) -> Path:
    """Where an adapter folder's manifest lives."""
    return Path(adapter_dir) / MANIFEST_NAME


def write_manifest(adapter_dir: str | Path, manifest: AdapterManifest) -> Path:
    """Write ``manifest`` as ``<adapter_dir>/onevlm_adapter.json`` (atomically); return the path."""
    path = manifest_path(adapter_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.as_dict(), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    logger.info("wrote adapter manifest for specialty %s (%d tasks)", manifest.specialty, len(manifest.tasks))
    return path


def read_manifest(adapter_dir: str | Path) -> AdapterManifest:
    """Read and validate an adapter folder's manifest (or the manifest file itself).

    Raises
    ------
    ManifestError
        If the file is missing, not JSON, or a field is missing or of the wrong type.
    """
    path = Path(adapter_dir)
    path = path if path.is_file() else manifest_path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: adapter manifest not found")
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from exc
    validate_manifest(obj)
    known = {f for f in AdapterManifest.__dataclass_fields__}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ManifestError(f"{path}: unknown manifest field {unknown[0]!r}")
    return AdapterManifest(**obj)


# -- building the parts -----------------------------------------------------------------------


def task_entries(examples: Iterable[TaskExample]) -> list[dict[str, Any]]:
    """One entry per dataset (in order of first appearance): task, prompt id, markers, classes, description."""
    entries: dict[str, dict[str, Any]] = {}
    for ex in examples:
        entry = {"dataset": ex.dataset, "task": ex.task, "prompt_id": ex.prompt_id, "markers": ex.markers,
                 "class_names": list(ex.info.class_names), "description": ex.info.description}
        previous = entries.setdefault(ex.dataset, entry)
        if previous != entry:
            raise ValueError(f"dataset {ex.dataset!r} appears with two different tasks, prompts or class lists")
    return list(entries.values())


def data_summary(examples: Iterable[TaskExample]) -> dict[str, Any]:
    """Counts per dataset, split and class (a multi-label or detection example counts each class)."""
    examples_n: Counter = Counter()
    classes: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for ex in examples:
        examples_n[(ex.dataset, ex.split)] += 1
        classes[(ex.dataset, ex.split)].update(ex.target_names)
    out: dict[str, Any] = {}
    for (dataset, split), n in sorted(examples_n.items()):
        out.setdefault(dataset, {})[split] = {"examples": n, "classes": dict(sorted(classes[(dataset, split)].items()))}
    return out


def base_model_entry(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The base-model part of the manifest from a loaded model's identity (JSON-safe values)."""
    missing = [k for k in BASE_MODEL_REQUIRED if k not in identity]
    if missing:
        raise ValueError(f"base model identity lacks {', '.join(missing)}")
    return json.loads(json.dumps(dict(identity), default=str))


def prompt_version() -> str:
    """The task prompt version recorded in new manifests."""
    return TASK_PROMPT_VERSION
