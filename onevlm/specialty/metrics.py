"""Evaluation metrics of the specialty tasks (table 4 of the paper), with scikit-learn.

- classification / grading / region classification: accuracy, F1 macro, F1 weighted; an
  unparseable answer counts as wrong (it is its own "class" -1, never coerced).
- multi-label (ChestMNIST): exact-match (subset) accuracy, micro/macro F1, mean per-label accuracy;
  an unparseable answer counts as wrong on every label.
- detection: bounding-box localisation accuracy = share of images whose every gold box is matched
  by a predicted box of IoU ≥ 0.5 (one-to-one, greedy by IoU) and that predict no extra box, an
  image without gold boxes being correct iff nothing is predicted (an unparseable answer is always
  wrong); region localisation accuracy =
  share of gold boxes whose centre lies inside some predicted box (a looser "did it look in the
  right place" measure, as the paper reports both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from onevlm.specialty.samples import NormalisedBox

UNPARSEABLE = -1


@dataclass(frozen=True)
class ClassificationScores:
    n: int
    accuracy: float
    f1_macro: float
    f1_weighted: float
    unparseable: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def classification_scores(gold: Sequence[int], predicted: Sequence[int | None], n_classes: int) -> ClassificationScores:
    """Accuracy and F1 (macro, weighted over the gold classes); ``None`` predictions are unparseable."""
    from sklearn.metrics import accuracy_score, f1_score

    if len(gold) != len(predicted) or not gold:
        raise ValueError("gold and predicted must be non-empty and of equal length")
    pred = [UNPARSEABLE if p is None else int(p) for p in predicted]
    labels = list(range(n_classes))
    return ClassificationScores(
        n=len(gold),
        accuracy=float(accuracy_score(gold, pred)),
        f1_macro=float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
        f1_weighted=float(f1_score(gold, pred, labels=labels, average="weighted", zero_division=0)),
        unparseable=sum(p is None for p in predicted),
    )


def multilabel_scores(gold: Sequence[set[int]], predicted: Sequence[set[int] | None], n_labels: int) -> dict:
    """Subset accuracy, micro/macro F1 and mean per-label accuracy for multi-label findings."""
    from sklearn.metrics import accuracy_score, f1_score

    def matrix(rows: Sequence[set[int]]) -> np.ndarray:
        out = np.zeros((len(rows), n_labels), dtype=int)
        for i, row in enumerate(rows):
            for label in row:
                out[i, label] = 1
        return out

    y = matrix(gold)
    # An unparseable answer is wrong on every label: it stands for the complement of the truth.
    p = np.array([1 - y[i] if row is None else matrix([row])[0] for i, row in enumerate(predicted)]).reshape(y.shape)
    return {
        "n": len(gold),
        "subset_accuracy": float(accuracy_score(y, p)),
        "f1_micro": float(f1_score(y, p, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(y, p, average="macro", zero_division=0)),
        "label_accuracy": float((y == p).mean()),
        "unparseable": sum(r is None for r in predicted),
    }


def iou(a: NormalisedBox, b: NormalisedBox) -> float:
    """Intersection over union of two boxes."""
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(gold: Sequence[NormalisedBox], predicted: Sequence[NormalisedBox], threshold: float,
                same_label: bool = False) -> int:
    """Number of one-to-one gold/predicted pairs at IoU >= ``threshold``, matched greedily by IoU.

    ``same_label``: only boxes with the same label may pair.
    """
    pairs = sorted(((iou(g, p), i, j) for i, g in enumerate(gold) for j, p in enumerate(predicted)
                    if not same_label or g.label == p.label), reverse=True)
    used_g, used_p, matches = set(), set(), 0
    for value, i, j in pairs:
        if value < threshold:
            break
        if i not in used_g and j not in used_p:
            used_g.add(i)
            used_p.add(j)
            matches += 1
    return matches


def localisation_scores(gold: Sequence[Sequence[NormalisedBox]], predicted: Sequence[Sequence[NormalisedBox] | None],
                        threshold: float = 0.5) -> dict:
    """Bounding-box and region localisation accuracy (definitions in the module docstring)."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError("gold and predicted must be non-empty and of equal length")
    image_ok = 0
    region_hits = region_total = 0
    for gold_boxes, pred_boxes in zip(gold, predicted):
        parsed = pred_boxes is not None
        pred_boxes = list(pred_boxes or ())
        matched = match_boxes(gold_boxes, pred_boxes, threshold)
        image_ok += int(parsed and matched == len(gold_boxes) == len(pred_boxes))
        for g in gold_boxes:
            region_total += 1
            cx, cy = (g.x0 + g.x1) / 2, (g.y0 + g.y1) / 2
            region_hits += int(any(p.x0 <= cx <= p.x1 and p.y0 <= cy <= p.y1 for p in pred_boxes))
    return {
        "n": len(gold),
        "bbox_localisation_accuracy": image_ok / len(gold),
        "region_localisation_accuracy": region_hits / region_total if region_total else None,
        "iou_threshold": threshold,
        "unparseable": sum(p is None for p in predicted),
    }


def plot_confusion(gold: Sequence[int], predicted: Sequence[int | None], class_names: Sequence[str],
                   path: str | Path, title: str) -> Path:
    """A confusion-matrix PNG (rows: gold, columns: predicted; an extra column for unparseable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    matrix = np.zeros((n, n + 1), dtype=int)
    for g, p in zip(gold, predicted):
        matrix[g, n if p is None or p < 0 or p >= n else p] += 1
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * (n + 1), 1.0 + 0.6 * n), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n + 1), [*class_names, "unparseable"], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    for i in range(n):
        for j in range(n + 1):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
