"""Specialty evaluation: the base model zero-shot and the fine-tuned adapter side by side (table 4).

:func:`evaluate_specialty` renders every dataset of a specialty for one split, has the base
model answer zero-shot and, given an adapter, the fine-tuned model too (same prompts, same
option markers: the adapter's), and writes to the output folder:

``table4.md``
    Shaped like the paper's table 4: Task | External benchmark | Base (zero-shot) | Fine-tuned,
    one section per dataset, with the metric definitions below it.
``results.json``
    Every metric of both models per task, the reference figures, counts and settings.
``predictions.jsonl``
    One line per example: the gold answer and each model's raw answer and parsed prediction
    (the metrics can be recomputed from it).
``confusion/<dataset>-base.png``, ``confusion/<dataset>-finetuned.png``
    Confusion matrices of the classification-like tasks (rows gold, columns predicted, an
    extra column for unparseable answers).

Metrics (:mod:`onevlm.specialty.metrics`): see :data:`METRIC_DEFINITIONS`. The reference
figures are the paper's "External benchmark" column (:data:`PAPER_TABLE4_EXTERNAL`).

With an adapter the model is loaded once (base + adapter) and the base's answers come from the
same weights with the adapter disabled (``PeftModel.disable_adapter``), i.e. exactly the base
model. Research use only: nothing here is for clinical use.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from onevlm.specialty.data_sources import DataSourceError, SpecialtyData
from onevlm.specialty.samples import NormalisedBox
from onevlm.specialty.tasks import Prediction, TaskExample, is_unparseable, parse_answer

logger = logging.getLogger(__name__)

#: Marker of a reference figure that the paper's text (as available to us) does not let us read.
ILLEGIBLE = "illegible"
Reference = Union[float, None, str]

#: Metric keys per task kind, in table order.
TASK_METRICS: Mapping[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1_macro", "f1_weighted"),
    "grading": ("accuracy", "f1_macro", "f1_weighted"),
    "region-classification": ("accuracy", "f1_macro", "f1_weighted"),
    "multilabel": ("subset_accuracy", "f1_micro", "f1_macro", "label_accuracy"),
    "detection": ("bbox_localisation_accuracy", "region_localisation_accuracy"),
}

#: How each metric is labelled in table4.md (the paper's wording where it has one).
METRIC_LABELS: Mapping[str, str] = {
    "accuracy": "Acc.",
    "f1_macro": "F1 Macro",
    "f1_weighted": "F1 Weighted",
    "subset_accuracy": "Subset Acc.",
    "f1_micro": "F1 Micro",
    "label_accuracy": "Label Acc.",
    "bbox_localisation_accuracy": "BBox Localization Acc.",
    "region_localisation_accuracy": "Region Localization Acc.",
}

#: The definitions of the metrics (repeated from :mod:`onevlm.specialty.metrics`), printed under the table.
METRIC_DEFINITIONS: Mapping[str, str] = {
    "accuracy": "share of examples whose parsed answer is the gold class (classification, grading, region "
                "classification); an unparseable answer counts as wrong, never coerced to a class",
    "f1_macro": "unweighted mean over the gold classes of the per-class F1 (scikit-learn, zero_division=0); "
                "unparseable answers are a wrong extra class",
    "f1_weighted": "mean of the per-class F1 weighted by each class's gold count",
    "subset_accuracy": "multi-label: share of images whose predicted set of findings equals the gold set exactly "
                       "(an unparseable answer counts as wrong on every finding in every multi-label metric)",
    "f1_micro": "multi-label: F1 over all (image, finding) decisions pooled",
    "label_accuracy": "multi-label: mean over images and findings of 'finding predicted present == gold present'",
    "bbox_localisation_accuracy": "detection: share of images whose every gold box is matched one-to-one (greedy by "
                                  "IoU) by a predicted box with IoU >= 0.5 and that predict no extra box; an image "
                                  "without gold boxes is correct iff nothing is predicted (box labels are not "
                                  "compared; an unparseable answer makes the image wrong)",
    "region_localisation_accuracy": "detection: share of gold boxes whose centre lies inside some predicted box "
                                    "(a looser 'did it look in the right place' measure)",
}


@dataclass(frozen=True)
class PaperRow:
    """One dataset of the paper's table 4: its section title, task label and External benchmark figures."""

    section: str
    task: str
    external: Mapping[str, Reference]


