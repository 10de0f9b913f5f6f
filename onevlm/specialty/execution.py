"""Run a routed model card's task on the specialty model: one base model, every specialty adapter.

The paper's two roles meet here. :class:`SpecialtyModel` loads the base VLM once and puts every
specialty adapter on it (peft multi-adapter: ``PeftModel.from_pretrained`` for the first,
``load_adapter`` for the others); a request switches to its specialty's adapter
(``set_adapter``) and asks the task's prompt, the very prompt the adapter was trained with
(:func:`onevlm.specialty.tasks.build_query` from the task recorded in the adapter manifest).

A card runs when its ``execute`` field names a specialty whose adapter is loaded and a task that
adapter was trained on, of a kind that fits the card's ``task_type``, with the prompt (id) this
version asks; otherwise the result says why it is not executable here. Research use only: nothing here is for clinical use.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image

from onevlm.cards.schema import ModelCard
from onevlm.specialty.manifest import MANIFEST_NAME, AdapterManifest, ManifestError, read_manifest
from onevlm.specialty.samples import DatasetInfo, NormalisedBox
from onevlm.specialty.tasks import build_query, is_unparseable, parse_answer, prompt_id

logger = logging.getLogger(__name__)

#: Outcomes of a card's execution.
EXECUTED = "executed"
UNPARSEABLE = "unparseable"
NOT_EXECUTABLE = "not-executable"
FAILED = "failed"
STATUSES = (EXECUTED, UNPARSEABLE, NOT_EXECUTABLE, FAILED)

#: Which adapter task kinds can serve a card's ``task_type``.
CARD_TASK_KINDS = {
    "classification": ("classification",),
    "grading": ("grading",),
    "multilabel-classification": ("multilabel",),
    "detection": ("detection",),
}


@dataclass(frozen=True)
class AdapterTask:
    """A task a loaded adapter was trained on: its dataset, marker style and prompt id."""

    specialty: str
    info: DatasetInfo
    markers: str
    prompt_id: str

    @property
    def name(self) -> str:
        """The task id cards name in ``execute.task`` (the dataset name of the mixture)."""
        return self.info.name

    @property
    def kind(self) -> str:
        """The task kind (classification, grading, multilabel, detection, region-classification)."""
        return self.info.task_type


@dataclass(frozen=True)
class SpecialtyResult:
    """What a card's execution gave for one image.

    Attributes
    ----------
    card_id:
        The routed card.
    status:
        ``executed``, ``unparseable`` (the model answered outside the task's format),
        ``not-executable`` (no adapter/task here for the card) or ``failed`` (an error).
    reason:
        Why it was not executed, failed or could not be parsed (``None`` when executed).
    specialty, task, task_kind, prompt_id:
        The adapter and task that ran (``None`` when none did).
    answer:
        The model's raw answer text.
    labels:
        Class names of the answer: the class or grade, the findings present (empty: none), or
        the labels of the boxes.
    grade:
        The grade index of a grading task.
    boxes:
        Detected boxes in normalised coordinates (class index in ``label``).
    adapter:
        The adapter's identity (folder name, creation time, validation accuracy).
    seconds:
        Time the model took (per image).
    tile_counts:
        For a whole slide: answers per class over its tissue tiles (``unparseable`` counted too);
        ``labels`` then holds the most frequent class.
    """

    card_id: str
    status: str
    reason: str | None = None
    specialty: str | None = None
    task: str | None = None
    task_kind: str | None = None
    prompt_id: str | None = None
    answer: str | None = None
    labels: tuple[str, ...] = ()
    grade: int | None = None
    boxes: tuple[NormalisedBox, ...] = ()
    box_labels: tuple[str, ...] = ()
    adapter: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    tile_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")
        if self.status != EXECUTED and not self.reason:
            raise ValueError(f"a {self.status} result needs its reason")
        if len(self.box_labels) != len(self.boxes):
            raise ValueError("every box needs its label name")
        if self.status == EXECUTED and self.task_kind in ("classification", "grading", "region-classification") \
                and not self.labels:
            raise ValueError(f"an executed {self.task_kind} result needs its class")
        if self.status == EXECUTED and self.task_kind == "grading" and self.grade is None:
            raise ValueError("an executed grading result needs its grade")

    @property
    def executed(self) -> bool:
        return self.status == EXECUTED

    def answer_summary(self) -> str | None:
        """The executed answer in words (``malignant``, ``grade 2 (suspicious)``…); ``None`` if not executed."""
        if not self.executed:
            return None
        if self.task_kind == "detection":
            found = ", ".join(self.box_labels) if self.boxes else "nothing found"
            return f"{len(self.boxes)} region(s): {found}"
        if self.task_kind == "multilabel":
            return ", ".join(self.labels) if self.labels else "no finding present"
        tiles = ""
        if self.tile_counts:
            counts = ", ".join(f"{name} {n}" for name, n in sorted(self.tile_counts.items(), key=lambda kv: -kv[1]))
            tiles = f" (most frequent over {sum(self.tile_counts.values())} tissue tiles: {counts})"
        if self.task_kind == "grading":
            return f"grade {self.grade} ({self.labels[0]}){tiles}"
        return f"{self.labels[0]}{tiles}"

    def summary(self) -> str:
        """One line for reports and logs: the task and its answer, or why there is none."""
        if self.status == NOT_EXECUTABLE:
            return f"{self.card_id} is not executable here: {self.reason}"
        where = f"{self.card_id} ({self.specialty}/{self.task})"
        if self.status == FAILED:
            return f"{where} failed: {self.reason}"
        if self.status == UNPARSEABLE:
            return f"{where}: the answer could not be parsed ({self.reason})"
        return f"{where}: {self.answer_summary()}"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record (decision logs, metadata.json)."""
        return {
            "card_id": self.card_id, "status": self.status, "reason": self.reason, "specialty": self.specialty,
            "task": self.task, "task_kind": self.task_kind, "prompt_id": self.prompt_id, "answer": self.answer,
            "labels": list(self.labels), "grade": self.grade,
            "boxes": [{"x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1, "label": name}
                      for b, name in zip(self.boxes, self.box_labels)],
            "adapter": dict(self.adapter), "seconds": self.seconds, "tile_counts": dict(self.tile_counts),
            "summary": self.summary(),
            "not_for_clinical_use": True,
        }


def not_executable(card_id: str, reason: str) -> SpecialtyResult:
    """The result of a card that cannot run here, saying why."""
    return SpecialtyResult(card_id=card_id, status=NOT_EXECUTABLE, reason=reason)


def find_adapters(folder: str | Path) -> list[Path]:
    """The adapter folders under ``folder`` (itself, or its subfolders holding a manifest)."""
    root = Path(folder)
    if not root.is_dir():
        raise ManifestError(f"{root}: adapter folder not found")
    if (root / MANIFEST_NAME).is_file():
        return [root]
    found = sorted(p.parent for p in root.glob(f"*/{MANIFEST_NAME}"))
    if not found:
        raise ManifestError(f"{root}: no adapter (no */{MANIFEST_NAME}) found")
    return found


def _tasks(manifest: AdapterManifest, source: Path) -> dict[str, AdapterTask]:
    tasks = {}
    for entry in manifest.tasks:
        if "description" not in entry:
            logger.warning("%s: the manifest predates task descriptions; task %s is asked without one",
                           source.name, entry["dataset"])
        info = DatasetInfo(name=entry["dataset"], task_type=entry["task"], class_names=tuple(entry["class_names"]),
                           specialty=manifest.specialty, description=entry.get("description", ""))
        tasks[info.name] = AdapterTask(manifest.specialty, info, entry["markers"], entry["prompt_id"])
    return tasks


class SpecialtyModel:
    """The base VLM in memory once, with every specialty adapter on it; the adapter is switched per request.

    Parameters
    ----------
    base_dir:
        The base model folder (the one the adapters were trained on: fingerprints are checked).
    adapter_dirs:
        Adapter folders written by ``onevlm finetune`` (one per specialty).
    device, dtype:
        Where and in which precision the base loads (``auto``: CUDA if present; bf16 on GPU,
        fp32 on CPU).
    quantize:
        ``nf4`` or ``none``; default the adapters' training setting (``nf4`` for QLoRA).
    batch_size:
        Images answered together by :meth:`execute_many`.

    Raises
    ------
    onevlm.specialty.manifest.ManifestError
        If an adapter folder has no valid manifest, or two adapters serve one specialty.
    onevlm.vlm.loading.ModelLoadError
        If the base model folder is missing or not the adapters' base.
    """

    def __init__(self, base_dir: str | Path, adapter_dirs: Sequence[str | Path], device: str = "auto",
                 dtype: str = "auto", quantize: str | None = None, batch_size: int = 8) -> None:
        from onevlm.vlm.loading import LoadOptions, ModelLoadError, check_model_dir, fingerprint

        if not adapter_dirs:
            raise ManifestError("the specialty model needs at least one adapter folder")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.base_dir = check_model_dir(base_dir)
        self.batch_size = batch_size
        manifests: dict[str, tuple[Path, AdapterManifest]] = {}
        for folder in map(Path, adapter_dirs):
            manifest = read_manifest(folder)
            if manifest.specialty in manifests:
                raise ManifestError(f"{folder}: a second adapter for specialty {manifest.specialty!r} "
                                    f"(the first is {manifests[manifest.specialty][0]})")
            manifests[manifest.specialty] = (folder, manifest)
        base_print = fingerprint(self.base_dir)
        for folder, manifest in manifests.values():
            if manifest.base_model["fingerprint"] != base_print:
                raise ModelLoadError(f"{folder}: adapter for {manifest.specialty} was trained on another base model "
                                     f"(fingerprint {manifest.base_model['fingerprint']}, {self.base_dir} has "
                                     f"{base_print})")
        if quantize is None:
            trained = {m.training.get("quantize", "nf4") for _, m in manifests.values()}
            quantize = trained.pop() if len(trained) == 1 else "nf4"
        self.options = LoadOptions(device=device, dtype=dtype, quantize=quantize)
        self.manifests = {name: manifest for name, (_, manifest) in manifests.items()}
        self.adapter_dirs = {name: folder for name, (folder, _) in manifests.items()}
        self.tasks: dict[tuple[str, str], AdapterTask] = {}
        for name, (folder, manifest) in manifests.items():
            for task_name, task in _tasks(manifest, folder).items():
                self.tasks[(name, task_name)] = task
        self._lock = threading.Lock()
        self._active: str | None = None
        self.model, self.processor, self.base_identity = self._load()
        logger.info("specialty model ready: base %s, adapters %s (%d tasks)", self.base_dir.name,
                    ", ".join(sorted(self.manifests)), len(self.tasks))

    def _load(self):
        import warnings

        from peft import PeftModel

        from onevlm.vlm.loading import load_model

        loaded = load_model(self.base_dir, self.options)
        names = sorted(self.adapter_dirs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(loaded.model, str(self.adapter_dirs[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(str(self.adapter_dirs[name]), adapter_name=name)
        model.eval()
        self._active = names[0]
        return model, loaded.processor, loaded.identity

    @classmethod
    def from_folders(cls, base_dir: str | Path, adapter_folders: Iterable[str | Path], **kwargs) -> "SpecialtyModel":
        """Load every adapter found under each of ``adapter_folders`` (see :func:`find_adapters`)."""
        dirs = [d for folder in adapter_folders for d in find_adapters(folder)]
        return cls(base_dir, dirs, **kwargs)

    @contextlib.contextmanager
    def base_model_only(self) -> Iterator[None]:
        """Hold the model with every adapter disabled: the base VLM answers (for the router's role)."""
        with self._lock, self.model.disable_adapter():
            yield

    @property
    def specialties(self) -> tuple[str, ...]:
        return tuple(sorted(self.manifests))

    def identity(self) -> dict[str, Any]:
        """The base model's identity and each adapter's (for reports and logs)."""
        return {
            "base_model": {k: self.base_identity.get(k) for k in ("model_type", "model_class", "fingerprint")},
            "base_dir": self.base_dir.name,
            "quantize": self.options.quantize,
            "adapters": {name: self._adapter_identity(name) for name in self.specialties},
        }

    def _adapter_identity(self, specialty: str) -> dict[str, Any]:
        manifest = self.manifests[specialty]
        return {"dir": self.adapter_dirs[specialty].name, "created": manifest.created,
                "prompt_version": manifest.prompt_version, "val_accuracy": manifest.results.get("val_accuracy")}

    def resolve(self, card: ModelCard) -> AdapterTask | str:
        """The adapter task that runs ``card``, or the reason it is not executable here."""
        spec = card.execute
        if spec is None:
            return "the card names no specialty task (no 'execute' field)"
        if spec.specialty not in self.manifests:
            loaded = ", ".join(self.specialties) or "none"
            return f"no {spec.specialty} adapter is loaded here (loaded: {loaded})"
        task = self.tasks.get((spec.specialty, spec.task))
        if task is None:
            trained = ", ".join(sorted(t for s, t in self.tasks if s == spec.specialty))
            return f"the {spec.specialty} adapter was not trained on task {spec.task!r} (trained: {trained})"
        if task.kind == "region-classification":
            return f"task {spec.task!r} classifies a given region and the input carries none"
        if task.kind not in CARD_TASK_KINDS.get(card.task_type, ()):
            return f"the card's task type {card.task_type} does not fit the adapter task {spec.task!r} ({task.kind})"
        current = prompt_id(task.kind, task.markers)
        if task.prompt_id != current:
            return (f"the {spec.specialty} adapter learnt task {spec.task!r} with prompt {task.prompt_id}; this onevlm "
                    f"asks with prompt {current} (fine-tune again with this version)")
        return task

    def execute(self, card: ModelCard, image: Image.Image) -> SpecialtyResult:
        """Run ``card``'s task on ``image`` (or say why it cannot run here)."""
        return self.execute_many([(card, image)])[0]

    def execute_many(self, requests: Sequence[tuple[ModelCard, Image.Image]]) -> list[SpecialtyResult]:
        """Run each (card, image) request; requests of one specialty and task are batched together.

        A request that fails (an unreadable image, an error in the model) gets a ``failed``
        result naming the problem; the others go on.
        """
        results: list[SpecialtyResult | None] = [None] * len(requests)
        batches: dict[tuple[str, str], list[int]] = {}
        for i, (card, _) in enumerate(requests):
            task = self.resolve(card)
            if isinstance(task, str):
                results[i] = not_executable(card.id, task)
            else:
                batches.setdefault((task.specialty, task.name), []).append(i)
        for key, indices in sorted(batches.items()):
            task = self.tasks[key]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for i, result in zip(chunk, self._run(task, [requests[i] for i in chunk])):
                    results[i] = result
        return [r for r in results if r is not None]

    def _run(self, task: AdapterTask, requests: Sequence[tuple[ModelCard, Image.Image]]) -> list[SpecialtyResult]:
        from onevlm.specialty.prediction import DEFAULT_MAX_NEW_TOKENS, generate_answers

        adapter = self._adapter_identity(task.specialty)
        common = dict(specialty=task.specialty, task=task.name, task_kind=task.kind, prompt_id=task.prompt_id,
                      adapter=adapter)
        try:
            queries = [build_query(task.info, image, task.markers) for _, image in requests]
        except Exception as exc:
            if len(requests) > 1:  # find the bad image; the others go on
                return [r for request in requests for r in self._run(task, [request])]
            return [SpecialtyResult(card_id=requests[0][0].id, status=FAILED,
                                    reason=f"{type(exc).__name__}: {exc}", **common)]
        started = time.monotonic()
        try:
            with self._lock:
                if self._active != task.specialty:
                    self.model.set_adapter(task.specialty)
                    self._active = task.specialty
                texts = generate_answers(self.model, self.processor, queries, DEFAULT_MAX_NEW_TOKENS[task.kind],
                                         self.batch_size)
        except Exception as exc:
            logger.exception("specialty %s task %s failed", task.specialty, task.name)
            return [SpecialtyResult(card_id=card.id, status=FAILED, reason=f"{type(exc).__name__}: {exc}", **common)
                    for card, _ in requests]
        seconds = round((time.monotonic() - started) / len(requests), 4)
        results = [parse_result(card.id, task, text, seconds, adapter) for (card, _), text in zip(requests, texts)]
        for result in results:
            logger.debug("card %s: %s/%s %s", result.card_id, task.specialty, task.name, result.status)
        return results



def parse_result(card_id: str, task: AdapterTask, text: str, seconds: float | None = None,
                 adapter: dict[str, Any] | None = None) -> SpecialtyResult:
    """The result of ``task``'s answer ``text`` for ``card_id``: parsed by the task's own parser.

    An answer outside the task's format gives an ``unparseable`` result (never coerced).
    """
    common = dict(specialty=task.specialty, task=task.name, task_kind=task.kind, prompt_id=task.prompt_id,
                  adapter=dict(adapter or {}), answer=text, seconds=seconds)
    prediction = parse_answer(task.info, text, task.markers)
    names = task.info.class_names
    if is_unparseable(prediction):
        return SpecialtyResult(card_id=card_id, status=UNPARSEABLE, reason=prediction.reason, **common)
    if task.kind == "detection":
        boxes = tuple(prediction)
        return SpecialtyResult(card_id=card_id, status=EXECUTED, boxes=boxes,
                               box_labels=tuple(names[b.label] for b in boxes),
                               labels=tuple(dict.fromkeys(names[b.label] for b in boxes)), **common)
    if task.kind == "multilabel":
        return SpecialtyResult(card_id=card_id, status=EXECUTED, labels=tuple(names[i] for i in sorted(prediction)),
                               **common)
    grade = int(prediction) if task.kind == "grading" else None
    return SpecialtyResult(card_id=card_id, status=EXECUTED, labels=(names[int(prediction)],), grade=grade, **common)


__all__ = [
    "AdapterTask",
    "CARD_TASK_KINDS",
    "EXECUTED",
    "FAILED",
    "NOT_EXECUTABLE",
    "SpecialtyModel",
    "SpecialtyResult",
    "UNPARSEABLE",
    "find_adapters",
    "not_executable",
    "parse_result",
]