_DASH3 = {"accuracy": None, "f1_macro": None, "f1_weighted": None}
_UNREAD3 = {"accuracy": ILLEGIBLE, "f1_macro": ILLEGIBLE, "f1_weighted": ILLEGIBLE}

#: The paper's table 4 "External benchmark" column (percent, as printed; ``None``: the paper prints
#: "—"; :data:`ILLEGIBLE`: the extracted paper text, ``../shared/paper/one-vlm-two-roles.txt``,
#: is garbled there: the OrganC/OrganS/Pneumonia/ChestMNIST rows and PolypSet's region
#: localisation row collapse into one line in which only OrganAMNIST's 95% can be read).
#: Keys are the dataset names of the shipped mixtures (``config/specialties``).
PAPER_TABLE4_EXTERNAL: Mapping[str, PaperRow] = {
    "polypset-classification": PaperRow("Gastroenterology — PolypSet", "Polyp Classification",
                                        {"accuracy": 81.0, "f1_macro": 80.0, "f1_weighted": 81.0}),
    "polypset": PaperRow("Gastroenterology — PolypSet", "Polyp Detection",
                         {"bbox_localisation_accuracy": 78.0, "region_localisation_accuracy": None}),
    "bloodmnist": PaperRow("Hematology — BloodMNIST", "Cell-type Classification", {**_DASH3, "accuracy": 97.0}),
    "octmnist": PaperRow("Ophthalmology — OCTMNIST", "Retinal OCT Classification", {**_DASH3, "accuracy": 78.0}),
    "retinamnist": PaperRow("Ophthalmology — RetinaMNIST", "Diabetic Retinopathy Grading",
                            {**_DASH3, "accuracy": 53.0}),
    "tissuemnist": PaperRow("Pathology — TissueMNIST", "Kidney Cortex Classification", {**_DASH3, "accuracy": 70.3}),
    "pathmnist": PaperRow("Pathology — PathMNIST", "Tissue Type Classification", {**_DASH3, "accuracy": 91.1}),
    "idc": PaperRow("Pathology — BreastHIST", "Ductal Carcinoma Classification", {**_DASH3, "accuracy": 84.3}),
    "breastmnist": PaperRow("Radiology — BreastMNIST", "Breast Lesion Classification", {**_DASH3, "accuracy": 86.3}),
    "deeplesion": PaperRow("Radiology — DeepLesion", "BBox-Guided Region Classification", dict(_DASH3)),
    "organamnist": PaperRow("Radiology — OrganAMNIST", "Organ Classification (Axial)", {**_DASH3, "accuracy": 95.0}),
    "organcmnist": PaperRow("Radiology — OrganCMNIST", "Organ Classification (Coronal)", dict(_UNREAD3)),
    "organsmnist": PaperRow("Radiology — OrganSMNIST", "Organ Classification (Sagittal)", dict(_UNREAD3)),
    "pneumoniamnist": PaperRow("Radiology — PneumoniaMNIST", "Chest Pneumonia Classification", dict(_UNREAD3)),
    "chestmnist": PaperRow("Radiology — ChestMNIST", "Chest X-ray Findings (multi-label)",
                           {m: ILLEGIBLE for m in TASK_METRICS["multilabel"]}),
}

#: Model variants, in column order.
VARIANTS = ("base", "finetuned")
VARIANT_TITLES = {"base": "Base (zero-shot)", "finetuned": "Fine-tuned"}


# -- predictions as JSON ----------------------------------------------------------------------


def prediction_to_json(prediction: Prediction) -> Any:
    """A prediction as JSON: class index, sorted list of findings, ``[[x0, y0, x1, y1, label], …]``, or ``None``."""
    if is_unparseable(prediction):
        return None
    if isinstance(prediction, frozenset):
        return sorted(prediction)
    if isinstance(prediction, tuple):
        return [[b.x0, b.y0, b.x1, b.y1, b.label] for b in prediction]
    return int(prediction)


def prediction_from_json(task: str, value: Any) -> Any:
    """Inverse of :func:`prediction_to_json` in the form the metrics take (``None``: unparseable)."""
    if value is None:
        return None
    if task == "multilabel":
        return set(value)
    if task == "detection":
        return [NormalisedBox(*box[:4], label=int(box[4])) for box in value]
    return int(value)


# -- metrics ----------------------------------------------------------------------------------


def task_metrics(task: str, n_classes: int, targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, Any]:
    """The metrics of one task from JSON-form targets and predictions (:func:`prediction_from_json` form)."""
    from onevlm.specialty.metrics import classification_scores, localisation_scores, multilabel_scores

    if task == "multilabel":
        return multilabel_scores(list(targets), list(predictions), n_classes)
    if task == "detection":
        return localisation_scores(list(targets), list(predictions))
    return classification_scores(list(targets), list(predictions), n_classes).as_dict()


def _metrics_for(examples: Sequence[TaskExample], predictions: Sequence[Prediction]) -> dict[str, Any]:
    task = examples[0].task
    targets = [prediction_from_json(task, prediction_to_json(ex.target)) for ex in examples]
    preds = [prediction_from_json(task, prediction_to_json(p)) for p in predictions]
    return task_metrics(task, len(examples[0].info.class_names), targets, preds)


# -- generation -------------------------------------------------------------------------------


def _answer(model, processor, groups: Sequence[tuple[Any, list[TaskExample]]], title: str, batch_size: int,
            max_new_tokens: int | None, progress: bool) -> list[list[tuple[str, Prediction]]]:
    from tqdm.auto import tqdm

    from onevlm.specialty.prediction import DEFAULT_MAX_NEW_TOKENS, generate_answers

    total = sum(len(examples) for _, examples in groups)
    out: list[list[tuple[str, Prediction]]] = []
    with tqdm(total=total, desc=title, unit="image", disable=not progress) as bar:
        for info, examples in groups:
            budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[info.task_type]
            answers: list[tuple[str, Prediction]] = []
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                texts = generate_answers(model, processor, chunk, budget, batch_size)
                answers.extend((text, parse_answer(ex.info, text, ex.markers)) for ex, text in zip(chunk, texts))
                bar.update(len(chunk))
            out.append(answers)
    return out


def _adapter_markers(manifest, markers: str | None) -> dict[str, str]:
    """Each dataset's marker style as the adapter was trained (conflicts with ``--markers`` raise)."""
    found: dict[str, str] = {}
    for task in manifest.tasks:
        style = task["markers"]
        if markers is not None and style != markers and task["task"] in ("classification", "region-classification"):
            raise DataSourceError(f"the adapter was trained with {style} option markers for {task['dataset']!r}; "
                                  f"pass --markers {style} (or omit --markers)")
        found[task["dataset"]] = style
    return found


# -- the report -------------------------------------------------------------------------------


def _fmt_reference(value: Reference) -> str:
    if value is None:
        return "—"
    if value == ILLEGIBLE:
        return "n/r†"
    number = float(value)
    return f"{number:g}%"


def _fmt_measured(value: Any) -> str:
    if value is None:
        return "—"
    return f"{100.0 * float(value):.1f}%"


def _row_title(dataset: str, task: str) -> tuple[str, str]:
    paper = PAPER_TABLE4_EXTERNAL.get(dataset)
    if paper is not None:
        return paper.section, paper.task
    return f"{dataset}", f"{dataset} {task}"


def write_table(results: Mapping[str, Any], path: Path) -> Path:
    """Write ``table4.md`` from a ``results.json`` object."""
    has_adapter = results["adapter"] is not None
    lines = [
        f"# Table 4 — specialty {results['specialty']} ({results['split']} split)",
        "",
        "Research use only: not for clinical use. External benchmark: the paper's table 4 (as published, not "
        "re-measured); Base: the base model zero-shot; Fine-tuned: base + adapter"
        + ("" if has_adapter else " (no adapter given: not run)") + ". Same prompts for both models.",
        "",
        "| Task | External benchmark | Base (zero-shot) | Fine-tuned |",
        "|---|---|---|---|",
    ]
    for entry in results["tasks"]:
        lines.append(f"| **{entry['section']}** (test examples: {entry['n']}) | | | |")
        for metric in TASK_METRICS[entry["task"]]:
            base = entry["base"].get(metric)
            tuned = entry["finetuned"].get(metric) if entry["finetuned"] else None
            reference = _fmt_reference(entry["reference"].get(metric))
            lines.append(f"| {entry['label']} ({METRIC_LABELS[metric]}) | {reference} "
                         f"| {_fmt_measured(base)} | {_fmt_measured(tuned) if has_adapter else '—'} |")
    lines += ["", "Unparseable answers (counted wrong):", ""]
    for entry in results["tasks"]:
        tuned = f", fine-tuned {entry['finetuned']['unparseable']}" if entry["finetuned"] else ""
        lines.append(f"- {entry['dataset']} ({entry['task']}): base {entry['base']['unparseable']}{tuned} "
                     f"of {entry['n']}")
    if results.get("skipped"):
        lines += ["", f"Skipped (data missing): {', '.join(results['skipped'])}."]
    if results.get("empty"):
        lines += ["", f"No {results['split']} examples: {', '.join(results['empty'])}."]
    lines += ["", "Metrics:", ""]
    used = {m for entry in results["tasks"] for m in TASK_METRICS[entry["task"]]}
    lines += [f"- **{METRIC_LABELS[m]}** (`{m}`): {METRIC_DEFINITIONS[m]}." for m in METRIC_DEFINITIONS if m in used]
    references = [v for entry in results["tasks"] for v in entry["reference"].values()]
    legend = []
    if any(v is None for v in references):
        legend.append("— in the External benchmark column: the paper gives no figure for this row or dataset.")
    if any(v == ILLEGIBLE for v in references):
        legend.append("n/r†: not readable in the extracted paper text (table 4 of ../shared/paper/"
                      "one-vlm-two-roles.txt is garbled there).")
    if legend:
        lines += ["", *legend]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the evaluation ---------------------------------------------------------------------------


def evaluate_specialty(data: SpecialtyData, base_dir: str | Path, out_dir: str | Path,
                       adapter_dir: str | Path | None = None, split: str = "test", limit: int | None = None,
                       markers: str | None = None, device: str = "auto", dtype: str = "auto",
                       quantize: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Evaluate a specialty's base model zero-shot and, given ``adapter_dir``, its fine-tuned model.

    Parameters
    ----------
    data:
        The resolved specialty data (:func:`onevlm.specialty.data_sources.resolve_data`).
    base_dir:
        The base model folder.
    out_dir:
        Where ``table4.md``, ``results.json``, ``predictions.jsonl`` and ``confusion/`` go.
    adapter_dir:
        A folder written by :func:`onevlm.specialty.training.finetune` (its base fingerprint must match).
    split, limit:
        The split evaluated and, optionally, the first ``limit`` examples of each dataset only.
    markers:
        Option marker style; default the adapter's (per dataset) or the mixture's.
    device, dtype, quantize:
        How the model is loaded; ``quantize`` defaults to the adapter's training setting
        (``nf4`` for QLoRA) or ``none`` without an adapter.
    batch_size, max_new_tokens:
        Generation batch and answer-length bound (default per task kind).
    progress:
        Show a progress bar over the examples.

    Returns
    -------
    dict
        The ``results.json`` object.
    """
    from onevlm.specialty.manifest import read_manifest
    from onevlm.specialty.metrics import plot_confusion
    from onevlm.specialty.prediction import load_finetuned
    from onevlm.vlm.loading import LoadOptions, check_model_dir, fingerprint, load_model

    started = time.monotonic()
    out = Path(out_dir)
    base = check_model_dir(base_dir)
    manifest = read_manifest(adapter_dir) if adapter_dir is not None else None
    by_dataset: dict[str, str] = {}
    if manifest is not None:
        by_dataset = _adapter_markers(manifest, markers)
        if manifest.specialty != data.config.specialty:
            logger.warning("the adapter was trained for specialty %s, evaluating %s", manifest.specialty,
                           data.config.specialty)
    groups = data.examples_by_dataset(split, markers, limit, by_dataset)
    empty = [info.name for info, examples in groups if not examples]
    for name in empty:
        logger.warning("%s: no %s examples (left out of the table)", name, split)
    groups = [(info, examples) for info, examples in groups if examples]
    if not groups:
        raise DataSourceError(f"specialty {data.config.specialty}: no {split} examples to evaluate")
    if manifest is not None:
        trained = {t["dataset"]: t for t in manifest.tasks}
        for info, examples in groups:
            task = trained.get(info.name)
            if task is None:
                logger.warning("the adapter was not trained on %s", info.name)
            elif task["prompt_id"] != examples[0].prompt_id:
                logger.warning("%s: the adapter was trained with prompt %s, evaluating with %s", info.name,
                               task["prompt_id"], examples[0].prompt_id)

    if quantize is None:
        quantize = manifest.training.get("quantize", "nf4") if manifest is not None else "none"
    options = LoadOptions(device=device, dtype=dtype, quantize=quantize)
    answers: dict[str, list[list[tuple[str, Prediction]]]] = {}
    if manifest is not None:
        loaded = load_finetuned(adapter_dir, base, options)
        with loaded.model.disable_adapter():
            answers["base"] = _answer(loaded.model, loaded.processor, groups, "base (zero-shot)", batch_size,
                                      max_new_tokens, progress)
        answers["finetuned"] = _answer(loaded.model, loaded.processor, groups, "fine-tuned", batch_size,
                                       max_new_tokens, progress)
    else:
        loaded = load_model(base, options)
        answers["base"] = _answer(loaded.model, loaded.processor, groups, "base (zero-shot)", batch_size,
                                  max_new_tokens, progress)
    del loaded

    out.mkdir(parents=True, exist_ok=True)
    tasks: list[dict[str, Any]] = []
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as lines:
        for g, (info, examples) in enumerate(groups):
            section, label = _row_title(info.name, info.task_type)
            paper = PAPER_TABLE4_EXTERNAL.get(info.name)
            entry: dict[str, Any] = {
                "dataset": info.name, "task": info.task_type, "section": section, "label": label,
                "n": len(examples), "class_names": list(info.class_names), "markers": examples[0].markers,
                "prompt_id": examples[0].prompt_id,
                "reference": dict(paper.external) if paper else {m: None for m in TASK_METRICS[info.task_type]},
                "base": None, "finetuned": None, "confusion": {},
            }
            for variant in VARIANTS:
                if variant not in answers:
                    continue
                predictions = [p for _, p in answers[variant][g]]
                entry[variant] = _metrics_for(examples, predictions)
                if info.task_type in ("classification", "grading", "region-classification"):
                    png = out / "confusion" / f"{info.name}-{variant}.png"
                    plot_confusion([ex.target for ex in examples],
                                   [None if is_unparseable(p) else p for p in predictions], info.class_names, png,
                                   f"{info.name} ({split}) — {VARIANT_TITLES[variant]}")
                    entry["confusion"][variant] = str(png.relative_to(out))
            for i, ex in enumerate(examples):
                row: dict[str, Any] = {"dataset": info.name, "task": info.task_type, "index": i,
                                       "target": prediction_to_json(ex.target), "answer": ex.answer}
                for variant in answers:
                    text, prediction = answers[variant][g][i]
                    row[variant] = {"answer": text, "prediction": prediction_to_json(prediction),
                                    "unparseable": prediction.reason if is_unparseable(prediction) else None}
                lines.write(json.dumps(row, ensure_ascii=False) + "\n")
            tasks.append(entry)

    results: dict[str, Any] = {
        "research_use_only": True,
        "specialty": data.config.specialty,
        "split": split,
        "limit": limit,
        "base_model": {"dir": str(base), "fingerprint": fingerprint(base)},
        "adapter": None if manifest is None else {"dir": str(adapter_dir), "specialty": manifest.specialty,
                                                  "created": manifest.created,
                                                  "val_accuracy": manifest.results.get("val_accuracy")},
        "load_options": {"device": device, "dtype": dtype, "quantize": quantize},
        "skipped": list(data.skipped),
        "empty": empty,
        "tasks": tasks,
        "metric_definitions": dict(METRIC_DEFINITIONS),
        "reference": "External benchmark column of the paper's table 4 (percent; null: '—' in the paper; "
                     "'illegible': not readable in the extracted paper text)",
        "seconds": round(time.monotonic() - started, 3),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_table(results, out / "table4.md")
    logger.info("specialty %s evaluated on %d task(s) in %.1f s: %s", data.config.specialty, len(tasks),
                results["seconds"], out)
    return results


__all__ = [
    "ILLEGIBLE",
    "METRIC_DEFINITIONS",
    "METRIC_LABELS",
    "PAPER_TABLE4_EXTERNAL",
    "PaperRow",
    "TASK_METRICS",
    "evaluate_specialty",
    "prediction_from_json",
    "prediction_to_json",
    "task_metrics",
    "write_table",
]
